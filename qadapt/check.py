"""``qadapt check``: everything wrong with an ordering file (and its adapters) for a base model, at once.

The checks are independent so one run lists every problem: layer names the
architecture lacks, indices that do not form PEFT's enumeration, adapters that
target nothing or have the wrong shapes. Problems make the ordering invalid;
warnings do not.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import InputError, QadaptError, SourceError, UnsupportedError, did_you_mean
from .layer_maps import LayerMap, base_format_of, expert_of, supported_architectures
from .model_info import ModelInfo, describe_model
from .ordering import Ordering, read_ordering


@dataclass(frozen=True)
class Item:
    code: str  # stable machine name, e.g. ``unknown-layer``
    message: str
    where: str = ""  # ``layers.<path>``, ``order[2]``, ``adapter NAME``, ``model``


@dataclass
class CheckReport:
    ordering: str
    architecture: str | None = None
    quant: str | None = None
    base_format: str = "full"
    problems: list[Item] = field(default_factory=list)
    warnings: list[Item] = field(default_factory=list)
    #: per adapter, what qadapt will apply (see :func:`adapter_summary`)
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return not self.problems

    def problem(self, code: str, message: str, where: str = "") -> None:
        self.problems.append(Item(code, message, where))

    def warn(self, code: str, message: str, where: str = "") -> None:
        self.warnings.append(Item(code, message, where))

    def to_json(self) -> dict[str, Any]:
        return {
            "valid": self.valid, "ordering": self.ordering, "architecture": self.architecture,
            "quant": self.quant, "base_format": self.base_format,
            "problems": [asdict(i) for i in self.problems], "warnings": [asdict(i) for i in self.warnings],
            "adapters": self.adapters,
        }

    def lines(self) -> list[str]:
        """One line per item, then a summary line."""
        out = [
            f"{kind}{f' [{i.where}]' if i.where else ''}: {i.message}"
            for kind, items in (("error", self.problems), ("warning", self.warnings))
            for i in items
        ]
        for name, a in self.adapters.items():
            out.append(f"adapter {name}: " + "; ".join(f"{k.replace('_', ' ')}: {_brief(v)}" for k, v in a.items()))
        base = f"{self.architecture or 'unknown architecture'}, {self.quant or self.base_format}"
        verdict = "valid" if self.valid else f"{len(self.problems)} problem(s)"
        out.append(f"{self.ordering} ({base}): {verdict}, {len(self.warnings)} warning(s)")
        return out


def _brief(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v[:4])) + (f" (+{len(v) - 4})" if len(v) > 4 else "") if v else "none"
    return str(v)


def adapter_summary(cfg, shapes: dict[str, dict[str, tuple]], lm, config: dict[str, int]) -> tuple[dict[str, Any],
                                                                                                   list[str]]:
    """What an adapter carries and what will be applied on a base (as :func:`qadapt.adapters.loading.build_adapter`
    decides it, from the config and the file's tensor names), and what PEFT would refuse."""
    from .adapters.loading import plan_adapter

    plan = plan_adapter(cfg, lm, config)
    lora = {m for m, sh in shapes.items() if "A" in sh}
    applied = sorted(lora & plan.targets)
    emb = lm.embedding_path
    out: dict[str, Any] = {"lora_modules": len(applied),
                           "not_applied": sorted(m for m in lora if m not in plan.targets and m != emb)}
    if cfg.use_dora:
        out["dora_modules"] = sum(1 for m in applied if "magnitude" in shapes[m])
    if cfg.lora_bias:
        out["lora_bias_modules"] = sum(1 for m in applied if "B_bias" in shapes[m])
    saved = sorted(m for m, sh in shapes.items() if ("weight" in sh or "bias" in sh)
                   and (m in plan.saved or m in plan.targets or (m == emb and plan.embedding_lora)
                        or ("bias" in sh and cfg.bias != "none")))
    if saved:
        out["saved_modules"] = saved
    if plan.embedding_lora and emb in shapes and "emb_A" in shapes[emb]:
        out["embedding_lora"] = emb
    if plan.token_ids is not None:
        out["trainable_tokens"] = len(plan.token_ids)
    if cfg.alora_invocation_tokens is not None:
        out["alora_invocation_tokens"] = list(cfg.alora_invocation_tokens)
    return out, plan.problems


def check_ordering(
    path: str | Path,
    *,
    arch: str | None = None,
    model: str | None = None,
    quant: str | None = None,
    adapters: Sequence[tuple[str, str]] = (),
    adapter_model_id: str | None = None,
    offline: bool | None = None,
    xlora: str | None = None,
) -> CheckReport:
    """Check an ordering file; raises InputError only for unreadable input or bad options.

    ``xlora``: an X-LoRA checkpoint whose classifier the ordering must fit (classes, rows, names).
    """
    ordering = read_ordering(path, log_warnings=False)
    report = CheckReport(str(path))
    for w in ordering.warnings:
        report.warn("ordering-file", w, "ordering")
    info = _describe(ordering, report, arch, model, offline)
    try:
        report.base_format, report.quant = base_format_of(quant)
    except UnsupportedError as e:
        raise InputError(f"--quant: {e}") from None
    if quant is None and info is not None and info.base_format_hint:
        report.base_format = info.base_format_hint
    if info is not None:
        report.architecture = info.architecture
    _check_order(ordering, report)
    if ordering.layers is not None:
        _check_layers(ordering.layers, info, report)
    sources = _adapter_sources(ordering, adapters, adapter_model_id, report)
    for name, source, subfolder in sources:
        _check_adapter(name, _resolve_or_none(source, subfolder, name, report), ordering, info, report)
    if xlora is not None:
        _check_xlora(ordering, xlora, info, report)
    return report


# ---------------------------------------------------------------------- model
def _describe(ordering: Ordering, report: CheckReport, arch, model, offline) -> ModelInfo | None:
    """The model to check against: --arch / --model, else base_model_id, else none (structure only)."""
    explicit = arch is not None or model is not None
    target = model or ordering.base_model_id
    if not explicit and target is None:
        report.warn("no-model", "no --arch/--model and no base_model_id: only the file's structure was checked")
        return None
    try:
        return describe_model(arch=arch, model=model) if explicit else describe_model(model=target, offline=offline)
    except UnsupportedError as e:
        hint = did_you_mean(arch, supported_architectures()) if arch else ""
        report.problem("unsupported-architecture", f"{e}{hint}", "model" if explicit else "base_model_id")
    except (SourceError, InputError) as e:
        if explicit:
            raise
        report.warn("model-unavailable", f"cannot describe base_model_id {target}: {e}; "
                    "only checks that need no model were run (give --arch or --model)", "base_model_id")
        _guess_unsupported(target, report)
    return None


def _guess_unsupported(model_id: str, report: CheckReport) -> None:
    """Offline: flag a Hub id whose name is plainly an unsupported family (``google/gemma-7b-it``).

    Only a name that is a transformers ``model_type`` and contains no supported
    one is flagged, so a supported model is never rejected by its name.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    tokens = [t for t in re.split(r"[-_.\s]+", model_id.rsplit("/", 1)[-1].lower()) if t]
    words = set(tokens) | {a + b for a, b in zip(tokens, tokens[1:])}
    ours = {t for lm in _all_maps() for t in (lm.architecture, *lm.hf_model_types)}
    if words & ours:
        return
    family = next((t for t in tokens if t in CONFIG_MAPPING_NAMES), None)
    if family:
        report.problem(
            "unsupported-architecture",
            f"base_model_id {model_id} looks like a `{family}` model, which is not supported; "
            f"supported: {', '.join(supported_architectures())} (pass --arch/--model if this guess is wrong)",
            "base_model_id",
        )


def _all_maps() -> list[LayerMap]:
    from .layer_maps import all_layer_maps

    return list(all_layer_maps().values())


# ---------------------------------------------------------------------- structure
def _check_order(ordering: Ordering, report: CheckReport) -> None:
    seen: set[str] = set()
    for i, name in enumerate(ordering.order or ()):
        if not name.strip():
            report.problem("empty-adapter-name", "adapter name is empty", f"order[{i}]")
        elif name in seen:
            report.problem("duplicate-adapter-name", f"adapter `{name}` is listed twice", f"order[{i}]")
        seen.add(name)
    names: set[str] = set()
    for i, p in enumerate(ordering.preload_adapters):
        where = f"preload_adapters[{i}]"
        for key in ("name", "adapter_model_id"):
            if not (getattr(p, key) or "").strip():
                report.problem("preload-incomplete", f"preload entry has no `{key}`", where)
        if p.name and p.name in names:
            report.problem("duplicate-adapter-name", f"preload adapter `{p.name}` is listed twice", where)
        names.add(p.name or "")


def _check_layers(layers: dict[str, int], info: ModelInfo | None, report: CheckReport) -> None:
    _check_indices(layers, report)
    if info is None:
        return
    positions = {}
    for path in layers:
        pos = _check_module(path, info, report, f"layers.{path}", "")
        if pos is not None:
            positions[path] = pos
    if len(positions) == len(layers):
        expected = sorted(layers, key=positions.__getitem__)
        actual = sorted(layers, key=layers.__getitem__)
        if expected != actual:
            i = next(k for k, (a, b) in enumerate(zip(expected, actual)) if a != b)
            report.warn(
                "layers-order",
                f"`layers` does not follow PEFT's enumeration of wrapped modules (index {i} is `{actual[i]}`, "
                f"PEFT would put `{expected[i]}` there); X-LoRA classifier rows would be assigned differently",
                "layers",
            )


def _check_indices(layers: dict[str, int], report: CheckReport) -> None:
    """The values must be 0..N-1, each once (they are X-LoRA classifier rows)."""
    by_index: dict[int, list[str]] = {}
    for path, idx in layers.items():
        by_index.setdefault(idx, []).append(path)
    for idx, paths in sorted(by_index.items()):
        if len(paths) > 1:
            report.problem("layers-collide", f"index {idx} is used by {len(paths)} modules: {', '.join(paths)}",
                           "layers")
    if not by_index:
        return
    if min(by_index) != 0:
        report.problem("layers-start", f"indices start at {min(by_index)}, expected 0", "layers")
    missing = sorted(set(range(max(by_index) + 1)) - set(by_index))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        report.problem("layers-gap", f"indices skip {len(missing)} value(s): {shown}", "layers")


def _check_module(path: str, info: ModelInfo, report: CheckReport, where: str, who: str) -> tuple | None:
    """Table, base-format and block-range checks of one module path; its enumeration position if valid."""
    lm, n = info.layer_map, info.num_hidden_layers
    hit = lm.match_path(path)
    if hit is None:
        candidates = [m.path for m in lm.enumerate_modules(max(n or 0, _block_of(path) + 1))]
        report.problem(
            "unknown-layer",
            f"{who}`{path}` is not a targetable layer of a {lm.architecture} model{did_you_mean(path, candidates)}; "
            f"targetable: {', '.join(lm.path_templates)}",
            where,
        )
        return None
    spec, blk = hit
    if report.base_format not in spec.formats:
        report.problem(
            "unsupported-layer",
            f"{who}`{path}` cannot carry an adapter on a {report.quant or report.base_format} {lm.architecture} base "
            f"(supported base formats for {spec.name}: {', '.join(spec.formats)})",
            where,
        )
    if blk is not None and n is not None and blk >= n:
        report.problem(
            "layer-out-of-range", f"{who}`{path}` is in block {blk}, but the model has {n} blocks (0..{n - 1})", where
        )
        return None
    n_exp = (info.config or {}).get("num_experts")
    e = expert_of(path, spec)
    if e is not None and n_exp is not None and e >= n_exp:
        report.problem("layer-out-of-range", f"{who}`{path}` is expert {e}, but the model has {n_exp} experts per "
                                             f"layer (0..{n_exp - 1})", where)
        return None
    # PEFT's enumeration: a block's own modules in table order, then each expert's
    return (blk if blk is not None else float("inf"), -1 if e is None else e, lm.layers.index(spec))


def _block_of(path: str) -> int:
    m = re.search(r"\.(\d+)\.", path)
    return int(m.group(1)) if m else 0


# ---------------------------------------------------------------------- adapters
def _adapter_sources(ordering, adapters, adapter_model_id, report) -> list[tuple[str, str, str | None]]:
    """(name, source, subfolder): --adapter first, then ``<adapter_model_id>/<name>`` for each name in order."""
    given: dict[str, tuple[str, str | None]] = {name: (src, None) for name, src in adapters}
    if adapter_model_id:
        for name in ordering.order or ():
            given.setdefault(name, (adapter_model_id, name))
    if given:
        known = set(ordering.order or ()) | {p.name for p in ordering.preload_adapters}
        for name in given.keys() - known:
            report.warn("adapter-unused", f"adapter `{name}` is in neither `order` nor `preload_adapters`",
                        f"adapter {name}")
        for name in ordering.order or ():
            if name not in given:
                report.warn("adapter-unchecked", f"adapter `{name}` from `order` was not given (--adapter)",
                            f"adapter {name}")
    return [(name, src, sub) for name, (src, sub) in given.items()]


def _resolve(source: str, subfolder: str | None) -> Path:
    """Through :mod:`qadapt.adapters.sources` when present (local, Hub, S3, cache), else a local folder."""
    try:
        from .adapters.sources import resolve_adapter
    except ImportError:
        return Path(source, subfolder or "")
    return Path(resolve_adapter(source, subfolder=subfolder))


def _resolve_or_none(source: str, subfolder: str | None, name: str, report: CheckReport) -> Path | None:
    try:
        return _resolve(source, subfolder)
    except QadaptError as e:
        report.problem("adapter-unreadable", str(e), f"adapter {name}")
        return None


def _check_xlora(ordering: Ordering, source: str, info: ModelInfo | None, report: CheckReport) -> None:
    """The ordering against an X-LoRA checkpoint: training order, classifier rows, adapters, no lm_head."""
    from .adapters.xlora_checkpoint import ordering_problems, read_xlora, wrapped_modules

    where = f"xlora {source}"
    try:
        ckpt = read_xlora(_resolve(source, None))
        wrapped = wrapped_modules(ckpt, {n: ckpt.adapter_folder(n) for n in ckpt.config.adapters})
    except QadaptError as e:
        report.problem("xlora-unreadable", str(e), where)
        return
    hidden = (info.config or {}).get("hidden_size") if info is not None else None
    if hidden is not None and hidden != ckpt.config.hidden_size:
        report.problem("xlora-hidden-size", f"the classifier reads hidden_size {ckpt.config.hidden_size}, the model "
                       f"has {hidden}", where)
    if ordering.order is None:
        report.warn("xlora-no-order", f"no `order`: the training order {list(ckpt.config.adapters)} is used", where)
    for code, message in ordering_problems(ckpt, ordering.order, ordering.layers, wrapped,
                                           info.layer_map if info is not None else None):
        report.problem(code, message, where)


def _check_adapter(name: str, folder: Path | None, ordering: Ordering, info: ModelInfo | None, report) -> None:
    from .adapters.peft_format import adapter_weight_shapes, read_adapter_config

    where = f"adapter {name}"
    if folder is None:
        return
    try:
        cfg = read_adapter_config(folder)
        shapes = adapter_weight_shapes(folder)
    except QadaptError as e:
        report.problem("adapter-unreadable", str(e), where)
        return
    for msg in cfg.unsupported_features():
        report.problem("adapter-unsupported", msg, where)
    base = cfg.base_model_name_or_path
    if base and ordering.base_model_id and base != ordering.base_model_id:
        report.warn(
            "adapter-base-model",
            f"adapter was trained on `{base}`, the ordering's base_model_id is `{ordering.base_model_id}`",
            where,
        )
    if info is None:
        report.warn("adapter-not-matched", "no model: the adapter's targets and shapes were not checked", where)
        return
    _check_adapter_modules(name, cfg, shapes, ordering, info, report)


def _check_adapter_modules(name, cfg, shapes, ordering, info: ModelInfo, report: CheckReport) -> None:
    where, who = f"adapter {name}", f"adapter `{name}`: "
    lm, config = info.layer_map, info.config
    n_layers = info.num_hidden_layers
    planned = None
    if n_layers is not None:
        summary, refused = adapter_summary(cfg, shapes, lm, config)
        report.adapters[name] = summary
        for msg in refused:
            report.problem("adapter-targets", who + msg, where)
        for module in summary["not_applied"]:
            report.warn("adapter-untargeted", f"{who}`{module}` has LoRA weights that adapter_config.json does not "
                        "target: PEFT leaves them out, and so does qadapt", where)
        planned = set(lm_targets(cfg, lm, config))
    fitting = 0
    for module, sh in shapes.items():
        if not {"A", "B"} & set(sh) or (planned is not None and module not in planned):
            continue
        if not {"A", "B"} <= set(sh):
            have, lack = ("A", "B") if "A" in sh else ("B", "A")
            report.problem("adapter-incomplete", f"{who}`{module}` has lora_{have} but no lora_{lack}", where)
            continue
        (ra, in_a), (out_b, rb) = sh["A"][:2], sh["B"][:2]
        if ra != rb:
            report.problem("adapter-rank", f"{who}`{module}`: lora_A has rank {ra}, lora_B rank {rb}", where)
        r_cfg = cfg.rank_alpha(module)[0]
        if ra != r_cfg:
            report.problem("adapter-rank", f"{who}`{module}`: lora_A has rank {ra}, adapter_config.json says {r_cfg}",
                           where)
        if _check_module(module, info, report, where, who) is None:
            continue
        fitting += 1
        if ordering.layers is not None and module not in ordering.layers:
            report.problem("adapter-not-in-layers", f"{who}targets `{module}`, which the ordering's `layers` lacks",
                           where)
        if config is not None:
            spec = lm.match_path(module)[0]
            want_in, want_out = spec.shape(config)
            if (in_a, out_b) != (want_in, want_out):
                report.problem(
                    "adapter-shape",
                    f"{who}`{module}`: lora_A is {sh['A']} and lora_B {sh['B']}, but the base layer is "
                    f"{want_in} -> {want_out} (expects A ({ra}, {want_in}), B ({want_out}, {ra}))",
                    where,
                )
    summary = report.adapters.get(name, {})
    if not fitting and not summary.get("saved_modules") and not summary.get("embedding_lora") \
            and not summary.get("trainable_tokens"):
        report.problem(
            "adapter-targets-nothing",
            f"{who}targets no layer of this {lm.architecture} base (its modules: "
            f"{', '.join(sorted(shapes)[:3]) or 'none'}{' ...' if len(shapes) > 3 else ''}); it would have no effect",
            where,
        )
        return
    if n_layers is not None:
        absent = [p for p in lm_targets(cfg, lm, config) if p not in shapes]
        if absent:
            report.warn("adapter-missing-weights", f"{who}adapter_config.json targets {len(absent)} module(s) with no "
                        f"weights, e.g. `{absent[0]}`", where)


def lm_targets(cfg, lm, config: dict[str, int]) -> list[str]:
    return [m.path for m in lm.modules(config) if cfg.matches(m.path, lm)]
