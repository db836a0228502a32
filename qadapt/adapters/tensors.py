"""What each tensor of a PEFT adapter file is, as a table: the name suffix after the module path -> its kind.

PEFT 0.21 writes, per module (after ``base_model.model.``; X-LoRA experts under ``base_model.lora_model.model.``,
with the adapter's name after ``lora_A`` / ``lora_B``):

=========================================  ===========  ==================================================
suffix                                     kind         what it is
=========================================  ===========  ==================================================
``lora_A.weight`` / ``lora_B.weight``      A / B        the LoRA factors [r, in] and [out, r]
``lora_B.bias``                            B_bias       ``lora_bias=True``: a bias on B [out]
``lora_magnitude_vector``                  magnitude    DoRA's magnitude [out]
``lora_embedding_A`` / ``lora_embedding_B`` emb_A / emb_B LoRA on an embedding: [r, vocab] and [hidden, r]
``base_layer.weight``                      weight       the module's own weight, saved when an embedding or
                                                        the output layer is targeted (PEFT replaces the
                                                        base's with it on load)
``base_layer.bias`` / ``bias``             bias         a trained base bias (``bias="lora_only"|"all"``)
``weight``                                 weight       a ``modules_to_save`` copy (the whole module)
``token_adapter.trainable_tokens_delta``   tt_delta     ``trainable_token_indices``: the new token rows
=========================================  ===========  ==================================================
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AdapterError, FormatError
from ..io import read_safetensors_header

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

_NAME = r"(?:\.[^.]+)?"  # an adapter name PEFT may keep in the key (X-LoRA experts)
#: (suffix regex, kind), tried in this order after the shortest module path that leaves a known suffix
SUFFIXES: tuple[tuple[str, str], ...] = (
    (rf"lora_A{_NAME}\.weight", "A"),
    (rf"lora_B{_NAME}\.weight", "B"),
    (rf"lora_B{_NAME}\.bias", "B_bias"),
    (rf"lora_magnitude_vector{_NAME}(?:\.weight)?", "magnitude"),
    (rf"lora_embedding_A{_NAME}", "emb_A"),
    (rf"lora_embedding_B{_NAME}", "emb_B"),
    (r"base_layer\.weight", "weight"),
    (r"base_layer\.bias", "bias"),
    (rf"token_adapter\.trainable_tokens_delta{_NAME}", "tt_delta"),
    (r"weight", "weight"),
    (r"bias", "bias"),
)
_RX = re.compile(r"(?:base_model\.model\.|base_model\.lora_model\.model\.)?(?P<module>.+?)\.(?P<suffix>"
                 + "|".join(f"(?P<k{i}>{rx})" for i, (rx, _) in enumerate(SUFFIXES)) + ")")
#: the kinds that make a module a LoRA (what PEFT's target matching decides); the rest are saved modules
LORA_KINDS = frozenset({"A", "B", "B_bias", "magnitude", "emb_A", "emb_B"})


def parse_key(key: str) -> tuple[str, str] | None:
    """``(module path, kind)`` of a PEFT tensor name, or None."""
    m = _RX.fullmatch(key)
    if m is None:
        return None
    kind = next(SUFFIXES[i][1] for i in range(len(SUFFIXES)) if m.group(f"k{i}") is not None)
    return m.group("module"), kind


def parse_weight_key(key: str) -> tuple[str, str] | None:
    """``(module path, "A"|"B")`` of a LoRA factor's name, or None for other tensors."""
    parsed = parse_key(key)
    return parsed if parsed is not None and parsed[1] in ("A", "B") else None


def group(names, path: Path) -> dict[str, dict[str, str]]:
    """module -> {kind: tensor name}; unknown tensors are logged and left out."""
    out: dict[str, dict[str, str]] = {}
    for name in names:
        parsed = parse_key(name)
        if parsed is None:
            log.warning("%s: ignoring tensor `%s` (not a tensor kind PEFT writes for LoRA)", path, name)
            continue
        module, kind = parsed
        slot = out.setdefault(module, {})
        if kind in slot:
            raise FormatError(f"{path}: module `{module}` has two {kind} tensors: `{slot[kind]}` and `{name}`")
        slot[kind] = name
    return out


def load_bin(path: Path) -> dict[str, "torch.Tensor"]:
    """A PEFT ``.bin`` state dict, through torch's restricted unpickler only."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the restricted unpickler raises several types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FormatError(
            f"{path}: refused to load: not a plain tensor pickle ({first}); "
            "convert the adapter to adapter_model.safetensors"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FormatError(f"{path}: expected a dict of tensors")
    return state


def raw_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    if path.suffix == ".safetensors":
        return {k: tuple(v["shape"]) for k, v in read_safetensors_header(path).items()}
    return {k: tuple(v.shape) for k, v in load_bin(path).items()}


def shapes_by_module(path: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """module path -> {kind: shape} without reading tensor data (safetensors)."""
    shapes = raw_shapes(path)
    return {m: {k: shapes[n] for k, n in slot.items()} for m, slot in group(shapes, path).items()}


def load_parts(path: Path, dtype=None) -> dict[str, dict[str, "torch.Tensor"]]:
    """module path -> {kind: tensor}, private float copies (``dtype``; by default float32, but plain LoRA
    factors a file stores in bfloat16/float16 keep that dtype), each module's
    factors checked for pairing and rank. B is the transposed view of a contiguous B^T [r, out]: the layout
    the second matmul reads, so each factor is in memory once."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        read_safetensors_header(path)  # validates sizes before any allocation
        state = load_file(str(path))
    else:
        state = load_bin(path)
    dt = dtype or torch.float32
    out: dict[str, dict[str, torch.Tensor]] = {}
    for module, slot in group(state, path).items():
        for a, b, what in (("A", "B", "lora"), ("emb_A", "emb_B", "lora_embedding")):
            if (a in slot) != (b in slot):
                missing = f"{what}_B" if a in slot else f"{what}_A"
                raise AdapterError(f"{path}: module `{module}` has no {missing} weight")
            if a in slot:
                ta, tb = state[slot[a]], state[slot[b]]
                if ta.ndim != 2 or tb.ndim != 2 or ta.shape[0] != tb.shape[1]:
                    raise AdapterError(f"{path}: module `{module}`: {what}_A {tuple(ta.shape)} and {what}_B "
                                       f"{tuple(tb.shape)} do not share a rank")
        if ("B_bias" in slot or "magnitude" in slot) and "A" not in slot:
            raise AdapterError(f"{path}: module `{module}` has a {'lora_B bias' if 'B_bias' in slot else 'DoRA magnitude'}"
                               " but no lora_A/lora_B weights")
        parts = {}
        # plain LoRA factors stored in half precision stay so (both the same dtype): exact as they are, and
        # half the bytes each decode step streams; the rest (DoRA, biases, embeddings) becomes ``dt``
        keep = dtype is None and "A" in slot and not slot.keys() & {"B_bias", "magnitude"} \
            and state[slot["A"]].dtype == state[slot["B"]].dtype in (torch.bfloat16, torch.float16)
        for kind, name in slot.items():
            t = state[name]
            to = t.dtype if keep and kind in ("A", "B") else dt
            if kind == "B":
                parts[kind] = t.T.to(to, memory_format=torch.contiguous_format, copy=True).T
            else:
                parts[kind] = t.to(to, copy=True)
        out[module] = parts
    return out
