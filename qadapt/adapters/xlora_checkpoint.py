"""X-LoRA checkpoints: their config, their classifier, and what they wrap, as qadapt reads them.

Two checkpoint layouts are read (FIELD-NOTES):

- the X-LoRA reference layout, as mistral.rs reads it: ``xlora_config.json`` and
  ``xlora_classifier.safetensors`` (tensors ``inner.{i}.*``, ``last.*``), one
  sub-folder per adapter name;
- PEFT's: ``adapter_config.json`` with ``peft_type: XLORA``, the classifier in
  ``adapter_model.safetensors`` under ``internal_xlora_classifier.layers.{i}``,
  adapters in sub-folders ``0``, ``1``, ...

The classifier runs in float32 whatever the base (:class:`XLoraClassifier`); which modules it scales, and in
which order, is checked against an ordering file (:func:`ordering_problems`) before anything loads. The
runtime is :mod:`qadapt.adapters.xlora`.
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
