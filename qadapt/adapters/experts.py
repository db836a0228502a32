"""LoRA on a mixture-of-experts layer's merged expert weights (PEFT's ``target_parameters``).

transformers 5 holds a layer's experts as two 3D parameters, ``mlp.experts.gate_up_proj`` [experts, 2 * ffn,
hidden] and ``mlp.experts.down_proj`` [experts, hidden, ffn] (Mixtral and Qwen3-MoE alike), and PEFT adapts
them with one ``ParamWrapper`` each: ``lora_A`` [experts * r, in] is expert-major (expert e's rows are
``A[e*r:(e+1)*r]``) and ``lora_B`` [out, r * experts] rank-major (expert e's columns are ``B[:, e::experts]``),
PEFT's ``einsum("o r e, e r i -> e o i")``. Two parameters on one module nest, so the file names one of them
``experts.base_layer``; which is which follows from the factors' shapes (gate_up reads the hidden size and
writes twice the expert width; down the reverse), never from the nesting.

qadapt runs experts as separate linears (a GGUF file's merged tensor sliced per expert), so each pair becomes
per-expert factors on the layer map's expert modules: gate_up's B rows split into the gate and up halves,
which share A. Adapters saved before transformers 5 name the per-expert modules themselves and need nothing here.
"""

from __future__ import annotations

import re
from typing import Any

import torch

#: where transformers 5 keeps a layer's merged experts, for every mixture-of-experts family qadapt runs
MERGED_MODULE = "model.layers.{i}.mlp.experts"
_MERGED_RX = re.compile(r"model\.layers\.(\d+)\.mlp\.experts((?:\.base_layer)*)")
#: merged parameter -> the per-expert roles its output rows hold, in order
MERGED_ROLES = {"gate_up_proj": ("expert_gate", "expert_up"), "down_proj": ("expert_down",)}


def merged_key(layer_idx: int, role: str) -> str:
    """The transformers 5 parameter that holds ``role`` (an expert role) of block ``layer_idx``."""
    param = next(p for p, roles in MERGED_ROLES.items() if role in roles)
    return f"{MERGED_MODULE.format(i=layer_idx)}.{param}"


def selects(target_parameters, key: str) -> bool:
    """PEFT's match of a ``target_parameters`` entry: the whole key or a dotted suffix of it."""
    return any(key == t or key.endswith(f".{t}") for t in target_parameters or ())


def split_merged(parts: dict[str, dict[str, torch.Tensor]], cfg, layer_map, shapes: dict[str, int]
                 ) -> tuple[dict[str, tuple[dict[str, torch.Tensor], float]], list[str], list[str]]:
    """Take the merged-expert entries out of ``parts`` (module -> tensors): per-expert module path ->
    (its A/B, the scale of the merged parameter's rank and alpha), the problems found, and the merged
    parameters the config does not target (left out, as PEFT leaves them)."""
    out: dict[str, tuple[dict[str, torch.Tensor], float]] = {}
    problems: list[str] = []
    ignored: list[str] = []
    n_exp = shapes.get("num_experts", 0)
    for module in [m for m in parts if _MERGED_RX.fullmatch(m)]:
        p = parts.pop(module)
        i = int(_MERGED_RX.fullmatch(module).group(1))
        a, b = p.get("A"), p.get("B")
        if not n_exp:
            problems.append(f"module `{module}` holds LoRA on merged experts, but this {layer_map.architecture} base "
                            "has none")
            continue
        if a is None or b is None or set(p) - {"A", "B"}:
            problems.append(f"module `{module}`: LoRA on merged experts takes lora_A and lora_B only, found "
                            f"{sorted(p)}")
            continue
        specs = {s.role: s for s in layer_map.layers if s.per_expert}
        param = _which(a, b, specs, shapes)
        if param is None or a.shape[0] % n_exp or b.shape[1] != a.shape[0]:
            want = {k: (specs[r[0]].shape(shapes)[0], sum(specs[x].shape(shapes)[1] for x in r))
                    for k, r in MERGED_ROLES.items()}
            problems.append(f"module `{module}`: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} fit no merged "
                            f"expert parameter of this base ({n_exp} experts; (in, out) "
                            + ", ".join(f"{k} {v}" for k, v in want.items()) + ")")
            continue
        key = f"{MERGED_MODULE.format(i=i)}.{param}"
        if not selects(cfg.target_parameters, key):
            ignored.append(key)
            continue
        r = a.shape[0] // n_exp
        a3, b3 = a.reshape(n_exp, r, a.shape[1]), b.reshape(b.shape[0], r, n_exp)
        roles = MERGED_ROLES[param]
        rows = [specs[role].shape(shapes)[1] for role in roles]
        for e in range(n_exp):
            be = b3[:, :, e]
            for role, half in zip(roles, be.split(rows, 0)):
                path = specs[role].module_path(i, e)
                out[path] = ({"A": a3[e].contiguous(), "B": half.contiguous()}, cfg.scale(key))
    return out, problems, ignored


def _which(a: torch.Tensor, b: torch.Tensor, specs: dict[str, Any], shapes: dict[str, int]) -> str | None:
    for param, roles in MERGED_ROLES.items():
        in_f = specs[roles[0]].shape(shapes)[0]
        out_f = sum(specs[r].shape(shapes)[1] for r in roles)
        if a.shape[1] == in_f and b.shape[0] == out_f:
            return param
    return None
