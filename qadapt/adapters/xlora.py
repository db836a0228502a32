"""X-LoRA: several LoRA experts mixed per token (and per layer) by a small classifier.

Two checkpoint layouts are read (FIELD-NOTES):

- the X-LoRA reference layout, as mistral.rs reads it: ``xlora_config.json`` and
  ``xlora_classifier.safetensors`` (tensors ``inner.{i}.*``, ``last.*``), one
  sub-folder per adapter name;
- PEFT's: ``adapter_config.json`` with ``peft_type: XLORA``, the classifier in
  ``adapter_model.safetensors`` under ``internal_xlora_classifier.layers.{i}``,
  adapters in sub-folders ``0``, ``1``, ...

The forward is PEFT's (``peft/tuners/xlora``): a scaling pass with every adapter
scaled by ``scaling_pass_value`` gives the final-norm hidden states, the classifier
(float32 whatever the base) turns them into scalings ``[batch, seq, n_layers or 1,
n_adapters]``, and the real pass adds ``B_i(A_i(x * s_i)) * scale_i * global`` in
each wrapped module. The scalings reach the LoRA wrappers as an argument (the
:class:`XLoraScalings` in :class:`~qadapt.adapters.lora.AdapterContext`), never as
hooks. During generation the two passes keep separate KV caches
(:class:`XLoraCache`), and non-granular scalings are frozen per sequence row.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import AdapterError, FormatError, UnsupportedError
from ..io import read_json, read_safetensors_header
from .lora import wide

log = logging.getLogger(__name__)

REFERENCE_CONFIG = "xlora_config.json"
REFERENCE_WEIGHTS = ("xlora_classifier.safetensors", "xlora_classifier.pt", "xlora_classifier.bin")
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_KEY = re.compile(r"(?:.*\.)?internal_xlora_classifier\.layers\.(\d+)\.(weight|bias)")
_REF_KEY = re.compile(r"(inner)\.(\d+)\.(weight|bias)|(last)\.(weight|bias)")
#: keys of the two config files that qadapt reads or knowingly ignores (others are logged)
#: PEFT 0.21's X-LoRA save_pretrained matches adapter names ("0", "1", ...) as substrings of tensor names
PEFT_SAVE_BUG = (
    "PEFT's X-LoRA save_pretrained (0.21) files the classifier's `layers.0` under expert `0` and mixes base weights "
    "into the expert folders: save the whole `internal_xlora_classifier` state yourself, or use the X-LoRA layout "
    "(xlora_config.json + xlora_classifier.safetensors), with each expert's own LoRA folder as its sub-folder"
)
_KNOWN_KEYS = {
    "hidden_size", "adapters", "enable_softmax", "enable_softmax_topk", "softmax_temperature",
    "layerwise_scalings", "top_k_lora", "xlora_depth", "xlora_size", "xlora_dropout_p",
    "use_trainable_adapters", "scaling_pass_value", "global_scaling_weight", "enable_relu_and_dropout",
    "use_bias", "base_model_id", "device", "stop_token_id", "use_mean_pool", "model_type",
    # PEFT's PeftConfig fields
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version",
}


# ---------------------------------------------------------------------- config
@dataclass(frozen=True)
class XLoraConfig:
    """The classifier's and the mixing's settings, from either layout."""

    hidden_size: int
    adapters: tuple[str, ...]  # names in training order = the classifier's classes
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    softmax_temperature: float = 1.0
    layerwise_scalings: bool = False
    top_k_lora: int | None = None
    xlora_depth: int = 1
    xlora_size: int = 2048
    relu: bool = True  # ReLU between classifier layers (PEFT: always; reference: enable_relu_and_dropout)
    use_bias: bool = True
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0
    layout: str = "peft"  # "peft" | "xlora" (reference / mistral.rs)
    source: str = field(default="<memory>", compare=False)

    @property
    def n_classes(self) -> int:
        return len(self.adapters)

    @classmethod
    def from_dict(cls, data: Any, source: str, layout: str) -> "XLoraConfig":
        if not isinstance(data, dict):
            raise FormatError(f"{source}: expected a JSON object")
        unknown = sorted(set(data) - _KNOWN_KEYS)
        if unknown:
            log.warning("%s: ignoring unknown key(s) %s", source, ", ".join(unknown))

        def get(key, types, default):
            value = data.get(key, default)
            if value is None and default is None:
                return None
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                names = " or ".join(t.__name__ for t in types)
                raise FormatError(f"{source}: key `{key}` must be {names}, got {value!r}")
            return value

        if data.get("hidden_size") is None:
            raise FormatError(f"{source}: key `hidden_size` is missing")
        adapters = data.get("adapters")
        if isinstance(adapters, dict):
            names = tuple(adapters)
        elif isinstance(adapters, list) and all(isinstance(a, str) for a in adapters):
            names = tuple(adapters)  # the reference saves the names only
        else:
            raise FormatError(f"{source}: key `adapters` must be an object (name -> source) or a list of names")
        num = (int, float)
        relu_default = layout == "peft"
        cfg = cls(
            hidden_size=get("hidden_size", (int,), None),
            adapters=names,
            enable_softmax=get("enable_softmax", (bool,), True),
            enable_softmax_topk=get("enable_softmax_topk", (bool,), False),
            softmax_temperature=float(get("softmax_temperature", num, 1.0)),
            layerwise_scalings=get("layerwise_scalings", (bool,), False),
            top_k_lora=get("top_k_lora", (int,), None),
            xlora_depth=get("xlora_depth", (int,), 1),
            xlora_size=get("xlora_size", (int,), 2048),
            relu=relu_default if layout == "peft" else get("enable_relu_and_dropout", (bool,), False),
            use_bias=True if layout == "peft" else get("use_bias", (bool,), True),
            scaling_pass_value=float(get("scaling_pass_value", num, 0.0)),
            global_scaling_weight=float(get("global_scaling_weight", num, 1.0)),
            layout=layout,
            source=source,
        )
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        src = self.source
        if not self.adapters:
            raise FormatError(f"{src}: key `adapters` is empty: an X-LoRA model mixes at least one adapter")
        if len(set(self.adapters)) != len(self.adapters) or not all(a.strip() for a in self.adapters):
            raise FormatError(f"{src}: key `adapters` has empty or repeated names: {list(self.adapters)}")
        if self.hidden_size <= 0 or self.xlora_depth < 1 or (self.xlora_depth > 1 and self.xlora_size <= 0):
            raise FormatError(f"{src}: hidden_size, xlora_depth and xlora_size must be positive")
        if self.softmax_temperature <= 0:
            raise FormatError(f"{src}: key `softmax_temperature` must be > 0, got {self.softmax_temperature}")
        if self.top_k_lora is not None and not 1 <= self.top_k_lora <= self.n_classes:
            raise FormatError(f"{src}: key `top_k_lora` must be in 1..{self.n_classes} (the number of adapters), "
                              f"got {self.top_k_lora}")
        if self.enable_softmax_topk and self.top_k_lora is None:
            log.warning("%s: `enable_softmax_topk` is set without `top_k_lora`: it softmaxes every non-zero "
                        "scaling (as PEFT does)", src)


# ---------------------------------------------------------------------- classifier
class XLoraClassifier(nn.Module):
    """hidden [B, T, H] -> scalings [B, T, n_layers or 1, n_classes], float32, no dropout (inference)."""

    def __init__(self, config: XLoraConfig, n_layers: int, weights: list[tuple[torch.Tensor, torch.Tensor | None]]):
        super().__init__()
        self.config, self.n_layers = config, n_layers
        self.layers = nn.ModuleList()
        for w, b in weights:
            lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
            lin.requires_grad_(False)
            lin.weight.data = w.float()
            if b is not None:
                lin.bias.data = b.float()
            self.layers.append(lin)

    @property
    def out_layers(self) -> int:
        return self.n_layers if self.config.layerwise_scalings else 1

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden.float()
        n = len(self.layers)
        for i, lin in enumerate(self.layers):
            h = lin(h)
            if i < n - 1 and self.config.relu:
                h = torch.relu(h)
        B, T = h.shape[:2]
        s = h.reshape(B, T, self.out_layers, self.config.n_classes)
        if self.config.enable_softmax:
            s = torch.softmax(s / self.config.softmax_temperature, dim=-1)
        return s


def select_top_k(scalings: torch.Tensor, config: XLoraConfig) -> torch.Tensor:
    """PEFT's ``get_maybe_topk_scalings`` over the last dim: keep the k largest, optionally softmax them."""
    s = scalings
    if config.top_k_lora is not None:
        idx = torch.topk(s, k=config.top_k_lora, dim=-1).indices
        mask = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)
        s = s * mask.to(s.dtype)
    if config.enable_softmax_topk:
        nonzero = s != 0
        s = torch.softmax(s.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0.0)
    return s


