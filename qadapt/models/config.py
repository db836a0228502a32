"""The model's hyper-parameters, built from file contents (GGUF metadata or ``config.json``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import FormatError, UnsupportedError
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
    # Gemma-style attention and output (None: absent): per layer "full" or "sliding" (the window on the second
    # kind only), the query scale (default head_dim ** -0.5), tanh soft-capping of attention scores and logits,
    # the embedding scale, the sliding layers' own rotary (Gemma 3's local base)
    # mixture of experts (0: a dense MLP): experts per layer, routed per token, their MLP width (0: the
    # config's intermediate_size), whether the top-k routing weights are renormalised to sum to 1
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk: bool = True
    layer_kinds: tuple[str, ...] | None = None
    attn_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    embed_scale: float | None = None
    local_rope: RopeSpec | None = None

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
        out = {
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
        }
        if self.num_experts:
            out.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                       moe_intermediate_size=self.moe_intermediate_size or self.intermediate_size)
        return out

    def validate(self, where: str) -> "ModelConfig":
        s = self.shapes
        bad = [k for k, v in s.items() if not isinstance(v, int) or v <= 0]
        if bad:
            raise FormatError(f"{where}: {', '.join(bad)} must be positive integers, got {s}")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise FormatError(f"{where}: {self.num_experts_per_tok} experts per token out of {self.num_experts}")
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


def _kinds(pattern: int | None, n: int, window: Any) -> tuple[str, ...] | None:
    """A sliding-window pattern as per-layer kinds (every ``pattern``-th layer full, llama.cpp's and
    transformers' rule), or None without one."""
    if not pattern or not window:
        return None
    return tuple("full" if (i + 1) % pattern == 0 else "sliding" for i in range(n))


def _gemma(spec, shapes: Mapping[str, int], **given: Any) -> dict[str, Any]:
    """The Gemma fields of a family that has them (``spec.gemma``)."""
    if not getattr(spec, "gemma", False):
        return {}
    return {"embed_scale": float(shapes["hidden_size"]) ** 0.5, **given}


def config_from_gguf(gf, layer_map: LayerMap) -> ModelConfig:
    """From a :class:`~qadapt.formats.gguf.GGUFFile`'s metadata."""
    from .family import FAMILIES

    meta = gf.arch_metadata
    shapes = layer_map.normalise_gguf_metadata(meta)
    eps = meta.get("attention.layer_norm_rms_epsilon", meta.get("attention.layer_norm_epsilon", 1e-5))
    tie = "output.weight" not in gf.tensors
    rope = rope_from_gguf(gf, meta, shapes["head_dim"])
    spec = FAMILIES.get(layer_map.architecture)
    window = meta.get("attention.sliding_window") or None
    gemma = {}
    if spec is not None and spec.gemma:
        # llama.cpp's rules: queries scaled by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) on the 27B models
        # (their query_pre_attn_scalar; GGUF carries none); local layers' rotary base 10000 (Gemma 3)
        big = shapes["num_hidden_layers"] in spec.gguf_27b_layers
        scalar = shapes["hidden_size"] / shapes["num_attention_heads"] if big else shapes["head_dim"]
        local = None
        if spec.local_rope_theta:
            local = RopeSpec("default", spec.local_rope_theta, rope.dim, rope.max_positions)
        gemma = _gemma(spec, shapes, layer_kinds=_kinds(spec.swa_pattern, shapes["num_hidden_layers"], window),
                       attn_scale=float(scalar) ** -0.5, attn_softcap=meta.get("attn_logit_softcapping") or None,
                       final_softcap=meta.get("final_logit_softcapping") or None, local_rope=local)
    return ModelConfig(
        architecture=layer_map.architecture,
        **shapes,
        norm_eps=float(eps),
        rope=rope,
        context_length=rope.context(),
        sliding_window=window,
        tie_embeddings=tie,
        bos_token_id=gf.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_eos_tuple(gf.get("tokenizer.ggml.eos_token_id")),
        **gemma,
    ).validate(str(gf.path))


def config_from_hf(raw: Mapping[str, Any], layer_map: LayerMap, where: str, default_tie: bool) -> ModelConfig:
    """From a transformers ``config.json`` dict."""
    from .family import FAMILIES

    shapes = layer_map.normalise_hf_config(raw)
    rope = rope_from_hf(raw, shapes["head_dim"], where)
    eps = raw.get("rms_norm_eps", raw.get("layer_norm_epsilon", raw.get("layer_norm_eps", 1e-5)))
    window = raw.get("sliding_window")
    if raw.get("use_sliding_window") is False:
        window = None
    spec = FAMILIES.get(layer_map.architecture)
    gemma = {}
    if shapes.get("num_experts"):
        if raw.get("mlp_only_layers") or int(raw.get("decoder_sparse_step") or 1) != 1:
            raise UnsupportedError(f"{where}: dense MLP layers among the mixture-of-experts ones (`mlp_only_layers`, "
                                   "`decoder_sparse_step`) are not supported")
        gemma["norm_topk"] = bool(raw.get(spec.norm_topk_key, True)) if spec and spec.norm_topk_key else True
    if spec is not None and spec.gemma:
        types = raw.get("layer_types")
        if types is not None:
            kinds = tuple({"sliding_attention": "sliding", "full_attention": "full"}.get(t, t) for t in types)
            bad = [t for t in kinds if t not in ("full", "sliding")]
            if bad or len(kinds) != shapes["num_hidden_layers"]:
                raise FormatError(f"{where}: `layer_types` must list sliding_attention / full_attention for each of "
                                  f"the {shapes['num_hidden_layers']} layers, got {types!r}")
        else:
            kinds = _kinds(raw.get("sliding_window_pattern", spec.swa_pattern), shapes["num_hidden_layers"], window)
        local = rope_from_hf(raw, shapes["head_dim"], where, "sliding_attention") if spec.local_rope_theta else None
        scalar = raw.get("query_pre_attn_scalar")
        gemma = _gemma(spec, shapes, layer_kinds=kinds if window else None,
                       attn_scale=float(scalar) ** -0.5 if scalar else None,
                       attn_softcap=raw.get("attn_logit_softcapping") or None,
                       final_softcap=raw.get("final_logit_softcapping") or None, local_rope=local)
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
        **gemma,
    ).validate(where)
