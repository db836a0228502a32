"""One small spec per architecture family: what the decoder does that the layer map cannot say.

The layer map (``layer_maps/*.json``) lists the targetable linears and their
roles; this table adds the norm kind, the activation, the position scheme and
the names of the few non-linear tensors, in transformers' and GGUF's naming.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# role -> (transformers name template, GGUF name template); "{i}" is the block index
_LLAMA_TENSORS = {
    "embed": ("model.embed_tokens.weight", "token_embd.weight"),
    "attn_norm": ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    "final_norm": ("model.norm.weight", "output_norm.weight"),
}
_GPT2_TENSORS = {
    "embed": ("transformer.wte.weight", "token_embd.weight"),
    "pos_embed": ("transformer.wpe.weight", "position_embd.weight"),
    "attn_norm": ("transformer.h.{i}.ln_1.weight", "blk.{i}.attn_norm.weight"),
    "attn_norm_bias": ("transformer.h.{i}.ln_1.bias", "blk.{i}.attn_norm.bias"),
    "mlp_norm": ("transformer.h.{i}.ln_2.weight", "blk.{i}.ffn_norm.weight"),
    "mlp_norm_bias": ("transformer.h.{i}.ln_2.bias", "blk.{i}.ffn_norm.bias"),
    "final_norm": ("transformer.ln_f.weight", "output_norm.weight"),
    "final_norm_bias": ("transformer.ln_f.bias", "output_norm.bias"),
}
_QWEN_TENSORS = {
    "embed": ("transformer.wte.weight", "token_embd.weight"),
    "attn_norm": ("transformer.h.{i}.ln_1.weight", "blk.{i}.attn_norm.weight"),
    "mlp_norm": ("transformer.h.{i}.ln_2.weight", "blk.{i}.ffn_norm.weight"),
    "final_norm": ("transformer.ln_f.weight", "output_norm.weight"),
}


_QWEN3_TENSORS = {
    **_LLAMA_TENSORS,
    "q_norm": ("model.layers.{i}.self_attn.q_norm.weight", "blk.{i}.attn_q_norm.weight"),
    "k_norm": ("model.layers.{i}.self_attn.k_norm.weight", "blk.{i}.attn_k_norm.weight"),
}


_GEMMA2_TENSORS = {
    **_LLAMA_TENSORS,
    "post_attn_norm": ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.post_attention_norm.weight"),
    "mlp_norm": ("model.layers.{i}.pre_feedforward_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    "post_mlp_norm": ("model.layers.{i}.post_feedforward_layernorm.weight", "blk.{i}.post_ffw_norm.weight"),
}
_GEMMA3_TENSORS = {**_GEMMA2_TENSORS, **{k: v for k, v in _QWEN3_TENSORS.items() if k in ("q_norm", "k_norm")}}


@dataclass(frozen=True)
class FamilySpec:
    name: str
    norm: str = "rms"  # "rms" | "layer"
    act: str = "silu"  # "silu" | "gelu_tanh"
    positions: str = "rope"  # "rope" | "learned"
    tensors: dict[str, tuple[str, str]] = field(default_factory=lambda: dict(_LLAMA_TENSORS))
    tie_embeddings_default: bool = False
    qk_norm: bool = False  # an RMSNorm over each query and key head, before rotary (Qwen3, Gemma 3)
    # Gemma: norms stored as w and applied as 1 + w in transformers (llama.cpp's converter adds the 1), norms
    # after attention and MLP too, embeddings scaled by sqrt(hidden), GeGLU; the config's sliding pattern
    # (every n-th layer full), the local layers' rotary base in GGUF, the 27B layer counts whose queries
    # llama.cpp scales by 1/sqrt(hidden/heads)
    gemma: bool = False
    swa_pattern: int | None = None
    local_rope_theta: float | None = None
    gguf_27b_layers: tuple[int, ...] = ()
    # mixture of experts: the config key that says whether top-k routing weights are renormalised (None:
    # always, as Mixtral)
    norm_topk_key: str | None = None

    def tensor_name(self, role: str, fmt: str, i: int | None = None) -> str | None:
        """The tensor name of ``role`` in ``fmt`` ("hf" or "gguf"), or None if the family has none."""
        pair = self.tensors.get(role)
        if pair is None:
            return None
        name = pair[0 if fmt == "hf" else 1]
        return name.format(i=i) if i is not None else name


FAMILIES: dict[str, FamilySpec] = {
    "llama": FamilySpec("llama"),
    "mistral": FamilySpec("mistral"),
    "qwen2": FamilySpec("qwen2"),
    "qwen3": FamilySpec("qwen3", tensors=dict(_QWEN3_TENSORS), qk_norm=True),
    "phi3": FamilySpec("phi3"),
    "qwen": FamilySpec("qwen", tensors=dict(_QWEN_TENSORS)),
    "gemma2": FamilySpec("gemma2", act="gelu_tanh", tensors=dict(_GEMMA2_TENSORS), tie_embeddings_default=True,
                         gemma=True, swa_pattern=2, gguf_27b_layers=(46,)),
    "gemma3": FamilySpec("gemma3", act="gelu_tanh", tensors=dict(_GEMMA3_TENSORS), tie_embeddings_default=True,
                         qk_norm=True, gemma=True, swa_pattern=6, local_rope_theta=10000.0, gguf_27b_layers=(62,)),
    "mixtral": FamilySpec("mixtral"),
    "qwen3_moe": FamilySpec("qwen3_moe", tensors=dict(_QWEN3_TENSORS), qk_norm=True, norm_topk_key="norm_topk_prob"),
    "gpt2": FamilySpec(
        "gpt2", norm="layer", act="gelu_tanh", positions="learned", tensors=dict(_GPT2_TENSORS),
        tie_embeddings_default=True,
    ),
}
