"""Adapter mixes: several loaded LoRA adapters combined into one, per request.

Two kinds, both giving an ordinary :class:`~qadapt.adapters.lora.LoraAdapter` the batched engine applies
like any other:

* PEFT's ``add_weighted_adapter`` strategies, which LoRAX's ``merged_adapters`` names: ``linear``,
  ``ties``, ``dare_linear``, ``dare_ties`` and ``magnitude_prune``. As in PEFT 0.21, each layer's ``A`` and
  ``B`` are combined separately, ``A`` with weights ``sign(w*s) * sqrt(|w*s|)`` and ``B`` with
  ``sqrt(|w*s|)`` (``s``: that adapter's scaling on the layer); every adapter must have the same rank,
  which the mix keeps, with ``lora_alpha = r``. These are approximations of the weighted sum (PEFT's own
  words), reproduced here to the bit so that a mix served by qadapt is the mix PEFT would save. DARE's
  random pruning draws from a generator seeded with the request's seed (0 by default), walking the layers
  in the model's module order, ``A`` tensors then ``B`` tensors, each adapter in turn: PEFT's order, so
  PEFT gives the same masks when its global generator is seeded where it starts merging (after it has
  initialised the new adapter's layers, which draws too).
* ``cat``: the exact weighted sum ``sum_i w_i * s_i * B_i A_i`` (llama.cpp's per-request ``lora`` scales,
  OpenAI requests' ``adapters`` with weights) as one adapter of rank ``sum r_i``: PEFT's ``cat``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..errors import InputError
from .lora import LoraAdapter, LoraFactors

STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "cat")
SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class MixSpec:
    """What a mix is: its parts (adapter keys and weights) and how they combine. Hashable: the cache key."""

    keys: tuple[str, ...]
    weights: tuple[float, ...]
    strategy: str = "linear"
    density: float = 1.0
    majority_sign: str = "total"
    seed: int = 0

    def check(self) -> "MixSpec":
        if not self.keys:
            raise InputError("a mix needs at least one adapter (`ids` is empty)")
        if len(self.keys) != len(self.weights):
            raise InputError(f"a mix needs one weight per adapter: {len(self.keys)} ids, {len(self.weights)} weights")
        if len(set(self.keys)) != len(self.keys):
            raise InputError("an adapter appears twice in the mix (`ids`)")
        if self.strategy not in STRATEGIES:
            raise InputError(f"merge_strategy `{self.strategy}` is not one of {', '.join(STRATEGIES)}")
        if self.majority_sign not in SIGN_METHODS:
            raise InputError(f"majority_sign_method `{self.majority_sign}` is not one of {', '.join(SIGN_METHODS)}")
        if not 0 <= self.density <= 1:
            raise InputError(f"density must be in [0, 1], got {self.density}")
        if self.strategy.startswith("dare") and self.density == 0:
            raise InputError("density 0 with a dare strategy prunes every weight and divides by zero; use > 0")
        if not all(math.isfinite(w) for w in self.weights):
            raise InputError("mix weights must be finite numbers")
        return self

    @property
    def effective(self) -> str:
        """PEFT treats a one-adapter mix as ``linear`` whatever the strategy (``cat`` stays exact)."""
        return "linear" if len(self.keys) == 1 and self.strategy != "cat" else self.strategy


def mix(name: str, adapters: Sequence[LoraAdapter], spec: MixSpec, module_order: Sequence[str]) -> LoraAdapter:
    """The adapter ``spec`` describes, from ``adapters`` (in ``spec.keys`` order); ``module_order``: the
    model's module paths in PEFT's ``named_modules`` order (DARE's draws follow it)."""
    spec.check()
    strategy = spec.effective
    ranks = {a.name: _rank(a) for a in adapters}
    if strategy != "cat" and len(set(ranks.values())) > 1:
        listed = ", ".join(f"{n} (r={r})" for n, r in ranks.items())
        raise InputError(f"merge_strategy `{strategy}` needs adapters of one rank (PEFT's rule); got {listed}; "
                         "the exact weighted sum (`cat`) takes any ranks")
    paths = set().union(*(a.factors for a in adapters))
    position = {p: i for i, p in enumerate(module_order)}
    ordered = sorted(paths, key=lambda p: (position.get(p, len(position)), p))
    gen = torch.Generator().manual_seed(spec.seed)
    factors: dict[str, LoraFactors] = {}
    for path in ordered:
        parts = [(a.factors[path], w) for a, w in zip(adapters, spec.weights) if path in a.factors]
        if strategy == "cat":
            factors[path] = _cat(parts)
        else:
            factors[path] = _combine(parts, strategy, spec, gen)
    if strategy != "cat" and adapters[0].config is not None and getattr(adapters[0].config, "use_rslora", False):
        r = next(iter(ranks.values()))  # PEFT copies use_rslora with lora_alpha = r: the scaling is sqrt(r)
        factors = {p: LoraFactors(f.A, f.B, math.sqrt(r)) for p, f in factors.items()}
    return LoraAdapter(name, "mix of " + ", ".join(a.name for a in adapters), Path("."), None, factors)


def _rank(a: LoraAdapter) -> int:
    return max((f.A.shape[0] for f in a.factors.values()), default=0)


def _cat(parts: list[tuple[LoraFactors, float]]) -> LoraFactors:
    A = torch.cat([f.A.float() * (w * f.scale) for f, w in parts], 0)  # a mix is float32, whatever its parts
    B = torch.cat([f.B.float() for f, _ in parts], 1)
    return LoraFactors(A.contiguous(), B.contiguous(), 1.0)


def _combine(parts: list[tuple[LoraFactors, float]], strategy: str, spec: MixSpec,
             gen: torch.Generator) -> LoraFactors:
    ws = [w * f.scale for f, w in parts]
    wa = torch.tensor([math.sqrt(abs(w)) * (1 if w >= 0 else -1) for w in ws])
    wb = torch.tensor([math.sqrt(abs(w)) for w in ws])
    out = []
    for tensors, weights in (([f.A.float() for f, _ in parts], wa), ([f.B.float() for f, _ in parts], wb)):
        out.append(_merge(tensors, weights, strategy, spec, gen).float().contiguous())
    return LoraFactors(out[0], out[1], 1.0)


def _merge(tensors: list[torch.Tensor], weights: torch.Tensor, strategy: str, spec: MixSpec,
           gen: torch.Generator) -> torch.Tensor:
    """One of PEFT's task-arithmetic merges of same-shaped tensors (peft.utils.merge_utils' definitions)."""
    if strategy in ("ties", "magnitude_prune"):
        tensors = [_prune_magnitude(t, spec.density) for t in tensors]
    elif strategy.startswith("dare"):
        tensors = [_prune_random(t, spec.density, gen) for t in tensors]
    stacked = torch.stack(tensors, 0)
    w = weights.view(-1, *([1] * (stacked.dim() - 1)))
    if strategy in ("ties", "dare_ties"):
        sign = stacked.sign()
        magnitude = stacked.sum(0) if spec.majority_sign == "total" else sign.sum(0)
        keep = sign == torch.where(magnitude >= 0, 1, -1)
        kept = (stacked * w * keep).sum(0)
        return kept / torch.clamp(keep.sum(0), min=1.0)
    return (stacked * w).sum(0)


def _prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    mask[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True)[1]] = 1
    return t * mask.reshape(t.shape)


def _prune_random(t: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return t
    return t * torch.bernoulli(torch.full_like(t, density), generator=gen) / density
