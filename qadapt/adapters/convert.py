"""Converting other PEFT adapter types (LoHa, LoKr, ...) to LoRA with PEFT's own ``convert_to_lora``.

PEFT computes each layer's delta weight from the adapter's own parameters and keeps its top singular
directions; the base model's weights play no part, so the conversion runs on a skeleton of the base (its
architecture from the model's config, every base tensor a zero-byte broadcast view): a 70B base costs
nothing beyond the adapter. ``rank``: an int (that rank), or a float in (0, 1] (the smallest rank that keeps
that share of each delta's energy, PEFT's rule).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import InputError, UnsupportedError
from ..io import atomic_dir

log = logging.getLogger(__name__)


def base_config(model: str, gguf_file: str | None = None):
    """The transformers config of a base (a folder or Hub id with config.json, or a GGUF file)."""
    from transformers import AutoConfig

    from ..load_model import _resolve_model_path

    path = _resolve_model_path(model, gguf_file, None)
    try:
        if path.is_file():
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoConfig.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types for configs it cannot read
        raise InputError(f"{model}: cannot read its transformers config ({type(e).__name__}: {e})") from None


def skeleton(config):
    """``AutoModelForCausalLM`` of ``config`` whose every tensor is a zero-byte view of the right shape."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    for mod in model.modules():
        for n, p in list(mod.named_parameters(recurse=False)):
            setattr(mod, n, torch.nn.Parameter(torch.zeros((), dtype=p.dtype).expand(p.shape), requires_grad=False))
        for n, b in list(mod.named_buffers(recurse=False)):
            if b is not None:
                mod.register_buffer(n, torch.zeros((), dtype=b.dtype).expand(b.shape))
    return model


def convert(adapter: str | Path, out: str | Path, model: str, rank: int | float, *, gguf_file: str | None = None,
            force: bool = False) -> dict:
    """Convert the PEFT adapter folder ``adapter`` to a LoRA adapter folder ``out``; a summary back."""
    try:
        import peft
        from peft import PeftModel
    except ImportError:
        raise UnsupportedError("converting adapters needs PEFT: pip install 'peft>=0.21.2'") from None
    if not hasattr(peft, "convert_to_lora"):
        raise UnsupportedError(f"PEFT {peft.__version__} has no convert_to_lora (it came in 0.21): upgrade PEFT")
    folder = Path(adapter)
    if Path(out).exists() and not force:  # before the work, not after it
        raise InputError(f"{out} exists; pass --force to overwrite it")
    cfg = json.loads((folder / "adapter_config.json").read_text()) if (folder / "adapter_config.json").is_file() \
        else None
    if cfg is None:
        raise InputError(f"{folder}: no adapter_config.json")
    if str(cfg.get("peft_type", "")).upper() == "LORA":
        raise InputError(f"{folder} is already a LoRA adapter: nothing to convert")
    base = skeleton(base_config(model, gguf_file))
    try:
        pm = PeftModel.from_pretrained(base, str(folder))
        lora_cfg, state = peft.convert_to_lora(pm, rank)
    except (TypeError, ValueError) as e:
        raise UnsupportedError(f"{folder}: PEFT cannot convert this adapter to LoRA ({e})") from None
    from safetensors.torch import save_file

    lora_cfg.base_model_name_or_path = cfg.get("base_model_name_or_path")
    with atomic_dir(out, force=force) as tmp:
        lora_cfg.save_pretrained(str(tmp))
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "adapter_model.safetensors"))
    ranks = sorted({int(v.shape[0]) for k, v in state.items() if "lora_A" in k})
    log.info("converted %s (%s) to LoRA in %s: %d tensors, ranks %s", folder, cfg.get("peft_type"), out,
             len(state), ranks)
    return {"from": str(folder), "peft_type": cfg.get("peft_type"), "to": str(out), "tensors": len(state),
            "ranks": ranks}