# ---------------------------------------------------------------------- checkpoints
@dataclass(frozen=True)
class XLoraCheckpoint:
    """A resolved X-LoRA folder: config, classifier tensors (as stored) and one folder per adapter."""

    folder: Path
    config: XLoraConfig
    weights_file: Path
    #: (weight name, bias name or None) per classifier layer, first to last
    layer_keys: tuple[tuple[str, str | None], ...]
    shapes: dict[str, tuple[int, ...]]

    @property
    def classifier_out(self) -> int:
        return self.shapes[self.layer_keys[-1][0]][0]

    @property
    def classifier_layers(self) -> int | None:
        """n_layers as the classifier's last layer fixes it (layerwise scalings only)."""
        if not self.config.layerwise_scalings:
            return None
        return self.classifier_out // self.config.n_classes

    def adapter_folder(self, name: str, root: str | Path | None = None) -> Path:
        from .sources import adapter_subfolder

        path = adapter_subfolder(root or self.folder, name)
        if not path.is_dir():
            raise AdapterError(f"X-LoRA adapter `{name}`: no sub-folder {path} (the checkpoint {self.folder} "
                               f"should hold one folder per adapter: {', '.join(self.config.adapters)})")
        return path

    def load_classifier(self, n_layers: int) -> XLoraClassifier:
        tensors = _read_tensors(self.weights_file, {k for pair in self.layer_keys for k in pair if k})
        weights = [(tensors[w], tensors[b] if b else None) for w, b in self.layer_keys]
        return XLoraClassifier(self.config, n_layers, weights)


