"""The model's hyper-parameters, built from file contents (GGUF metadata or ``config.json``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import FormatError
from ..layer_maps import LayerMap
from .rope import RopeSpec, rope_from_gguf, rope_from_hf


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # layer-map name: llama, mistral, phi3, qwen, qwen2, gpt2
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope: RopeSpec | None = None  # rotary embedding (theta, rotary dimensions, scaling); None = the defaults
    context_length: int = 2048
    sliding_window: int | None = None
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rope is None:
            object.__setattr__(self, "rope", RopeSpec("default", 10000.0, self.head_dim, self.context_length))

    @property
    def rope_theta(self) -> float:
        return self.rope.theta

    @property
    def rope_dim(self) -> int:
        return self.rope.dim

    @property
    def shapes(self) -> dict[str, int]:
        """The normalised config the layer map's shape expressions are written against."""
        return {
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
        }

    def validate(self, where: str) -> "ModelConfig":
        s = self.shapes
        bad = [k for k, v in s.items() if not isinstance(v, int) or v <= 0]
        if bad:
            raise FormatError(f"{where}: {', '.join(bad)} must be positive integers, got {s}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise FormatError(
                f"{where}: {self.num_attention_heads} attention heads are not a multiple of "
                f"{self.num_key_value_heads} key/value heads"
            )
        return self


def _eos_tuple(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v)
    return (int(v),)


def config_from_gguf(gf, layer_map: LayerMap) -> ModelConfig:
    """From a :class:`~qadapt.formats.gguf.GGUFFile`'s metadata."""
    meta = gf.arch_metadata
    shapes = layer_map.normalise_gguf_metadata(meta)
    eps = meta.get("attention.layer_norm_rms_epsilon", meta.get("attention.layer_norm_epsilon", 1e-5))
    tie = "output.weight" not in gf.tensors
    rope = rope_from_gguf(gf, meta, shapes["head_dim"])
    return ModelConfig(
        architecture=layer_map.architecture,
        **shapes,
        norm_eps=float(eps),
        rope=rope,
        context_length=rope.context(),
        sliding_window=meta.get("attention.sliding_window") or None,
        tie_embeddings=tie,
        bos_token_id=gf.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_eos_tuple(gf.get("tokenizer.ggml.eos_token_id")),
    ).validate(str(gf.path))


def config_from_hf(raw: Mapping[str, Any], layer_map: LayerMap, where: str, default_tie: bool) -> ModelConfig:
    """From a transformers ``config.json`` dict."""
    shapes = layer_map.normalise_hf_config(raw)
    rope = rope_from_hf(raw, shapes["head_dim"], where)
    eps = raw.get("rms_norm_eps", raw.get("layer_norm_epsilon", raw.get("layer_norm_eps", 1e-5)))
    window = raw.get("sliding_window")
    if raw.get("use_sliding_window") is False:
        window = None
    return ModelConfig(
        architecture=layer_map.architecture,
        **shapes,
        norm_eps=float(eps),
        rope=rope,
        context_length=rope.context(),
        sliding_window=window,
        tie_embeddings=bool(raw.get("tie_word_embeddings", default_tie)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_tuple(raw.get("eos_token_id")),
    ).validate(where)
