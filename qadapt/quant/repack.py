"""The 8-row repack of GGUF weights, off the load's critical path.

``qadapt.load`` builds the model inside :func:`deferred`: each q8 layer keeps the file's mapped blocks
and marks its repack pending, so loading costs what mapping the file costs (as llama.cpp's). Then
:func:`start` repacks the pending layers in model order on a background thread (the C call releases the
GIL: the caller goes on tokenizing, building its prompt, ...); a forward that reaches a layer still
pending repacks it itself first (:meth:`GGMLLinear.x8 <qadapt.quant.ggml.GGMLLinear.x8>`), so the first
token waits at most for the layers not yet done. The work is the same either way; only where it waits moves.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from typing import Iterator

from torch import nn

log = logging.getLogger(__name__)

#: held while one layer is repacked (the background pass and a forward may reach the same layer)
LOCK = threading.Lock()
_STATE = threading.local()
_THREADS: "weakref.WeakKeyDictionary[nn.Module, threading.Thread]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Layers built in this block leave their repack pending."""
    _STATE.deferring, _STATE.after = True, []
    try:
        yield
    finally:
        _STATE.deferring = False


def after_pass(fn) -> None:
    """Run ``fn`` (no arguments) once the background pass is done, when layers are being deferred (e.g. dropping
    the file's pages the repacks faulted back in)."""
    if deferring():
        _STATE.after.append(fn)


def deferring() -> bool:
    return getattr(_STATE, "deferring", False)


def start(module: nn.Module) -> threading.Thread | None:
    """Repack ``module``'s pending layers in order on a daemon thread (None: nothing pending)."""
    layers = [m for m in module.modules() if getattr(m, "_pending", None) is not None]
    after, _STATE.after = getattr(_STATE, "after", []), []
    if not layers:
        return None

    def run() -> None:
        try:
            for m in layers:
                m.x8()
            for fn in after:
                fn()
        except Exception:  # noqa: BLE001 - the forward that needs the layer repacks it again and raises
            log.exception("background repack stopped; layers still pending repack on first use")

    t = threading.Thread(target=run, name="qadapt-repack", daemon=True)
    t.start()
    _THREADS[module] = t
    return t


def wait(module: nn.Module) -> None:
    """Until ``module``'s background repack (if any) is done."""
    t = _THREADS.get(module)
    if t is not None:
        t.join()