def read_xlora(folder: str | Path) -> XLoraCheckpoint:
    """Read either layout's config and classifier header (no tensor data) and check the classifier's shapes."""
    folder = Path(folder)
    if (folder / REFERENCE_CONFIG).is_file():
        cfg = XLoraConfig.from_dict(read_json(folder / REFERENCE_CONFIG, "X-LoRA config"),
                                    str(folder / REFERENCE_CONFIG), "xlora")
        weights = _first_file(folder, REFERENCE_WEIGHTS, "X-LoRA classifier")
        shapes = _shapes(weights)
        keys = _reference_keys(shapes, weights, cfg)
    elif (folder / PEFT_CONFIG).is_file():
        data = read_json(folder / PEFT_CONFIG, "adapter config")
        if not isinstance(data, dict) or data.get("peft_type") != "XLORA":
            kind = data.get("peft_type") if isinstance(data, dict) else None
            raise AdapterError(f"{folder}: adapter_config.json has peft_type {kind!r}, not XLORA: this is not an "
                               "X-LoRA checkpoint (load a LoRA adapter with adapters={name: source})")
        cfg = XLoraConfig.from_dict(data, str(folder / PEFT_CONFIG), "peft")
        weights = _first_file(folder, PEFT_WEIGHTS, "X-LoRA classifier")
        shapes = _shapes(weights)
        keys = _peft_keys(shapes, weights, cfg)
    else:
        raise AdapterError(f"{folder} is not an X-LoRA checkpoint: expected {REFERENCE_CONFIG} (X-LoRA / mistral.rs "
                           f"layout) or {PEFT_CONFIG} with peft_type XLORA (PEFT layout)")
    ckpt = XLoraCheckpoint(folder, cfg, weights, keys, shapes)
    _check_classifier_shapes(ckpt)
    return ckpt


def _first_file(folder: Path, names: Sequence[str], what: str) -> Path:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    raise AdapterError(f"{folder}: no {what} weights (expected {' or '.join(names)})")


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from .tensors import raw_shapes as _raw_shapes

    return _raw_shapes(path)


