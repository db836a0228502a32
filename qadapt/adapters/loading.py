"""Turn a PEFT adapter folder into a :class:`LoraAdapter` that fits a given base model.

What applies is what PEFT 0.21 would apply, decided by the config as PEFT decides it: LoRA on the modules
its ``target_modules`` / ``exclude_modules`` / ``layers_to_transform`` select (tensors in the file for other
modules are reported and left out, as PEFT leaves them), DoRA magnitudes, ``lora_bias``, LoRA on the token
embedding, the saved modules PEFT loads back into the model (``modules_to_save``, the ``base_layer`` of a
targeted embedding or output layer, trained biases with ``bias="all"|"lora_only"``), trainable token rows
and aLoRA's invocation tokens. Every check happens here, at load time, and names the adapter and the layer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterError, did_you_mean
from ..layer_maps import LayerMap, expert_of
from .experts import merged_key, selects, split_merged
from .lora import EmbeddingParts, LoraAdapter, LoraFactors, SavedModule
from .peft_format import LoraAdapterConfig, load_adapter_parts, read_adapter_config
from .tensors import LORA_KINDS

log = logging.getLogger(__name__)


def build_adapter(
    name: str,
    source: str,
    folder: Path,
    layer_map: LayerMap,
    shapes: dict[str, int],
    base_format: str,
    base_id: str | None = None,
    dtype=None,
    strict: bool = False,
) -> LoraAdapter:
    """Load and check an adapter; ``strict`` turns warnings about its contents (NaN/Inf weights) into errors."""
    if not name or not isinstance(name, str):
        raise AdapterError(f"adapter from {source}: a non-empty name is required")
    cfg = read_adapter_config(folder)
    bad = cfg.unsupported_features()
    if bad:
        raise AdapterError(f"adapter `{name}` ({folder}): " + "; ".join(bad))
    if base_id and cfg.base_model_name_or_path and not _same_base(cfg.base_model_name_or_path, base_id):
        log.warning("adapter `%s` was trained on `%s`, the base here is `%s`", name, cfg.base_model_name_or_path,
                    base_id)
    plan = plan_adapter(cfg, layer_map, shapes)
    if plan.problems:
        raise AdapterError(f"adapter `{name}` ({folder}) does not fit this {layer_map.architecture} base:\n  - "
                           + "\n  - ".join(plan.problems))
    b = _Builder(name, cfg, layer_map, shapes, base_format, plan, strict)
    parts = load_adapter_parts(folder, dtype)
    experts, b.problems, b.ignored = split_merged(parts, cfg, layer_map, shapes)
    for module, tensors in parts.items():
        b.module(module, tensors)
    for module, (tensors, scale) in experts.items():
        b.module(module, tensors, scale)
    if b.problems:
        raise AdapterError(f"adapter `{name}` ({folder}) does not fit this {layer_map.architecture} base:\n  - "
                           + "\n  - ".join(b.problems))
    if b.ignored:
        log.warning("adapter `%s`: %d module(s) in its file are not targeted by its config, and PEFT leaves them "
                    "out: not applied (%s)", name, len(b.ignored), ", ".join(b.ignored[:4])
                    + (", ..." if len(b.ignored) > 4 else ""))
    emb = b.embedding()
    if not b.factors and not b.saved and emb is None:
        also = (f" (its file holds weights only for modules its config does not target, such as `{b.ignored[0]}`"
                f"{did_you_mean(b.ignored[0], sorted(plan.targets))})" if b.ignored else "")
        raise AdapterError(f"adapter `{name}` ({folder}) has no weights for any module its config targets on this "
                           f"base: it would change nothing{also}")
    missing = sorted(plan.targets - set(b.factors))
    if missing:
        log.warning("adapter `%s`: its config targets %d module(s) with no weights in the file, e.g. %s",
                    name, len(missing), missing[0])
    return LoraAdapter(name, source, Path(folder), cfg, b.factors, b.saved, emb, cfg.alora_invocation_tokens)


class Plan:
    """What a config selects on a base, as PEFT selects it: LoRA targets, the embedding, saved modules, token
    rows; ``problems`` lists what PEFT would refuse."""

    def __init__(self):
        self.targets: set[str] = set()
        self.embedding_lora = False
        self.saved: set[str] = set()
        self.token_ids: list[int] | None = None
        self.problems: list[str] = []


def plan_adapter(cfg: LoraAdapterConfig, layer_map: LayerMap, shapes: dict[str, int]) -> Plan:
    """The modules ``cfg`` selects on a base with this layer map and normalised shapes."""
    plan = Plan()
    modules = [r.path for r in layer_map.modules(shapes)]
    plan.targets = {p for p in modules if cfg.matches(p, layer_map)}
    if cfg.target_parameters:  # merged expert parameters (transformers 5): their per-expert modules here
        hits = {r.path for r in layer_map.modules(shapes) if r.spec.per_expert
                and selects(cfg.target_parameters, merged_key(r.layer_idx, r.spec.role))}
        if not hits:
            plan.problems.append(f"its `target_parameters` {list(cfg.target_parameters)} match no parameter of this "
                                 f"{layer_map.architecture} base (merged mixture-of-experts weights: "
                                 "`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`)")
        plan.targets |= hits
    emb = layer_map.embedding_path
    plan.embedding_lora = emb is not None and cfg.matches_embedding(emb)
    replaceable = modules + ([emb] if emb else [])
    for entry in cfg.modules_to_save or ():
        hits = [p for p in replaceable if p == entry or p.endswith(f".{entry}")]
        if not hits:
            plan.problems.append(f"`modules_to_save` entry `{entry}` is not a module of this base that an adapter can "
                                 f"replace (the token embedding or a linear layer{did_you_mean(entry, replaceable)})")
        plan.saved.update(hits)
    tti = cfg.trainable_token_indices
    if tti is not None:
        if isinstance(tti, dict):
            for module, ids in tti.items():
                if emb is None or not (emb == module or emb.endswith(f".{module}")):
                    plan.problems.append(f"`trainable_token_indices` names `{module}`: only the token embedding "
                                         f"({emb}) takes trainable tokens here")
                plan.token_ids = list(ids)  # in the config's order: the saved rows follow it
        else:
            plan.token_ids = list(tti)
    named = cfg.target_modules is not None and not isinstance(cfg.target_modules, str)
    if not plan.targets and not plan.embedding_lora and not plan.saved and plan.token_ids is None:
        what = list(cfg.target_modules) if named else cfg.target_modules
        plan.problems.append(f"its `target_modules` {what!r} match no layer of this {layer_map.architecture} base "
                             "(PEFT refuses it: target modules not found in the base model)")
    return plan


class _Builder:
    """Sorts an adapter file's tensors into factors, saved modules and embedding parts."""

    def __init__(self, name, cfg, layer_map, shapes, base_format, plan: Plan, strict: bool):
        self.name, self.cfg, self.lm, self.shapes, self.fmt, self.plan, self.strict = (
            name, cfg, layer_map, shapes, base_format, plan, strict)
        self.factors: dict[str, LoraFactors] = {}
        self.saved: dict[str, SavedModule] = {}
        self.emb: dict[str, Any] = {}
        self.problems: list[str] = []
        self.ignored: list[str] = []

    def module(self, path: str, parts: dict[str, torch.Tensor], scale: float | None = None) -> None:
        """Sort one module's tensors (``scale``: its LoRA scale where the config's patterns name another
        module, as for merged experts)."""
        if not all(bool(t.isfinite().all()) for t in parts.values()):
            if self.strict:
                self.problems.append(f"module `{path}` has NaN or infinite weights (refused with strict)")
                return
            log.warning("adapter `%s`: module `%s` has NaN or infinite weights; its outputs will be NaN/Inf wherever "
                        "it is active", self.name, path)
        if path == self.lm.embedding_path:
            return self._embedding(path, parts)
        hit = self.lm.match_path(path)
        lora = set(parts) & LORA_KINDS
        targeted = path in self.plan.targets
        if hit is None:
            if (lora and self._named_target(path)) or path in self.plan.saved:
                concrete = [r.path for r in self.lm.modules(self.shapes)]
                self.problems.append(f"module `{path}` is not an adapter-targetable layer of {self.lm.architecture}"
                                     f"{did_you_mean(path, concrete)}")
            else:
                self.ignored.append(path)
            return
        spec, idx = hit
        if idx is not None and idx >= self.shapes["num_hidden_layers"]:
            self.problems.append(f"module `{path}`: block {idx} does not exist (the base has "
                                 f"{self.shapes['num_hidden_layers']} blocks)")
            return
        e = expert_of(path, spec)
        if e is not None and e >= self.shapes.get("num_experts", 0):
            self.problems.append(f"module `{path}`: expert {e} does not exist (the base has "
                                 f"{self.shapes.get('num_experts', 0)} experts per layer)")
            return
        if self.fmt not in spec.formats:
            self.problems.append(f"module `{path}`: adapters on `{spec.name}` are not supported on a {self.fmt} base")
            return
        in_f, out_f = spec.shape(self.shapes)
        if lora:
            if not targeted:
                self.ignored.append(path)
            elif "emb_A" in parts:
                self.problems.append(f"module `{path}` holds embedding LoRA tensors but is a linear layer")
            else:
                self._factors(path, parts, in_f, out_f, scale)
        saved = self._saved(path, parts, targeted)
        if saved is not None:
            if saved.weight is not None and tuple(saved.weight.shape) != (out_f, in_f):
                self.problems.append(f"module `{path}`: saved weight {tuple(saved.weight.shape)} does not fit the "
                                     f"layer [{out_f}, {in_f}]" + (" (a resized vocabulary: not supported yet)"
                                                                   if spec.role == "lm_head" else ""))
            else:
                self.saved[path] = saved

    def _named_target(self, path: str) -> bool:
        t = self.cfg.target_modules
        if t is None or isinstance(t, str):
            return isinstance(t, str) and t.lower() != "all-linear"
        return any(path == x or path.endswith(f".{x}") for x in t)

    def _factors(self, path: str, parts: dict[str, torch.Tensor], in_f: int, out_f: int,
                 scale: float | None = None) -> None:
        a, b = parts.get("A"), parts.get("B")
        if a is None:
            self.problems.append(f"module `{path}` has DoRA or bias tensors but no lora_A/lora_B")
            return
        if a.shape[1] != in_f or b.shape[0] != out_f:
            self.problems.append(f"module `{path}`: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit the "
                                 f"base layer (in={in_f}, out={out_f}): expected A [r, {in_f}] and B [{out_f}, r]")
            return
        r, _alpha = self.cfg.rank_alpha(path)
        if a.shape[0] != r and scale is None:
            log.warning("adapter `%s`: module `%s` has rank %d, its config says %d", self.name, path, a.shape[0], r)
        mag = parts.get("magnitude")
        if self.cfg.use_dora and mag is None:
            self.problems.append(f"module `{path}`: `use_dora` is true but the file has no lora_magnitude_vector")
            return
        if mag is not None and not self.cfg.use_dora:
            log.warning("adapter `%s`: module `%s` has a DoRA magnitude but `use_dora` is false: not applied (as PEFT)",
                        self.name, path)
            mag = None
        bias = parts.get("B_bias") if self.cfg.lora_bias else None
        if "B_bias" in parts and not self.cfg.lora_bias:
            log.warning("adapter `%s`: module `%s` has a lora_B bias but `lora_bias` is false: not applied (as PEFT)",
                        self.name, path)
        self.factors[path] = LoraFactors(a, b, self.cfg.scale(path) if scale is None else scale, bias=bias,
                                         magnitude=mag)

    def _saved(self, path: str, parts: dict[str, torch.Tensor], targeted: bool) -> SavedModule | None:
        """The module's own parameters PEFT would load back: a modules_to_save copy, a targeted module's
        base_layer (PEFT saves the output layer's with it), trained biases (``bias`` all / lora_only)."""
        weight, bias = parts.get("weight"), parts.get("bias")
        keep_w = weight is not None and (path in self.plan.saved or targeted)
        keep_b = bias is not None and (path in self.plan.saved or self.cfg.bias == "all"
                                       or (self.cfg.bias == "lora_only" and targeted))
        if weight is not None and not keep_w or bias is not None and not keep_b:
            self.ignored.append(path)
        if not (keep_w or keep_b):
            return None
        return SavedModule(weight if keep_w else None, bias if keep_b else None)

    def _embedding(self, path: str, parts: dict[str, torch.Tensor]) -> None:
        if "A" in parts or "B" in parts:
            self.problems.append(f"module `{path}` is the token embedding but holds lora_A/lora_B (a linear's "
                                 "tensors); PEFT writes lora_embedding_A/B there")
            return
        if "emb_A" in parts:
            if self.plan.embedding_lora:
                self.emb.update(A=parts["emb_A"], B=parts["emb_B"], scale=self.cfg.scale(path))
            else:
                self.ignored.append(path)
        if "weight" in parts:
            if self.plan.embedding_lora or path in self.plan.saved:
                self.emb["table"] = parts["weight"]
            else:
                self.ignored.append(path)
        if "tt_delta" in parts:
            ids = self.plan.token_ids
            if ids is None:
                self.ignored.append(path)
            elif parts["tt_delta"].shape[0] != len(ids):
                self.problems.append(f"module `{path}`: {parts['tt_delta'].shape[0]} trainable token rows for "
                                     f"{len(ids)} `trainable_token_indices`")
            else:
                self.emb.update(token_ids=torch.tensor(ids, dtype=torch.long), token_rows=parts["tt_delta"])

    def embedding(self) -> EmbeddingParts | None:
        return EmbeddingParts(**self.emb) if self.emb else None


def _same_base(a: str, b: str) -> bool:
    norm = lambda s: s.rstrip("/").split("/")[-1].lower().removesuffix(".gguf")  # noqa: E731
    return a == b or norm(a) == norm(b) or norm(a) in norm(b) or norm(b) in norm(a)
