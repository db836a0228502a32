"""Turn a PEFT adapter folder into :class:`LoraAdapter` factors that fit a given base model.

Every check happens here, at load time, and names the adapter and the layer:
unsupported PEFT features, modules the architecture or base format does not
have, shapes that do not fit, and an adapter that would change nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import AdapterError
from ..layer_maps import LayerMap
from .lora import LoraAdapter, LoraFactors
from .peft_format import load_adapter_tensors, read_adapter_config

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
    tensors = load_adapter_tensors(folder, dtype)
    factors: dict[str, LoraFactors] = {}
    problems = []
    for path, (a, b) in tensors.items():
        hit = layer_map.match_path(path)
        if hit is None:
            from ..errors import did_you_mean

            concrete = [r.path for r in layer_map.enumerate_modules(shapes["num_hidden_layers"])]
            problems.append(f"module `{path}` is not an adapter-targetable layer of {layer_map.architecture}"
                            f"{did_you_mean(path, concrete)}")
            continue
        spec, idx = hit
        if idx is not None and idx >= shapes["num_hidden_layers"]:
            problems.append(f"module `{path}`: block {idx} does not exist (the base has "
                            f"{shapes['num_hidden_layers']} blocks)")
            continue
        if base_format not in spec.formats:
            problems.append(f"module `{path}`: adapters on `{spec.name}` are not supported on a {base_format} base")
            continue
        in_f, out_f = spec.shape(shapes)
        if a.shape[1] != in_f or b.shape[0] != out_f:
            problems.append(f"module `{path}`: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit the "
                            f"base layer (in={in_f}, out={out_f}): expected A [r, {in_f}] and B [{out_f}, r]")
            continue
        if not (bool(a.isfinite().all()) and bool(b.isfinite().all())):
            msg = f"adapter `{name}`: module `{path}` has NaN or infinite weights"
            if strict:
                problems.append(f"module `{path}` has NaN or infinite weights (refused with strict)")
                continue
            log.warning("%s; its outputs will be NaN/Inf wherever it is active", msg)
        r, _alpha = cfg.rank_alpha(path)
        if a.shape[0] != r:
            log.warning("adapter `%s`: module `%s` has rank %d, its config says %d", name, path, a.shape[0], r)
        factors[path] = LoraFactors(a, b, cfg.scale(path))
    if problems:
        raise AdapterError(f"adapter `{name}` ({folder}) does not fit this {layer_map.architecture} base:\n  - "
                           + "\n  - ".join(problems))
    if not factors:
        raise AdapterError(f"adapter `{name}` ({folder}) has no LoRA weights for any layer of this base: "
                           "it would change nothing")
    matched = {r.path for r in layer_map.enumerate_modules(shapes["num_hidden_layers"]) if cfg.matches(r.path, layer_map)}
    missing = sorted(matched - set(factors))
    if missing:
        log.warning("adapter `%s`: its config targets %d module(s) with no weights in the file, e.g. %s",
                    name, len(missing), missing[0])
    return LoraAdapter(name, source, Path(folder), cfg, factors)


def _same_base(a: str, b: str) -> bool:
    norm = lambda s: s.rstrip("/").split("/")[-1].lower().removesuffix(".gguf")  # noqa: E731
    return a == b or norm(a) == norm(b) or norm(a) in norm(b) or norm(b) in norm(a)