def _read_tensors(path: Path, names: set[str]) -> dict[str, torch.Tensor]:
    from .tensors import load_bin as _load_bin

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        read_safetensors_header(path)
        with safe_open(str(path), "pt") as f:
            return {n: f.get_tensor(n) for n in names}
    state = _load_bin(path)
    return {n: state[n] for n in names}


def _pairs(indexed: dict[int, dict[str, str]], path: Path, cfg: XLoraConfig) -> list[tuple[str, str | None]]:
    out = []
    for i in sorted(indexed):
        slot = indexed[i]
        if "weight" not in slot:
            raise FormatError(f"{path}: classifier layer {i} has a bias but no weight")
        if cfg.use_bias and "bias" not in slot:
            raise FormatError(f"{path}: classifier layer {i} has no bias ({slot['weight']}), but the config says "
                              "use_bias")
        out.append((slot["weight"], slot.get("bias")))
    return out


def _reference_keys(shapes, path: Path, cfg: XLoraConfig) -> tuple[tuple[str, str | None], ...]:
    inner: dict[int, dict[str, str]] = {}
    last: dict[str, str] = {}
    for name in shapes:
        m = _REF_KEY.fullmatch(name)
        if m is None:
            log.warning("%s: ignoring tensor `%s` (not an X-LoRA classifier weight)", path, name)
        elif m.group(1):
            inner.setdefault(int(m.group(2)), {})[m.group(3)] = name
        else:
            last[m.group(5)] = name
    if not last:
        raise FormatError(f"{path}: no `last.weight` tensor (the classifier's output layer)")
    # the reference numbers inner layers by ModuleList position (ReLU/Dropout take slots), mistral.rs by count:
    # both are read in numeric order
    pairs = _pairs(inner, path, cfg) + _pairs({0: last}, path, cfg)
    if len(pairs) != cfg.xlora_depth:
        raise FormatError(f"{path}: {len(pairs)} classifier layer(s) (inner.* + last), but xlora_depth is "
                          f"{cfg.xlora_depth}")
    return tuple(pairs)


def _peft_keys(shapes, path: Path, cfg: XLoraConfig) -> tuple[tuple[str, str | None], ...]:
    layers: dict[int, dict[str, str]] = {}
    for name in shapes:
        m = _PEFT_KEY.fullmatch(name)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = name
    if not layers:
        raise FormatError(f"{path}: no `internal_xlora_classifier.layers.*` tensors: the X-LoRA classifier is "
                          f"missing. {PEFT_SAVE_BUG}")
    pairs = _pairs(layers, path, cfg)
    if len(pairs) != cfg.xlora_depth:
        raise FormatError(
            f"{path}: the classifier has {len(pairs)} linear layer(s) (Sequential slots "
            f"{', '.join(map(str, sorted(layers)))}), but xlora_depth is {cfg.xlora_depth}. {PEFT_SAVE_BUG}"
        )
    return tuple(pairs)


def _check_classifier_shapes(ckpt: XLoraCheckpoint) -> None:
    cfg, sh = ckpt.config, ckpt.shapes
    fan_in = cfg.hidden_size
    for i, (w, b) in enumerate(ckpt.layer_keys):
        shape = sh[w]
        last = i == len(ckpt.layer_keys) - 1
        want_out = None if last else cfg.xlora_size
        if len(shape) != 2 or shape[1] != fan_in or (want_out is not None and shape[0] != want_out):
            raise FormatError(f"{ckpt.weights_file}: classifier tensor `{w}` has shape {list(shape)}, expected "
                              f"[{want_out if want_out is not None else 'out'}, {fan_in}] (hidden_size "
                              f"{cfg.hidden_size}, xlora_size {cfg.xlora_size})")
        if b is not None and tuple(sh[b]) != (shape[0],):
            raise FormatError(f"{ckpt.weights_file}: classifier tensor `{b}` has shape {list(sh[b])}, expected "
                              f"[{shape[0]}]")
        fan_in = shape[0]
    out, c = ckpt.classifier_out, cfg.n_classes
    if cfg.layerwise_scalings and out % c:
        raise FormatError(f"{ckpt.weights_file}: the classifier has {out} outputs, not a multiple of its {c} "
                          "adapters (layerwise_scalings: n_adapters * n_layers)")
    if not cfg.layerwise_scalings and out != c:
        raise FormatError(f"{ckpt.weights_file}: the classifier has {out} outputs for {c} adapters "
                          "(layerwise_scalings is false: one output per adapter)")


