"""PEFT's LoRA adapter format: ``adapter_config.json`` and ``adapter_model.{safetensors,bin}``.

The matching rules (which module an adapter wraps, which rank and alpha it gets)
re-implement PEFT 0.21's ``check_target_module_exists``,
``_maybe_include_all_linear_layers`` and ``get_pattern_key`` so that qadapt wraps
exactly the modules PEFT would, without building the model. The tests compare
the two on real transformers models.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import AdapterError, FormatError, InputError
from ..io import read_json
from .tensors import load_parts, parse_weight_key, raw_shapes, shapes_by_module  # noqa: F401  (re-exported)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..layer_maps import LayerMap

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # first wins, as in PEFT
ALL_LINEAR = "all-linear"
#: PEFT's default targets when a config leaves ``target_modules`` empty (peft.utils.constants).
DEFAULT_TARGETS = {
    "llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"),
    "phi3": ("qkv_proj",), "gpt2": ("c_attn",), "qwen": ("c_attn",),
}
EMBEDDING_NAMES = ("embed_tokens", "wte", "wpe", "embed_in", "word_embeddings")

StrList = tuple[str, ...]


def _strs(value: Any) -> StrList | str | None:
    """A PEFT 'list or string' field, lists frozen to tuples."""
    return tuple(value) if isinstance(value, list) else value


# field -> (accepted JSON types, converter)
_FIELDS: dict[str, tuple[tuple[type, ...], Any]] = {
    "r": ((int,), int),
    "lora_alpha": ((int, float), float),
    "use_rslora": ((bool,), bool),
    "target_modules": ((list, str, type(None)), _strs),
    "exclude_modules": ((list, str, type(None)), _strs),
    "layers_to_transform": ((list, int, type(None)), _strs),
    "layers_pattern": ((list, str, type(None)), _strs),
    "rank_pattern": ((dict, type(None)), lambda v: MappingProxyType(dict(v or {}))),
    "alpha_pattern": ((dict, type(None)), lambda v: MappingProxyType(dict(v or {}))),
    "fan_in_fan_out": ((bool,), bool),
    "bias": ((str,), str),
    "modules_to_save": ((list, type(None)), _strs),
    "use_dora": ((bool,), bool),
    "lora_bias": ((bool,), bool),
    "trainable_token_indices": ((list, dict, type(None)), lambda v: v),
    "alora_invocation_tokens": ((list, type(None)), lambda v: None if v is None else tuple(v)),
    "target_parameters": ((list, type(None)), _strs),
    "layer_replication": ((list, type(None)), lambda v: v),
    "use_qalora": ((bool,), bool),
    "base_model_name_or_path": ((str, type(None)), lambda v: v),
    "peft_type": ((str, type(None)), lambda v: v),
    "task_type": ((str, type(None)), lambda v: v),
}


@dataclass(frozen=True)
class LoraAdapterConfig:
    """The fields of a PEFT ``LoraConfig`` that decide what an adapter wraps and how it scales."""

    r: int = 8
    lora_alpha: float = 8.0
    use_rslora: bool = False
    target_modules: StrList | str | None = None
    exclude_modules: StrList | str | None = None
    layers_to_transform: tuple[int, ...] | int | None = None
    layers_pattern: StrList | str | None = None
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: StrList | None = None
    use_dora: bool = False
    lora_bias: bool = False
    trainable_token_indices: list | dict | None = None
    alora_invocation_tokens: tuple[int, ...] | None = None
    target_parameters: StrList | None = None
    layer_replication: list | None = None
    use_qalora: bool = False
    base_model_name_or_path: str | None = None
    peft_type: str | None = "LORA"
    task_type: str | None = None
    source: str = field(default="<memory>", compare=False)  # the adapter folder, for messages

    @classmethod
    def from_dict(cls, data: Any, source: str = "<memory>") -> "LoraAdapterConfig":
        """Validate an ``adapter_config.json`` object; unknown keys are ignored (PEFT has many)."""
        if not isinstance(data, dict):
            raise FormatError(f"{source}: expected a JSON object")
        kwargs: dict[str, Any] = {}
        for key, (types, convert) in _FIELDS.items():
            if key not in data:
                continue
            value = data[key]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise FormatError(f"{source}: key `{key}` must be {want}, got {json_type(value)}")
            kwargs[key] = convert(value)
        cfg = cls(**kwargs, source=source)
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        """PEFT's own consistency checks (LoraConfig.__post_init__), as FormatErrors."""
        src = self.source
        if self.r <= 0:
            raise FormatError(f"{src}: key `r` must be positive, got {self.r}")
        for key, typ in (("target_modules", str), ("exclude_modules", str), ("layers_pattern", str),
                         ("modules_to_save", str), ("layers_to_transform", int)):
            value = getattr(self, key)
            if isinstance(value, tuple) and not all(isinstance(v, typ) and not isinstance(v, bool) for v in value):
                raise FormatError(f"{src}: key `{key}` must be a list of {typ.__name__}s, got {list(value)!r}")
        if isinstance(self.lora_alpha, float) and not math.isfinite(self.lora_alpha):
            raise FormatError(f"{src}: key `lora_alpha` must be a finite number, got {self.lora_alpha}")
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise FormatError(
                f"{src}: key `layers_to_transform`/`layers_pattern` cannot be used when `target_modules` "
                "is a regex string"
            )
        inv = self.alora_invocation_tokens
        if inv is not None and (not inv or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                   for t in inv)):
            raise FormatError(f"{src}: key `alora_invocation_tokens` must be a non-empty list of token ids")
        tti = self.trainable_token_indices
        lists = list(tti.values()) if isinstance(tti, dict) else [tti] if tti is not None else []
        for ids in lists:
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                    for t in ids):
                raise FormatError(f"{src}: key `trainable_token_indices` must list token ids (or map module names "
                                  "to lists of them)")
        if self.layers_pattern and self.layers_to_transform is None:
            raise FormatError(f"{src}: key `layers_pattern` needs `layers_to_transform`")
        for key in ("rank_pattern", "alpha_pattern"):
            for pattern, value in getattr(self, key).items():
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise FormatError(f"{src}: key `{key}.{pattern}` must be a number, got {json_type(value)}")
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise FormatError(f"{src}: key `{key}`: bad pattern {pattern!r} ({e})") from None
        if isinstance(self.target_modules, str) and self.target_modules.lower() != ALL_LINEAR:
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise FormatError(f"{src}: key `target_modules`: bad regex {self.target_modules!r} ({e})") from None

    # ------------------------------------------------------------------ matching
    def matches(self, module_path: str, layer_map: "LayerMap | None" = None) -> bool:
        """Whether PEFT would wrap ``module_path`` (a path without ``base_model.model.``).

        With ``layer_map``, paths the table does not list never match (PEFT only
        wraps supported layer types), and ``all-linear`` means every table layer
        except the output embedding (PEFT drops ``get_output_embeddings()``).
        """
        spec = layer_map.match_path(module_path) if layer_map is not None else None
        if layer_map is not None and spec is None:
            return False
        if self._excluded(module_path):
            return False
        targets = self.target_modules
        if targets is None and layer_map is not None:
            targets = DEFAULT_TARGETS.get(layer_map.architecture)
        if targets is None:
            return False
        if isinstance(targets, str):
            if targets.lower() == ALL_LINEAR:
                return not _is_output_layer(module_path, spec)
            return re.fullmatch(targets, module_path) is not None
        if module_path in targets:
            return True
        if not any(module_path.endswith(f".{t}") for t in targets):
            return False
        return self._in_transformed_layers(module_path)

    def _excluded(self, path: str) -> bool:
        ex = self.exclude_modules
        if ex:
            if isinstance(ex, str):
                if re.fullmatch(ex, path):
                    return True
            elif path in ex or any(path.endswith(f".{e}") for e in ex):
                return True
        return any(re.match(rf"(^|.*\.){m}($|\..*)", path) for m in self.modules_to_save or ())

    def _in_transformed_layers(self, path: str) -> bool:
        wanted = self.layers_to_transform
        if wanted is None or wanted == ():
            return True
        patterns = self.layers_pattern
        match = None
        if not patterns:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
        else:
            for p in [patterns] if isinstance(patterns, str) else patterns:
                match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", path)
                if match:
                    break
        if match is None:
            return False
        idx = int(match.group("idx"))
        return idx == wanted if isinstance(wanted, int) else idx in wanted

    def rank_alpha(self, module_path: str) -> tuple[int, float]:
        """(r, alpha) of a module, honouring ``rank_pattern`` / ``alpha_pattern`` as PEFT does."""
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, module_path), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module_path), self.lora_alpha)
        return int(r), float(alpha)

    def scale(self, module_path: str) -> float:
        """The factor on ``B(A(x))``: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        r, alpha = self.rank_alpha(module_path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def unsupported_features(self) -> list[str]:
        """What this adapter asks for that qadapt does not run, one message per field (what needs the base's
        layer map, such as ``modules_to_save`` entries, is checked when the adapter is built)."""
        src, out = self.source, []
        kind = (self.peft_type or "LORA").upper()
        if kind != "LORA":
            out.append(f"{src}: `peft_type` is {self.peft_type}; qadapt runs LoRA adapters: convert it with PEFT's "
                       "convert_to_lora (`qadapt adapters convert FOLDER OUT`)")
        if self.layer_replication:
            out.append(f"{src}: `layer_replication` is set: replicated layers are not supported")
        if self.use_qalora:
            out.append(f"{src}: `use_qalora` is true: QA-LoRA's pooled inputs are not supported")
        if self.use_dora and self.lora_bias:
            out.append(f"{src}: `use_dora` with `lora_bias`: PEFT does not define this combination")
        return out

    def matches_embedding(self, path: str) -> bool:
        """Whether PEFT would put LoRA on the token embedding at ``path`` (named targets or a regex;
        ``all-linear`` never takes embeddings)."""
        targets = self.target_modules
        if targets is None or self._excluded(path):
            return False
        if isinstance(targets, str):
            return targets.lower() != ALL_LINEAR and re.fullmatch(targets, path) is not None
        return path in targets or any(path.endswith(f".{t}") for t in targets)

def _pattern_key(patterns: Mapping[str, Any], key: str) -> str:
    """PEFT's ``get_pattern_key``: the first pattern that matches a dotted suffix of ``key``."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


