"""mistral.rs ordering files: read, write, create, rename adapters, add preloads.

An ordering names the adapters (``order``), gives each adapted module its
X-LoRA classifier row (``layers``) and lists adapters to preload. The reader
checks JSON types only and collects soft issues as warnings; whether the
content fits a model is :mod:`qadapt.check`'s job, so that every problem can be
reported at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import FormatError, InputError, did_you_mean
from .io import read_json, write_json

log = logging.getLogger(__name__)

KEYS = ("order", "layers", "base_model_id", "preload_adapters")  # mistral.rs's field order
XLORA_ORDER_WARNING = (
    "for X-LoRA the order of `order` must be the order the adapters had in training "
    "(it indexes the classifier's outputs)"
)


@dataclass(frozen=True)
class Preload:
    """An adapter loaded at start so it can be activated later (``preload_adapters`` entry)."""

    name: str | None
    adapter_model_id: str | None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "adapter_model_id": self.adapter_model_id}


@dataclass(frozen=True)
class Ordering:
    base_model_id: str | None = None
    order: tuple[str, ...] | None = None
    layers: dict[str, int] | None = None
    preload_adapters: tuple[Preload, ...] = ()
    source: str = field(default="<memory>", compare=False)
    #: soft issues found while reading (unknown keys, missing base_model_id)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.order is not None:
            out["order"] = list(self.order)
        if self.layers is not None:
            out["layers"] = dict(self.layers)
        if self.base_model_id is not None:
            out["base_model_id"] = self.base_model_id
        if self.preload_adapters:
            out["preload_adapters"] = [p.to_json() for p in self.preload_adapters]
        return out


# ---------------------------------------------------------------------- reading
def _type_error(src: str, key: str, want: str, value: Any) -> FormatError:
    from .adapters.peft_format import json_type

    return FormatError(f"ordering file {src}: key `{key}` must be {want}, got {json_type(value)}")


def _str_list(src: str, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _type_error(src, key, "a list of strings", value)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _type_error(src, f"{key}[{i}]", "a string", item)
    return tuple(value)


def _layers(src: str, value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        raise _type_error(src, "layers", "an object of module path -> integer", value)
    for path, idx in value.items():
        if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
            raise _type_error(src, f"layers.{path}", "a non-negative integer", idx)
    return dict(value)


def _preloads(src: str, value: Any) -> tuple[Preload, ...]:
    if not isinstance(value, list):
        raise _type_error(src, "preload_adapters", "a list of {name, adapter_model_id} objects", value)
    out = []
    for i, item in enumerate(value):
        key = f"preload_adapters[{i}]"
        if not isinstance(item, dict):
            raise _type_error(src, key, "an object with `name` and `adapter_model_id`", item)
        for sub in ("name", "adapter_model_id"):
            if item.get(sub) is not None and not isinstance(item[sub], str):
                raise _type_error(src, f"{key}.{sub}", "a string", item[sub])
        out.append(Preload(item.get("name"), item.get("adapter_model_id")))
    return tuple(out)


def parse_ordering(data: Any, source: str = "<memory>", log_warnings: bool = True) -> Ordering:
    """Build an :class:`Ordering` from decoded JSON; wrong types raise FormatError naming the key."""
    if not isinstance(data, dict):
        raise _type_error(source, "(top level)", "a JSON object", data)
    warnings = [
        f"unknown key `{k}` is ignored (mistral.rs ignores it too){did_you_mean(k, KEYS)}"
        for k in data
        if k not in KEYS
    ]
    base = data.get("base_model_id")
    if base is not None and not isinstance(base, str):
        raise _type_error(source, "base_model_id", "a string", base)
    if base is None:
        warnings.append(
            "no `base_model_id`: older mistral.rs ordering files lack it, current mistral.rs requires it; "
            "give --arch or --model to check against a model"
        )
    order = data.get("order")
    ordering = Ordering(
        base_model_id=base,
        order=None if order is None else _str_list(source, "order", order),
        layers=None if data.get("layers") is None else _layers(source, data["layers"]),
        preload_adapters=() if data.get("preload_adapters") is None else _preloads(source, data["preload_adapters"]),
        source=source,
        warnings=tuple(warnings),
    )
    for w in warnings if log_warnings else ():
        log.warning("%s: %s", source, w)
    return ordering


def read_ordering(path: str | Path, log_warnings: bool = True) -> Ordering:
    """Read an ordering file; its soft issues are kept in ``.warnings`` (and logged unless the caller reports them)."""
    return parse_ordering(read_json(path, "ordering file"), str(path), log_warnings)


def write_ordering(path: str | Path, ordering: Ordering, force: bool = False) -> Path:
    """Write atomically; an existing file is replaced only with ``force``."""
    return write_json(path, ordering.to_json(), force=force)


# ---------------------------------------------------------------------- building
def split_list(text: str | Sequence[str], what: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]`` (mistral.rs scripts' comma lists); empty is an error."""
    items = text.split(",") if isinstance(text, str) else list(text)
    items = [s.strip() for s in items if s.strip()]
    if not items:
        raise InputError(f"{what}: expected a comma-separated list, got {text!r}")
    return items