# ---------------------------------------------------------------------- ordering against checkpoint
def wrapped_modules(ckpt: XLoraCheckpoint, folders: dict[str, Path]) -> set[str]:
    """Modules any adapter has LoRA weights for: the modules PEFT wraps (and the classifier's layers)."""
    from .peft_format import adapter_weight_shapes, find_adapter_weights
    from .tensors import raw_shapes as _raw_shapes

    out: set[str] = set()
    for name in ckpt.config.adapters:
        path = find_adapter_weights(folders[name])
        stray = [k for k in _raw_shapes(path) if "internal_xlora_classifier" in k or ".base_layer." in k]
        if stray:
            raise AdapterError(
                f"X-LoRA expert `{name}` ({path}) holds non-LoRA tensors such as `{stray[0]}`, not an expert's "
                f"own LoRA weights. {PEFT_SAVE_BUG}"
            )
        out |= set(adapter_weight_shapes(folders[name]))
    return out


def _is_lm_head(path: str, layer_map) -> bool:
    if layer_map is not None:
        hit = layer_map.match_path(path)
        if hit is not None:
            return hit[1] is None
    return path.split(".")[-1] == "lm_head"


def ordering_problems(ckpt: XLoraCheckpoint, order: Sequence[str] | None, layers: dict[str, int] | None,
                      wrapped: set[str] | None, layer_map=None) -> list[tuple[str, str]]:
    """(code, message) for every way an ordering's ``order`` / ``layers`` contradict the checkpoint."""
    cfg = ckpt.config
    train = list(cfg.adapters)
    out: list[tuple[str, str]] = []
    if order is not None:
        order = list(order)
        extra = [n for n in order if n not in train]
        missing = [n for n in train if n not in order]
        if extra:
            out.append(("xlora-order-unknown", f"`order` names adapter(s) {', '.join(extra)} that the X-LoRA "
                        f"checkpoint lacks; it was trained with {train}"))
        if missing:
            out.append(("xlora-order-classes", f"`order` has {len(order)} adapter(s), the classifier has "
                        f"{cfg.n_classes} classes ({train}); missing: {', '.join(missing)}"))
        if not extra and not missing and order != train:
            out.append(("xlora-order", f"`order` {order} is not the training order {train} of {cfg.source}: the "
                        "classifier's classes would go to the wrong adapters"))
    heads = sorted(p for p in (set(layers or ()) | set(wrapped or ())) if _is_lm_head(p, layer_map))
    for p in heads:
        out.append(("xlora-lm-head", f"`{p}` is an X-LoRA target: X-LoRA cannot adapt lm_head (mistral.rs refuses "
                    "it too); the classifier reads the hidden states the head consumes"))
    n_cls = ckpt.classifier_layers
    if layers is not None:
        if n_cls is not None and len(layers) != n_cls:
            out.append(("xlora-n-layers", f"`layers` has {len(layers)} module(s), the classifier was trained for "
                        f"n_layers = {n_cls} ({ckpt.classifier_out} outputs / {cfg.n_classes} adapters)"))
        if wrapped is not None:
            lacking = sorted(wrapped - set(layers))
            unused = sorted(set(layers) - wrapped)
            if lacking:
                out.append(("xlora-layers-missing", f"the adapters adapt {len(lacking)} module(s) that `layers` "
                            f"lacks (no classifier row), e.g. `{lacking[0]}`"))
            if unused:
                out.append(("xlora-layers-unused", f"`layers` lists {len(unused)} module(s) no adapter adapts, "
                            f"e.g. `{unused[0]}`: n_layers = number of wrapped modules ({len(wrapped)})"))
    elif wrapped is not None and n_cls is not None and len(wrapped) != n_cls:
        out.append(("xlora-n-layers", f"the adapters wrap {len(wrapped)} module(s), the classifier was trained for "
                    f"n_layers = {n_cls}"))
    return out


