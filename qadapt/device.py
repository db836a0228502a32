"""A model on a compute device: its weights moved there, its adapters applied from device slots.

``qadapt.load(..., device="cuda")`` builds the model as on CPU (GGUF layers keep the file's blocks:
``kernels="triton"``), then :func:`place` moves every weight and buffer to the device and gives the
model a :class:`~qadapt.adapters.slots.SlotBank`: from then on every forward names each row's adapters
and each LoRA layer adds them with one gathered kernel pair (the factors stay in host memory and
are copied into the slots the batch needs). Rows whose adapters need more than ``scale * B A x`` (DoRA,
a LoRA bias, saved modules, aLoRA) run the general path of :class:`~qadapt.adapters.lora.LoraLinear`
instead, those adapters' tensors held on the device from attach. Token ids and positions go to the device in
:meth:`Model.step`; its logits come back to the host, where sampling runs.

``device="cpu"`` with ``kernels="triton"`` runs the same code on CPU under Triton's interpreter
(``TRITON_INTERPRET=1``): how CI tests the device path without a GPU.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import UnsupportedError

#: device slots for adapters, and their rank, unless load(..., max_slots=, max_slot_rank=) says otherwise
DEFAULT_SLOTS = 16
DEFAULT_SLOT_RANK = 64


def check_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UnsupportedError(f"device={str(device)!r}: torch sees no CUDA device (a CPU build of torch, or no GPU "
                               "visible); install torch's CUDA build on a machine with an NVIDIA GPU")
    if dev.type not in ("cpu", "cuda"):
        raise UnsupportedError(f"device={str(device)!r}: qadapt runs on cpu and cuda")
    return dev


def place(model: Any, device: str | torch.device, *, slots: int = DEFAULT_SLOTS,
          slot_rank: int = DEFAULT_SLOT_RANK) -> None:
    """Move ``model`` to ``device`` and apply its adapters through device slots from now on."""
    from .adapters.slots import SlotBank
    from .quant.bnb import BnbLinear
    from .quant.ggml import GGMLLinear
    from .quant.gptq import GPTQLinear
    from .quant.triton import require
    from .quant.triton.gptq import BITS as GPTQ_TRITON_BITS

    dev = check_device(device)
    for name, m in model.decoder.named_modules():
        path = getattr(m, "path", None)
        if isinstance(m, GGMLLinear) and path not in ("triton", "blockwise", "dense"):
            raise UnsupportedError(f"{name}: a GGUF layer built for the {path} CPU kernels cannot run on {dev}; "
                                   "load with kernels='triton'")
        if isinstance(m, GPTQLinear) and (dev.type == "cuda" or m.bits in GPTQ_TRITON_BITS):
            m.use_triton()  # the packed codes through the Triton kernel (2/4/8 bits; 3 refused by name)
        if isinstance(m, BnbLinear):
            m.use_triton()  # the stored 4-bit codes / int8 CB through the Triton kernel (bitsandbytes' weight)
    if any(getattr(m, "path", None) == "triton" for m in model.decoder.modules()):
        require(dev, "the Triton kernels")
    model.decoder.to(dev)
    model.device = dev
    model._slots = SlotBank(slots, slot_rank, dev)
    if dev.type == "cuda":
        from .runtime import graphs

        model._graphs = graphs.DecodeGraphs(model) if graphs.enabled() else None


def on_device(model: Any, a: Any) -> Any:
    """``a`` as the device runs it: plain LoRA factors stay in host memory (the slots copy the batch's in);
    an adapter that runs the general path (:attr:`~qadapt.adapters.lora.LoraAdapter.general`) and every embedding
    part sit on the device."""
    from dataclasses import replace

    dev = model.device
    move = lambda t: None if t is None else t.to(dev)  # noqa: E731
    if a.general:
        a = replace(a, factors={p: replace(f, A=move(f.A), B=move(f.B), bias=move(f.bias),
                                           magnitude=move(f.magnitude), dora=move(f.dora))
                                for p, f in a.factors.items()},
                    saved={p: replace(m, weight=move(m.weight), bias=move(m.bias), row_ids=move(m.row_ids),
                                      row_weight=move(m.row_weight)) for p, m in a.saved.items()})
    e = a.embedding
    if e is not None:
        a = replace(a, embedding=replace(e, table=move(e.table), token_ids=move(e.token_ids),
                                         token_rows=move(e.token_rows), A=move(e.A), B=move(e.B)))
    return a


def xlora_on_device(model: Any) -> None:
    """X-LoRA on the device: its classifier and its experts' factors there (every expert runs on every token,
    weighted per token, so they stay resident rather than in slots)."""
    from dataclasses import replace

    from .adapters.lora import LoraLinear

    dev, x = model.device, model._xlora
    x.classifier.to(dev)
    for m in model.decoder.modules():
        if isinstance(m, LoraLinear):
            for n in x.order:
                if n in m.adapters:
                    f = m.adapters[n]
                    m.adapters[n] = replace(f, A=f.A.to(dev), B=f.B.to(dev))
                    m._bt[n] = m._bt[n].to(dev)


def slot_context(model: Any, active: tuple[str, ...] | None, rows: tuple[tuple[str, ...], ...] | None,
                 alora: Any, ids: torch.Tensor | None) -> Any:
    """The forward's adapter context with every row's adapters in device slots (None: no adapters)."""
    from .adapters.lora import AdapterContext, LoraLinear, adapters_epoch

    keep = lambda names: tuple(n for n in names if n not in model._merged)  # noqa: E731
    if rows is not None:
        per_row = tuple(keep(r) for r in rows)
    else:
        batch = ids.shape[0] if ids is not None else len(alora) if alora is not None else 1
        per_row = (keep(model._active if active is None else active),) * batch
    if not any(per_row):
        return None
    epoch = adapters_epoch()
    cached = getattr(model, "_slot_layers", None)
    if cached is None or cached[0] != epoch:  # the LoRA wrappers change only when adapters do
        cached = model._slot_layers = (epoch, [m for m in model.decoder.modules() if isinstance(m, LoraLinear)])
    # rows with an adapter beyond plain LoRA run all their adapters on the general path, in order (as on the CPU:
    # DoRA scales the output so far); the others take slots
    adapters = model.adapters
    slow = {i for i, r in enumerate(per_row) if any(n in adapters and adapters[n].general for n in r)}
    fast = tuple(() if i in slow else r for i, r in enumerate(per_row))
    indices = model._slots.prepare(fast, cached[1], epoch) if any(fast) else []
    ctx = AdapterContext(rows=per_row, alora=model._alora_starts(per_row, alora, ids))
    ctx.extra["slots"] = (model._slots, indices)
    ctx.extra["device"] = model.device
    if slow:
        rows_of: dict[str, list[int]] = {}
        for i in sorted(slow):
            for n in per_row[i]:
                rows_of.setdefault(n, []).append(i)
        ctx.extra["general_rows"] = {n: torch.tensor(ix, device=model.device) for n, ix in rows_of.items()}
    return ctx
