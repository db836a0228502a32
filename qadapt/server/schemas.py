"""Request bodies of the HTTP API, validated strictly (a string is not a number, a float is not an int).

Unknown fields are ignored (clients send many); known fields of the wrong type,
out-of-range values and options qadapt does not implement are refused with a
message naming the field. The models only describe and check: turning a request
into sampling parameters and adapter names happens in :mod:`qadapt.server.app`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import InputError


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    @classmethod
    def parse(cls, data: Any):
        """Validate a decoded JSON body; an InputError (HTTP 400) naming each bad field otherwise."""
        if not isinstance(data, dict):
            raise InputError(f"the request body must be a JSON object, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            problems = []
            for err in e.errors():
                where = ".".join(str(p) for p in err["loc"]) or "body"
                problems.append(f"`{where}`: {err['msg']}")
            raise InputError("invalid request: " + "; ".join(dict.fromkeys(problems))) from None


class _Sampling(_Strict):
    """Fields shared by the OpenAI endpoints (plus vLLM's top_k / repetition_penalty and our ``adapters``)."""

    model: str
    adapters: list[str] | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0)  # None: OpenAI's default, 1
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.n not in (None, 1) or self.best_of not in (None, 1):
            raise ValueError("only one choice per request is supported (`n` and `best_of` must be 1)")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("`presence_penalty` / `frequency_penalty` are not supported (use repetition_penalty)")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _checks(self):
        if self.echo or self.logprobs or self.suffix:
            raise ValueError("`echo`, `logprobs` and `suffix` are not supported")
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1 and not all(isinstance(t, int) for t in self.prompt):
                raise ValueError("send one prompt per request (a string or a list of token ids)")
            if not self.prompt:
                raise ValueError("the prompt is empty")
        return self

    def prompt_value(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and not isinstance(p[0], int):
            return p[0]  # a one-element list of a string or of token ids
        return p  # type: ignore[return-value]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False

    @model_validator(mode="after")
    def _checks(self):
        if self.logprobs:
            raise ValueError("`logprobs` is not supported")
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self


class LoraxParameters(_Strict):
    adapter_id: str | None = None
    adapter_source: Literal["hub", "local", "s3"] | None = None
    api_token: str | None = None
    max_new_tokens: int = Field(default=20, ge=1)
    do_sample: bool = False
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    details: bool = False
    return_full_text: bool = False
    best_of: int | None = None

    @field_validator("best_of")
    @classmethod
    def _one(cls, v):
        if v not in (None, 1):
            raise ValueError("`best_of` must be 1")
        return v

    def temperature_value(self) -> float:
        """LoRAX/TGI semantics: greedy unless ``do_sample`` or a sampling warper is set; 0 means greedy here."""
        warped = (self.temperature not in (None, 1.0)) or bool(self.top_k) or (self.top_p not in (None, 1.0))
        if not (self.do_sample or warped):
            return 0.0
        return 1.0 if self.temperature is None else self.temperature


class GenerateRequest(_Strict):
    inputs: str = Field(min_length=1)
    parameters: LoraxParameters = Field(default_factory=LoraxParameters)
    stream: bool = False


class LoadAdapterRequest(_Strict):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    adapter_source: Literal["hub", "local", "s3"] | None = None
    load_inplace: bool = False


class UnloadAdapterRequest(_Strict):
    lora_name: str = Field(min_length=1)


class ActivateRequest(_Strict):
    adapter_names: list[str]
