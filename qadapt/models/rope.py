"""Rotary position embedding parameters: every scaling real checkpoints use, read from config.json or GGUF.

A :class:`RopeSpec` is built from a transformers ``config.json`` (``rope_scaling`` or transformers 5's
``rope_parameters``) or from GGUF metadata (``rope.scaling.*`` keys, llama.cpp's ``rope_freqs`` /
``rope_factors_*`` tensors). :func:`inv_freq` gives the inverse frequencies and the cos/sin scale
for a forward whose positions reach ``seq_len``, with transformers' formulas (``modeling_rope_utils``):

- ``default``: ``1 / theta^(2i/d)``; ``linear``: divided by ``factor``;
- ``dynamic`` (NTK): past ``max_position_embeddings`` the base grows with the forward's length;
- ``yarn``: a ramp between interpolated and extrapolated frequencies, cos/sin scaled by the attention factor;
- ``llama3`` (Llama 3.1+): low frequencies divided by ``factor``, a smooth band between;
- ``longrope`` (Phi-3, Phi-4-mini): per-frequency divisors, the long set once a forward passes the original
  context, cos/sin scaled;
- GGUF ``rope_freqs`` (how llama.cpp's converter writes llama3): per-frequency divisors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..errors import FormatError, UnsupportedError

KINDS = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


@dataclass(frozen=True)
class RopeSpec:
    kind: str
    theta: float
    dim: int  # rotary dimensions (head_dim * partial_rotary_factor)
    max_positions: int  # the config's max_position_embeddings (dynamic's reference length)
    factor: float = 1.0
    original: int | None = None  # original_max_position_embeddings (yarn, llama3, longrope)
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0  # cos/sin scale (yarn, longrope)
    short_factor: tuple[float, ...] | None = None  # longrope
    long_factor: tuple[float, ...] | None = None
    freq_factors: tuple[float, ...] | None = None  # GGUF rope_freqs: divisors of each frequency

    def context(self) -> int:
        """The context the scaling extends to: ``max_position_embeddings`` times the factor for linear and dynamic
        scaling (Vicuna-16k: 4096 x 4), the original context times the factor for yarn (Qwen2.5: 32768 x 4);
        llama3 and LongRoPE configs give the extended length as ``max_position_embeddings`` already."""
        if self.kind in ("linear", "dynamic"):
            return int(self.max_positions * self.factor)
        if self.kind == "yarn":
            return max(self.max_positions, int(self.original * self.factor))
        return self.max_positions


def _powers(spec: RopeSpec, base: float | None = None) -> torch.Tensor:
    """``base^(2i/d)`` in float32, as transformers computes it."""
    b = spec.theta if base is None else base
    return b ** (torch.arange(0, spec.dim, 2, dtype=torch.int64).float() / spec.dim)


def inv_freq(spec: RopeSpec, seq_len: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [dim/2], cos/sin scale) for a forward whose positions reach ``seq_len``."""
    k = spec.kind
    if k == "dynamic" and seq_len > spec.max_positions:
        f = spec.factor
        base = spec.theta * ((f * seq_len / spec.max_positions) - (f - 1)) ** (spec.dim / (spec.dim - 2))
        return 1.0 / _powers(spec, base), 1.0
    if k == "longrope":
        factors = spec.long_factor if seq_len > spec.original else spec.short_factor
        return 1.0 / (torch.tensor(factors, dtype=torch.float32) * _powers(spec)), spec.attention_factor
    inv = 1.0 / _powers(spec)
    if spec.freq_factors is not None:
        inv = inv / torch.tensor(spec.freq_factors, dtype=torch.float32)
    if k == "linear":
        inv = inv / spec.factor
    elif k == "llama3":
        low, high = spec.original / spec.low_freq_factor, spec.original / spec.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low, inv / spec.factor, inv)
        smooth = (spec.original / wavelen - spec.low_freq_factor) / (spec.high_freq_factor - spec.low_freq_factor)
        smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
        medium = ~(wavelen < high) * ~(wavelen > low)
        inv = torch.where(medium, smoothed, scaled)
    elif k == "yarn":
        def corr(rotations: float) -> float:
            return (spec.dim * math.log(spec.original / (rotations * 2 * math.pi))) / (2 * math.log(spec.theta))

        lo, hi = corr(spec.beta_fast), corr(spec.beta_slow)
        if spec.truncate:
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, spec.dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = torch.clamp((torch.arange(spec.dim // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
        extrapolate = 1 - ramp
        powers = _powers(spec)
        inv = (1.0 / (spec.factor * powers)) * (1 - extrapolate) + (1.0 / powers) * extrapolate
        return inv, spec.attention_factor
    return inv, 1.0


def yarn_attention_factor(factor: float, mscale: float | None = None, mscale_all_dim: float | None = None) -> float:
    def get(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if mscale and mscale_all_dim:
        return get(factor, mscale) / get(factor, mscale_all_dim)
    return get(factor)


def longrope_attention_factor(factor: float, original: int) -> float:
    """LongRoPE's cos/sin scale: sqrt(1 + ln(factor) / ln(original)), 1 when factor <= 1."""
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def _num(params: Mapping[str, Any], key: str, where: str, default: Any = None) -> Any:
    v = params.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise FormatError(f"{where}: rope scaling `{key}` must be a number, got {v!r}")
    return v


LAYER_TYPES = ("full_attention", "sliding_attention")


def rope_from_hf(raw: Mapping[str, Any], head_dim: int, where: str, layer_type: str = "full_attention") -> RopeSpec:
    """From ``config.json``: ``rope_parameters`` (transformers 5; per layer type, as Gemma 3 writes them:
    ``layer_type`` picks one) or ``rope_scaling`` + ``rope_theta`` (Gemma 3's local layers:
    ``rope_local_base_freq``, unscaled)."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise FormatError(f"{where}: `rope_scaling` must be an object, got {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        unknown = [k for k in params if k not in LAYER_TYPES]
        if unknown:
            raise UnsupportedError(f"{where}: rope parameters for layer type(s) {', '.join(unknown)} are not supported")
        raw = {**raw, "rope_parameters": params.get(layer_type) or {}}
        return rope_from_hf(raw, head_dim, where)
    if layer_type == "sliding_attention" and raw.get("rope_local_base_freq") is not None:
        raw = {**raw, "rope_parameters": {"rope_type": "default", "rope_theta": raw["rope_local_base_freq"]},
               "rope_scaling": None}
        return rope_from_hf(raw, head_dim, where)
    kind = str(params.get("rope_type", params.get("type", "default")) or "default").lower()
    kind = {"su": "longrope", "none": "default"}.get(kind, kind)
    if kind not in KINDS:
        raise UnsupportedError(f"{where}: rope_scaling type `{kind}` is not supported (supported: {', '.join(KINDS)})")
    theta = params.get("rope_theta", raw.get("rope_theta", raw.get("rotary_emb_base", 10000.0)))  # Qwen-1's name
    partial = params.get("partial_rotary_factor") or raw.get("partial_rotary_factor", raw.get("rotary_pct", 1.0))
    context = int(raw.get("max_position_embeddings") or raw.get("n_positions") or raw.get("seq_length") or 2048)
    dim = int(head_dim * partial)
    spec: dict[str, Any] = dict(kind=kind, theta=float(_num({"t": theta}, "t", where)), dim=dim, max_positions=context)
    if kind == "default":
        return RopeSpec(**spec)
    factor = _num(params, "factor", where)
    if factor is None and kind in ("linear", "dynamic", "llama3"):
        raise FormatError(f"{where}: rope_scaling type `{kind}` needs a `factor`")
    # transformers: the top-level original_max_position_embeddings (Phi-3) wins, then the one in rope_scaling
    original = raw.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
    if kind in ("yarn", "llama3", "longrope"):
        original = int(original or context)
    spec.update(factor=float(factor) if factor is not None else 1.0, original=original)
    if kind == "llama3":
        spec.update(low_freq_factor=float(_num(params, "low_freq_factor", where, 1.0)),
                    high_freq_factor=float(_num(params, "high_freq_factor", where, 4.0)))
    elif kind == "yarn":
        if factor is None:  # DeepSeek-V3 style: the ratio of the two context lengths
            spec["factor"] = context / original
        attn = _num(params, "attention_factor", where)
        spec.update(beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                    truncate=bool(params.get("truncate", True)),
                    attention_factor=float(attn) if attn is not None else yarn_attention_factor(
                        spec["factor"], params.get("mscale"), params.get("mscale_all_dim")))
    elif kind == "longrope":
        try:
            short = tuple(float(x) for x in params["short_factor"])
            long = tuple(float(x) for x in params["long_factor"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{where}: longrope `rope_scaling` needs numeric `short_factor` and `long_factor` "
                              "lists") from None
        if len(short) != dim // 2 or len(long) != dim // 2:
            raise FormatError(f"{where}: LongRoPE factors have {len(short)} / {len(long)} values, expected {dim // 2} "
                              "(half the rotary dimensions)")
        attn = _num(params, "attention_factor", where)
        if attn is None:  # transformers: the factor defaults to the ratio of the two context lengths
            attn = longrope_attention_factor(float(factor or context / original), original)
        spec.update(short_factor=short, long_factor=long, attention_factor=float(attn))
    return RopeSpec(**spec)


def rope_from_gguf(gf, meta: Mapping[str, Any], head_dim: int) -> RopeSpec:
    """From GGUF metadata as llama.cpp's converter writes it (``{arch}.rope.*`` keys, rope tensors)."""
    from ..quant.ggml import dequantize_array

    def vector(name: str) -> tuple[float, ...]:
        t = gf.tensor(name)
        return tuple(float(x) for x in dequantize_array(t.data, t.qtype, t.shape).reshape(-1))

    dim = int(meta.get("rope.dimension_count") or head_dim)
    context = int(meta.get("context_length", 2048))
    spec: dict[str, Any] = dict(kind="default", theta=float(meta.get("rope.freq_base", 10000.0)), dim=dim,
                                max_positions=context)
    kind = str(meta.get("rope.scaling.type") or "none").lower()
    factor = meta.get("rope.scaling.factor")
    original = meta.get("rope.scaling.original_context_length")
    if "rope_factors_long.weight" in gf.tensors and "rope_factors_short.weight" in gf.tensors:
        if original is None:
            raise FormatError(f"{gf.path}: has LongRoPE factor tensors but no `rope.scaling.original_context_length`")
        attn = meta.get("rope.scaling.attn_factor")
        spec.update(kind="longrope", original=int(original), short_factor=vector("rope_factors_short.weight"),
                    long_factor=vector("rope_factors_long.weight"),
                    attention_factor=float(attn) if attn is not None else
                    longrope_attention_factor(context / int(original), int(original)))
    elif kind == "linear":
        spec.update(kind="linear", factor=float(factor))
    elif kind == "yarn":
        if factor is None or original is None:
            raise FormatError(f"{gf.path}: yarn rope scaling needs `rope.scaling.factor` and "
                              "`rope.scaling.original_context_length`")
        attn = meta.get("rope.scaling.yarn_attn_factor")
        spec.update(kind="yarn", factor=float(factor), original=int(original),
                    beta_fast=float(meta.get("rope.scaling.yarn_beta_fast") or 32),
                    beta_slow=float(meta.get("rope.scaling.yarn_beta_slow") or 1),
                    attention_factor=float(attn) if attn is not None else yarn_attention_factor(float(factor)))
        ext = meta.get("rope.scaling.yarn_ext_factor")
        if ext is not None and float(ext) not in (1.0, -1.0):
            raise UnsupportedError(f"{gf.path}: yarn with `rope.scaling.yarn_ext_factor` = {ext} is not supported "
                                   "(transformers' yarn is 1)")
    elif kind not in ("none", "longrope"):
        raise UnsupportedError(f"{gf.path}: `rope.scaling.type` = {kind!r} is not supported (linear, yarn, longrope)")
    if "rope_freqs.weight" in gf.tensors:  # llama3 scaling, as llama.cpp's converter writes it
        spec["freq_factors"] = vector("rope_freqs.weight")
        if len(spec["freq_factors"]) != dim // 2:
            raise FormatError(f"{gf.path}: `rope_freqs.weight` has {len(spec['freq_factors'])} values, expected "
                              f"{dim // 2} (half the rotary dimensions)")
    return RopeSpec(**spec)
