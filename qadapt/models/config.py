"""The model's hyper-parameters, built from file contents (GGUF metadata or ``config.json``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import FormatError, UnsupportedError
from ..layer_maps import LayerMap


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
    rope_theta: float = 10000.0
    rope_dim: int | None = None  # rotary dimensions (partial rotary); None = head_dim
    context_length: int = 2048
    sliding_window: int | None = None
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # LongRoPE (Phi-3 long-context): per-frequency divisors, the short set up to
    # ``rope_original_context`` tokens and the long one beyond; cos/sin scaled by ``rope_attn_factor``
    rope_short_factor: tuple[float, ...] | None = None
    rope_long_factor: tuple[float, ...] | None = None
    rope_original_context: int | None = None
    rope_attn_factor: float = 1.0
    extra: Mapping[str, Any] = field(default_factory=dict)

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
    return ModelConfig(
        **_gguf_longrope(gf, meta),
        architecture=layer_map.architecture,
        **shapes,
        norm_eps=float(eps),
        rope_theta=float(meta.get("rope.freq_base", 10000.0)),
        rope_dim=meta.get("rope.dimension_count"),
        context_length=int(meta.get("context_length", 2048)),
        sliding_window=meta.get("attention.sliding_window") or None,
        tie_embeddings=tie,
        bos_token_id=gf.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_eos_tuple(gf.get("tokenizer.ggml.eos_token_id")),
    ).validate(str(gf.path))


def _gguf_longrope(gf, meta: Mapping[str, Any]) -> dict[str, Any]:
    """llama.cpp's converter writes LongRoPE as ``rope_factors_short/long`` tensors and ``rope.scaling.*`` keys."""
    if "rope_factors_long.weight" not in gf.tensors or "rope_factors_short.weight" not in gf.tensors:
        return {}
    from ..quant.ggml import dequantize_array

    def factors(name: str) -> tuple[float, ...]:
        t = gf.tensor(name)
        return tuple(float(x) for x in dequantize_array(t.data, t.qtype, t.shape).reshape(-1))

    orig = meta.get("rope.scaling.original_context_length")
    if orig is None:
        raise FormatError(f"{gf.path}: has LongRoPE factor tensors but no `rope.scaling.original_context_length`")
    ctx = int(meta.get("context_length", orig))
    attn = meta.get("rope.scaling.attn_factor")
    return dict(rope_short_factor=factors("rope_factors_short.weight"),
                rope_long_factor=factors("rope_factors_long.weight"), rope_original_context=int(orig),
                rope_attn_factor=float(attn) if attn is not None else longrope_attn_factor(ctx / int(orig), int(orig)))


def longrope_attn_factor(factor: float, original: int) -> float:
    """LongRoPE's cos/sin scale: sqrt(1 + ln(factor) / ln(original)), 1 when factor <= 1
    (factor = context / original unless the config gives one)."""
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def _hf_longrope(rope: Mapping[str, Any], context: int, original: int | None, where: str) -> dict[str, Any]:
    kind = str(rope.get("rope_type", rope.get("type", "default"))).lower()
    if kind in ("default", "none"):
        return {}
    if kind not in ("longrope", "su"):
        raise UnsupportedError(f"{where}: rope_scaling type `{kind}` is not supported (supported: default, longrope)")
    try:
        short, long = tuple(float(x) for x in rope["short_factor"]), tuple(float(x) for x in rope["long_factor"])
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"{where}: longrope `rope_scaling` needs numeric `short_factor` and `long_factor` lists") from None
    orig = int(rope.get("original_max_position_embeddings") or original or context)
    attn = rope.get("attention_factor")
    if attn is None:  # transformers: the factor defaults to the context ratio
        attn = longrope_attn_factor(float(rope.get("factor") or context / orig), orig)
    return dict(rope_short_factor=short, rope_long_factor=long, rope_original_context=orig,
                rope_attn_factor=float(attn))


def config_from_hf(raw: Mapping[str, Any], layer_map: LayerMap, where: str, default_tie: bool) -> ModelConfig:
    """From a transformers ``config.json`` dict."""
    shapes = layer_map.normalise_hf_config(raw)
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        rope = {}
    base = raw.get("rope_theta", raw.get("rotary_emb_base", 10000.0))  # rotary_emb_base: Qwen-1
    theta = rope.get("rope_theta", base)
    partial = rope.get("partial_rotary_factor") or raw.get("partial_rotary_factor", raw.get("rotary_pct", 1.0))
    context = int(raw.get("max_position_embeddings") or raw.get("n_positions") or raw.get("seq_length") or 2048)
    eps = raw.get("rms_norm_eps", raw.get("layer_norm_epsilon", raw.get("layer_norm_eps", 1e-5)))
    window = raw.get("sliding_window")
    if raw.get("use_sliding_window") is False:
        window = None
    return ModelConfig(
        architecture=layer_map.architecture,
        **shapes,
        **_hf_longrope(rope, context, raw.get("original_max_position_embeddings"), where),
        norm_eps=float(eps),
        rope_theta=float(theta),
        rope_dim=int(shapes["head_dim"] * partial),
        context_length=context,
        sliding_window=window,
        tie_embeddings=bool(raw.get("tie_word_embeddings", default_tie)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_tuple(raw.get("eos_token_id")),
        extra={"rope_scaling": raw.get("rope_scaling")} if raw.get("rope_scaling") else {},
    ).validate(where)