def parse_assignment(text: str, what: str) -> tuple[str, str]:
    """``NAME=VALUE`` -> (name, value), for ``--adapter`` and ``--preload``."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise InputError(f"{what}: expected NAME=VALUE, got {text!r}")
    return name.strip(), value.strip()


def enumerate_layers(layer_map, num_hidden_layers: int, targets: Sequence[str], num_experts: int = 0) -> dict[str, int]:
    """PEFT's enumeration of the modules ``targets`` wraps: module path -> classifier row.

    ``targets`` follows PEFT's ``target_modules`` list rules (exact name or dotted
    suffix); a single ``all-linear`` is PEFT's shorthand. Each target must match
    something, or the ordering would silently adapt less than asked.
    """
    from .adapters.peft_format import ALL_LINEAR, LoraAdapterConfig

    modules = [m.path for m in layer_map.enumerate_modules(num_hidden_layers, num_experts=num_experts)]
    tm: Any = ALL_LINEAR if [t.lower() for t in targets] == [ALL_LINEAR] else tuple(targets)
    for t in [] if isinstance(tm, str) else targets:
        if not any(LoraAdapterConfig(target_modules=(t,)).matches(p, layer_map) for p in modules):
            raise InputError(
                f"target `{t}` matches no layer of a {layer_map.architecture} model"
                f"{did_you_mean(t, layer_map.target_names)}; targetable: {', '.join(layer_map.target_names)}"
            )
    cfg = LoraAdapterConfig(target_modules=tm)
    return {p: i for i, p in enumerate(p for p in modules if cfg.matches(p, layer_map))}


def create_ordering(
    layer_map, num_hidden_layers: int, targets: Sequence[str], names: Sequence[str], base_model_id: str | None,
    num_experts: int = 0,
) -> Ordering:
    """A new ordering, as mistral.rs's ``create_ordering.py`` writes it, built from the table without weights
    (``num_experts``: a mixture-of-experts model's experts per layer, whose layers may be targets too)."""
    layers = enumerate_layers(layer_map, num_hidden_layers, targets, num_experts)
    return Ordering(base_model_id=base_model_id, order=tuple(names), layers=layers)


def set_names(ordering: Ordering, names: Sequence[str]) -> Ordering:
    """The same ordering with new adapter names (``set_names.py``)."""
    log.warning(XLORA_ORDER_WARNING)
    return replace(ordering, order=tuple(names))


def add_preloads(ordering: Ordering, preloads: Iterable[Preload]) -> Ordering:
    """Add ``preload_adapters`` entries; a name already there is replaced (``lora_add_preload_adapters.py``)."""
    merged = {p.name: p for p in ordering.preload_adapters}
    for p in preloads:
        if p.name in merged:
            log.warning("preload adapter `%s` was already listed; replacing its adapter_model_id", p.name)
        merged[p.name] = p
    return replace(ordering, preload_adapters=tuple(merged.values()))
