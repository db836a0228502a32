"""The OpenAI endpoints' bodies (``/v1/completions``, ``/v1/chat/completions``), with the extensions peers
accept: vLLM's sampling fields and ``guided_*`` constraints, LoRAX's ``adapter_source``, llama.cpp's
``lora`` list and qadapt's ``adapters``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .schemas import Source, _Strict


class LoraScale(_Strict):
    """llama.cpp's per-request adapter scale: ``id`` is its index in ``GET /lora-adapters`` (or its name)."""

    id: int | str
    scale: float


class JsonSchemaFormat(_Strict):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("`json_schema` is required when `type` is json_schema")
        return self


class _Sampling(_Strict):
    """Fields shared by both endpoints."""

    informational = frozenset({"user", "metadata", "service_tier"})

    model: str
    adapters: list[str] | dict[str, float] | None = None
    adapter_source: Source | None = None
    lora: list[LoraScale] | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0, le=2)  # None: OpenAI's default, 1
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)  # vLLM: -1 or 0 = off
    typical_p: float | None = Field(default=None, gt=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool | None = False
    include_stop_str_in_output: bool | None = False
    n: int | None = Field(default=None, ge=1, le=16)
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None
    guided_choice: list[str] | None = None
    store: bool | None = None

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias(cls, v):
        if isinstance(v, list):
            raise ValueError("must map token ids to biases ({\"50256\": -100}), as OpenAI specifies; a list is "
                             "not accepted")
        return v

    @model_validator(mode="after")
    def _checks(self):
        if self.store:
            raise ValueError("`store: true` is not supported (qadapt keeps no completions)")
        if sum(x is not None for x in (self.adapters, self.lora)) > 1:
            raise ValueError("give at most one of `adapters` and `lora`")
        for k, v in (self.logit_bias or {}).items():
            if not k.lstrip("-").isdigit():
                raise ValueError(f"`logit_bias` keys are token ids; got {k!r}")
            if not -100 <= v <= 100:
                raise ValueError(f"`logit_bias` values must be in [-100, 100]; got {v} for token {k}")
        constraints = [k for k in ("response_format", "guided_json", "guided_regex", "guided_grammar",
                                   "guided_choice") if getattr(self, k) is not None
                       and not (k == "response_format" and self.response_format.type == "text")]
        if len(constraints) > 1:
            raise ValueError("give at most one of " + ", ".join(f"`{c}`" for c in constraints))
        if self.stream_options and set(self.stream_options) - {"include_usage", "continuous_usage_stats"}:
            extra = sorted(set(self.stream_options) - {"include_usage", "continuous_usage_stats"})
            raise ValueError(f"`stream_options` {', '.join(extra)} not supported")
        return self

    @property
    def count(self) -> int:
        return self.n or 1

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def biases(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items())


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    best_of: int | None = Field(default=None, ge=1, le=16)
    suffix: str | None = None

    @model_validator(mode="after")
    def _checks_completion(self):
        if self.suffix:
            raise ValueError("`suffix` (fill-in-the-middle) is not supported")
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1 and not all(isinstance(t, int) for t in self.prompt):
                raise ValueError("send one prompt per request (a string or a list of token ids)")
            if not self.prompt:
                raise ValueError("the prompt is empty")
        if self.best_of is not None and self.best_of < self.count:
            raise ValueError(f"`best_of` ({self.best_of}) must be >= `n` ({self.count})")
        if self.stream and (self.best_of or 1) > self.count:
            raise ValueError("`best_of` > `n` cannot be streamed")
        return self

    def prompt_value(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and not isinstance(p[0], int):
            return p[0]  # a one-element list of a string or of token ids
        return p  # type: ignore[return-value]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str | dict[str, Any]


class ToolCall(_Strict):
    id: str | int | None = None
    type: Literal["function"] = "function"
    function: FunctionCall
    index: int | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionDef(_Strict):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedTool(_Strict):
    type: Literal["function"]
    function: dict[str, str]

    @field_validator("function")
    @classmethod
    def _named(cls, v):
        if not v.get("name"):
            raise ValueError("`function.name` is required")
        return v


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: str | NamedTool | None = None  # none | auto | required | a named tool (TGI: its bare name)
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _checks_chat(self):
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        if isinstance(self.tool_choice, str) and self.tool_choice not in ("none", "auto", "required"):
            self.tool_choice = NamedTool(type="function", function={"name": self.tool_choice})
        if self.top_logprobs and not self.logprobs:
            raise ValueError("`top_logprobs` needs `logprobs: true`")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("`tool_choice` names a tool call but `tools` is empty")
        if isinstance(self.tool_choice, NamedTool):
            name = self.tool_choice.function["name"]
            if name not in [t.function.name for t in self.tools or ()]:
                raise ValueError(f"`tool_choice` names `{name}`, which is not in `tools`")
        return self