def _is_output_layer(path: str, spec) -> bool:
    if spec is not None:
        return spec[0].name == "lm_head" and not spec[0].per_block
    return path == "lm_head" or path.endswith(".lm_head")


def json_type(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------- files
def _folder(folder: str | Path) -> Path:
    path = Path(folder)
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise InputError(f"adapter folder {path} {what}")
    return path


def _inside(root: Path, name: str) -> Path:
    """``root/name``, refusing a symlink that leads outside the adapter folder."""
    path = root / name
    if path.is_symlink() or path.exists():
        real, base = path.resolve(), root.resolve()
        if real != base and base not in real.parents:
            raise AdapterError(f"adapter file {path} is a link to {real}, outside the adapter folder {root}")
    return path


def read_adapter_config(folder: str | Path) -> LoraAdapterConfig:
    """Parse ``<folder>/adapter_config.json``."""
    path = _inside(_folder(folder), CONFIG_FILE)
    return LoraAdapterConfig.from_dict(read_json(path, "adapter config"), str(path))


def find_adapter_weights(folder: str | Path) -> Path:
    """``adapter_model.safetensors`` if present, else ``adapter_model.bin``."""
    root = _folder(folder)
    for name in WEIGHT_FILES:
        if _inside(root, name).is_file():
            return root / name
    raise InputError(f"adapter {root} has no weights: expected {' or '.join(WEIGHT_FILES)}")


def adapter_weight_shapes(folder: str | Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """module path -> ``{"A": (r, in), "B": (out, r), ...}`` (every tensor kind, see :mod:`.tensors`) without
    reading tensor data (safetensors). A module missing one factor has only the other key."""
    return shapes_by_module(find_adapter_weights(folder))


def load_adapter_parts(folder: str | Path, dtype=None) -> dict[str, dict[str, "torch.Tensor"]]:
    """module path -> {kind: tensor} (see :mod:`.tensors`), in ``dtype`` (float32 by default)."""
    return load_parts(find_adapter_weights(folder), dtype)


def load_adapter_tensors(folder: str | Path, dtype=None) -> dict[str, tuple["torch.Tensor", "torch.Tensor"]]:
    """module path -> (A [r, in], B [out, r]) of the modules that have LoRA factors."""
    return {m: (p["A"], p["B"]) for m, p in load_adapter_parts(folder, dtype).items() if "A" in p}


def config_fields() -> tuple[str, ...]:
    """Names of the config fields qadapt reads (for docs and tests)."""
    return tuple(f.name for f in fields(LoraAdapterConfig) if f.name != "source")
