"""Describe a base model without loading its weights: architecture, layer table, config.

``qadapt check`` and ``qadapt ordering create`` need only the shapes and the
block count, so a model is described from ``config.json`` (local or fetched
alone from the Hub) or from a GGUF file's metadata.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError
from .io import read_json
from .layer_maps import LayerMap, get_layer_map, gguf_layer_map

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
_QUANT_METHODS = {"gptq": "gptq", "bitsandbytes": "bnb"}


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    layer_map: LayerMap
    config: dict[str, int] | None  # normalised (layer_maps.NORMALISED_KEYS); None with --arch alone
    source: str  # what was described: "--arch llama", a path, "hub:org/name"
    base_format_hint: str | None  # "gguf", "gptq", "bnb" or "full" when the source says so

    @property
    def num_hidden_layers(self) -> int | None:
        return None if self.config is None else self.config["num_hidden_layers"]


def describe_model(arch: str | None = None, model: str | None = None, *, offline: bool | None = None) -> ModelInfo:
    """From ``arch`` (a table name alone) or ``model`` (HF folder, ``config.json``, ``.gguf`` or Hub id).

    Raises InputError (bad local input), SourceError (Hub unreachable or repo
    missing) or UnsupportedError (an architecture without a table).
    """
    if model is None:
        if arch is None:
            raise InputError("give an architecture (--arch) or a model (--model)")
        lm = get_layer_map(arch)
        return ModelInfo(lm.architecture, lm, None, f"--arch {arch}", None)
    path = Path(model).expanduser()
    if path.exists():
        return _describe_local(path)
    repo = model.split(":", 1)[0]  # ``org/repo:file.gguf``: the repo's config.json describes it
    if model.startswith((".", "/", "~")) or repo.endswith((".gguf", ".json")) or not _HUB_ID.fullmatch(repo):
        raise InputError(f"model {model} does not exist (not a local path, nor a Hugging Face Hub id)")
    return _describe_hub(repo, offline)


def _describe_local(path: Path) -> ModelInfo:
    from .formats.gguf import GGUFFile, is_gguf

    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise InputError(f"model folder {path} has no config.json")
        return _from_hf_config(read_json(cfg, "model config"), str(cfg))
    if is_gguf(path):
        gf = GGUFFile(path)
        lm = gguf_layer_map(gf)
        return ModelInfo(lm.architecture, lm, lm.normalise_gguf_metadata(gf.arch_metadata), str(path), "gguf")
    if path.suffix == ".json":
        return _from_hf_config(read_json(path, "model config"), str(path))
    raise InputError(f"model {path}: expected a model folder with config.json, a config.json or a .gguf file")


def _from_hf_config(raw: Any, source: str) -> ModelInfo:
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise InputError(f"{source}: no `model_type` string, cannot tell the architecture")
    lm = get_layer_map(raw["model_type"])
    try:
        config = lm.normalise_hf_config(raw)
    except InputError as e:
        raise type(e)(f"{source}: {e}") from None
    qcfg = raw.get("quantization_config")
    method = qcfg.get("quant_method") if isinstance(qcfg, dict) else None
    return ModelInfo(lm.architecture, lm, config, source, _QUANT_METHODS.get(method, "full"))


def _describe_hub(repo: str, offline: bool | None) -> ModelInfo:
    """Fetch ``config.json`` alone; offline mode uses only the local Hub cache."""
    from .hub import download

    path = download(repo, filename="config.json", offline=offline, what=f"config.json of Hub model `{repo}`")
    log.debug("fetched config.json of Hub model %s to %s", repo, path)
    return _from_hf_config(read_json(path, "model config"), f"hub:{repo}")
