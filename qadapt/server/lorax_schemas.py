"""LoRAX's and TGI's ``/generate`` bodies: every field of ``lorax-client`` 0.6.3's and ``text-generation``
0.7.0's ``Parameters``, nulls accepted where those clients send them (their documented defaults)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from .schemas import _Strict

MAX_BEST_OF = 16
MAX_STOP_SEQUENCES = 16


class MergedAdapters(_Strict):
    """LoRAX's per-request mix (PEFT's ``add_weighted_adapter``; see :mod:`qadapt.adapters.mix`)."""

    ids: list[str] = Field(min_length=1)
    weights: list[float] = Field(min_length=1)
    merge_strategy: Literal["linear", "ties", "dare_linear", "dare_ties"] | None = None
    density: float = Field(default=1.0, ge=0, le=1)
    majority_sign_method: Literal["total", "frequency"] | None = None

    @model_validator(mode="after")
    def _lengths(self):
        if len(self.ids) != len(self.weights):
            raise ValueError(f"`ids` ({len(self.ids)}) and `weights` ({len(self.weights)}) must have the same length")
        return self


class ResponseFormat(_Strict):
    """LoRAX's ``response_format``: a JSON object, following ``schema`` when given."""

    type: Literal["json_object", "text"]
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")


class Grammar(_Strict):
    """TGI's ``grammar``: ``json`` (a JSON schema, as an object or a string) or ``regex``."""

    type: Literal["json", "regex"]
    value: str | dict[str, Any]


class Parameters(_Strict):
    adapter_id: str | None = None
    adapter_source: Literal["hub", "local", "s3", "pbase"] | None = None
    merged_adapters: MergedAdapters | None = None
    api_token: str | None = None
    do_sample: bool = False
    max_new_tokens: int | None = Field(default=None, gt=0)  # null: up to the context (LoRAX)
    ignore_eos_token: bool = False
    repetition_penalty: float | None = Field(default=None, gt=0)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    return_full_text: bool | None = False
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    seed: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0)
    top_k: int | None = Field(default=None, gt=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    truncate: int | None = Field(default=None, gt=0)
    typical_p: float | None = Field(default=None, gt=0, le=1)
    best_of: int | None = Field(default=None, ge=1, le=MAX_BEST_OF)
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    return_k_alternatives: int | None = Field(default=None, ge=1, le=20)
    top_n_tokens: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    grammar: Grammar | None = None

    @model_validator(mode="after")
    def _checks(self):
        if self.adapter_id and self.merged_adapters is not None:
            raise ValueError("give at most one of `adapter_id` and `merged_adapters`")
        if self.adapter_source == "pbase":
            raise ValueError("`adapter_source` `pbase` (Predibase's hosted adapters) is not supported; use hub, "
                             "local or s3")
        if self.watermark:
            raise ValueError("`watermark` is not supported (qadapt does not implement watermarking)")
        if self.response_format is not None and self.grammar is not None:
            raise ValueError("give at most one of `response_format` and `grammar`")
        if (self.best_of or 1) > 1:
            if self.seed is not None:
                raise ValueError("`seed` must not be set when `best_of` > 1 (each sequence draws its own)")
            if not self.sampling:
                raise ValueError("`best_of` > 1 needs sampling (do_sample, temperature, top_k, top_p or typical_p)")
        return self

    @property
    def sampling(self) -> bool:
        """TGI's rule: sampling when ``do_sample`` or any warper is set."""
        return self.do_sample or any(v is not None for v in (self.temperature, self.top_k, self.top_p,
                                                              self.typical_p))

    def temperature_value(self) -> float:
        """0 (greedy) unless sampling; then the temperature (default 1). ``temperature: 0`` is greedy."""
        if not self.sampling:
            return 0.0
        return 1.0 if self.temperature is None else self.temperature


class GenerateRequest(_Strict):
    inputs: str = Field(min_length=1)
    parameters: Parameters = Field(default_factory=Parameters)
    stream: bool = False

    @model_validator(mode="before")
    @classmethod
    def _null_parameters(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("parameters", 0) is None:
            data = {**data, "parameters": {}}  # lorax-client sends parameters: null when none are set
        return data

    @model_validator(mode="after")
    def _stream(self):
        if self.stream and (self.parameters.best_of or 1) > 1:
            raise ValueError("`best_of` > 1 is not supported when streaming")
        return self
