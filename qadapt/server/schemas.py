"""Request bodies of the HTTP API, validated strictly (a string is not a number, a float is not an int).

Nothing asked for is ignored: a field qadapt does not know is refused by name unless its value is null
(clients such as ``text-generation`` send every field of their schema, null when unset) or it is one of a
model's :attr:`_Strict.informational` fields, which ask for nothing (OpenAI's ``user``). Known fields of the
wrong type, out-of-range values and options qadapt does not implement are refused with a message naming
the field. The OpenAI bodies are in :mod:`.openai_schemas`, LoRAX's and TGI's in :mod:`.lorax_schemas`;
turning a request into sampling parameters and adapters happens in the routes.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import InputError


class InvalidRequest(InputError):
    """A request body that fails validation (OpenAI routes answer 400, LoRAX's and TGI's 422)."""


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    informational: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _unknown(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
            unknown = [k for k, v in data.items() if k not in known and v is not None and k not in cls.informational]
            if unknown:
                raise ValueError(f"unsupported field{'s' if len(unknown) > 1 else ''} "
                                 + ", ".join(f"`{k}`" for k in unknown) + " (qadapt does not implement "
                                 + ("them" if len(unknown) > 1 else "it") + "; send null or leave it out)")
        return data

    @classmethod
    def parse(cls, data: Any, where: str = ""):
        """Validate a decoded JSON body; an :class:`InvalidRequest` naming each bad field otherwise."""
        if not isinstance(data, dict):
            raise InvalidRequest(f"the request body must be a JSON object, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            problems = []
            for err in e.errors():
                loc = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
                msg = err["msg"].removeprefix("Value error, ")
                where_ = ".".join(([where] if where else []) + loc)
                problems.append(f"`{where_}`: {msg}" if where_ else msg)
            raise InvalidRequest("invalid request: " + "; ".join(dict.fromkeys(problems))) from None


Source = Literal["hub", "local", "s3"]


class LoadAdapterRequest(_Strict):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    adapter_source: Source | None = None
    load_inplace: bool = False


class UnloadAdapterRequest(_Strict):
    lora_name: str = Field(min_length=1)


class ActivateRequest(_Strict):
    adapter_names: list[str]