def classifier_rows(wrapped: set[str], layers: dict[str, int] | None, layer_map, n_blocks: int) -> dict[str, int]:
    """Module path -> classifier row: the ordering's ``layers``, else PEFT's enumeration of the wrapped modules."""
    experts = [p for p in wrapped if (hit := layer_map.match_path(p)) is not None and hit[0].per_expert]
    if experts:
        raise UnsupportedError(f"X-LoRA on the experts of a mixture-of-experts layer (`{experts[0]}`) is not "
                               "supported: target the attention layers or the router")
    if layers is not None:
        return dict(layers)
    paths = [m.path for m in layer_map.enumerate_modules(n_blocks) if m.path in wrapped]
    return {p: i for i, p in enumerate(paths)}


# ---------------------------------------------------------------------- runtime
@dataclass(frozen=True)
class XLoraScalings:
    """What ``LoraLinear.forward`` receives: per-token scalings (top-k applied) and each module's row."""

    scalings: torch.Tensor  # [B, T, n_layers or 1, n_adapters], float32
    rows: dict[str, int]
    order: tuple[str, ...]
    global_weight: float

    def native_entries(self, layer, m: int) -> list[tuple] | None:
        """This layer's expert deltas for a decode step of ``m`` rows (one token each) as native LoRA entries
        (row, A, Bt, scale): each expert's scale times its scaling for that row and layer (what :meth:`apply`
        computes, in the fused decode's one call); None where the native kernel cannot take them."""
        row = self.rows.get(layer.path)
        if row is None:
            return []
        s = self.scalings[:, :, row if self.scalings.shape[2] > 1 else 0]  # [B, T, C]
        if s.shape[0] * s.shape[1] != m or s.shape[1] != 1:
            return None
        names = [(i, n) for i, n in enumerate(self.order) if n in layer.adapters]
        if not all(layer._fits_native(n) for _, n in names):
            return None
        s = s[:, 0].tolist()
        return [(b, layer.adapters[n].A, layer._bt[n], s[b][i] * layer.adapters[n].scale * self.global_weight)
                for b in range(m) for i, n in names]

    def apply(self, layer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        row = self.rows.get(layer.path)
        if row is None:
            return y
        s = self.scalings[:, :, row if self.scalings.shape[2] > 1 else 0]  # [B, T, C]
        for i, name in enumerate(self.order):
            f = layer.adapters.get(name)
            if f is None:
                continue
            A, B = wide(f.A), wide(f.B)
            xs = x.to(A.dtype) * s[..., i : i + 1].to(A.dtype)
            y = y + ((xs @ A.T) @ B.T * (f.scale * self.global_weight)).to(y.dtype)
        return y


@dataclass
class RowState:
    """Non-granular scalings of one sequence row: decode steps seen, and the frozen scalings once fixed."""

    decoded: int = 0
    frozen: torch.Tensor | None = None  # [1, n_layers or 1, n_adapters]


class XLoraCache:
    """The real pass's and the scaling pass's KV caches, plus each row's non-granular state."""

    def __init__(self, real, scaling):
        self.real, self.scaling = real, scaling
        self.rows = [RowState() for _ in range(real.batch)]

    @property
    def max_len(self) -> int:
        return self.real.max_len

    @property
    def batch(self) -> int:
        return self.real.batch

    @property
    def nbytes(self) -> int:
        return self.real.nbytes + self.scaling.nbytes

    def reset_rows(self, rows: list[int]) -> None:
        self.real.reset_rows(rows)
        self.scaling.reset_rows(rows)
        for r in rows:
            self.rows[r] = RowState()


class XLora:
    """A loaded X-LoRA: classifier, adapter order, each module's classifier row, non-granular target."""

    def __init__(self, checkpoint: XLoraCheckpoint, classifier: XLoraClassifier, rows: dict[str, int],
                 tgt_non_granular_index: int | None = None):
        self.checkpoint, self.config, self.classifier = checkpoint, checkpoint.config, classifier
        self.order = checkpoint.config.adapters
        self.rows = rows
        self.tgt_non_granular_index = tgt_non_granular_index
        self.last_scalings: torch.Tensor | None = None
        self.scaling_passes = 0  # forwards of the scaling pass run (for benchmarks)

    @property
    def n_layers(self) -> int:
        return len(self.rows)

    def _context(self, scalings: torch.Tensor):
        from .lora import AdapterContext

        s = XLoraScalings(select_top_k(scalings, self.config), self.rows, self.order,
                          self.config.global_scaling_weight)
        return AdapterContext(active=self.order, xlora=s)

    def scaling_pass_context(self, batch: int, seq: int, device: torch.device | str = "cpu"):
        """Every adapter at ``scaling_pass_value`` (None when it is 0: then the pass is the base model, exactly)."""
        spv = self.config.scaling_pass_value
        if spv == 0:
            return None
        return self._context(torch.full((batch, seq, 1, self.config.n_classes), float(spv), device=device))

    def context(self, decoder, ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: XLoraCache | None = None):
        """Run the scaling pass (on ``cache.scaling``) and the classifier; the real pass's AdapterContext."""
        B, T = ids.shape
        states = cache.rows if cache is not None else None
        if states is not None and T == 1:
            for st in states:
                if st.frozen is None:
                    st.decoded += 1
        if states is None or any(st.frozen is None for st in states):
            hidden = decoder(ids, positions, None if cache is None else cache.scaling,
                             ctx=self.scaling_pass_context(B, T, ids.device), logits=False).hidden
            self.scaling_passes += 1
            scalings = self.classifier(hidden)
        else:
            scalings = torch.empty(B, T, self.classifier.out_layers, self.config.n_classes, device=ids.device)
        if states is not None:
            self._non_granular(states, scalings)
        self.last_scalings = scalings
        return self._context(scalings)

    def _non_granular(self, states: list[RowState], scalings: torch.Tensor) -> None:
        k = self.tgt_non_granular_index
        for b, st in enumerate(states):
            if st.frozen is not None:
                scalings[b] = st.frozen.expand(scalings.shape[1], -1, -1)
            elif k is not None and st.decoded == k:
                st.frozen = scalings[b, -1:].clone()
                log.debug("row %d: X-LoRA scalings frozen after %d generated token(s)", b, k)


# ---------------------------------------------------------------------- loading into a model
def load_xlora(model, source: str, ordering=None, tgt_non_granular_index: int | None = None,
               adapter_model_id: str | None = None, revision: str | None = None) -> XLora:
    """Resolve and check an X-LoRA checkpoint against ``model`` and an optional ordering; load its adapters."""
    from .sources import resolve_adapter

    if tgt_non_granular_index is not None and (isinstance(tgt_non_granular_index, bool)
                                               or not isinstance(tgt_non_granular_index, int)
                                               or tgt_non_granular_index < 0):
        raise AdapterError(f"tgt_non_granular_index must be a non-negative integer, got {tgt_non_granular_index!r}")
    folder = resolve_adapter(str(source), revision=revision)
    ckpt = read_xlora(folder)
    cfg = ckpt.config
    if cfg.hidden_size != model.config.hidden_size:
        raise AdapterError(f"X-LoRA {source}: hidden_size {cfg.hidden_size} in {cfg.source}, the base has "
                           f"{model.config.hidden_size}")
    root = resolve_adapter(adapter_model_id) if adapter_model_id else folder
    folders = {n: ckpt.adapter_folder(n, root) for n in cfg.adapters}
    wrapped = wrapped_modules(ckpt, folders)
    order = ordering.order if ordering is not None else None
    layers = ordering.layers if ordering is not None else None
    problems = ordering_problems(ckpt, order, layers, wrapped, model.layer_map)
    if problems:
        where = f" with ordering {ordering.source}" if ordering is not None else ""
        raise AdapterError(f"X-LoRA {source}{where}:\n  - " + "\n  - ".join(m for _, m in problems))
    rows = classifier_rows(wrapped, layers, model.layer_map, model.config.num_hidden_layers)
    classifier = ckpt.load_classifier(len(rows))
    for name in cfg.adapters:
        model.load_adapter(name, str(folders[name]))
    log.info("X-LoRA %s (%s layout): %d adapters, %d layers, depth %d%s", source, cfg.layout, cfg.n_classes,
             len(rows), cfg.xlora_depth, ", layerwise" if cfg.layerwise_scalings else "")
    return XLora(ckpt, classifier, rows, tgt_non_granular_index)


def unsupported_with_xlora(what: str) -> UnsupportedError:
    return UnsupportedError(f"{what} cannot be combined with X-LoRA (its classifier decides the adapters' weights)")

