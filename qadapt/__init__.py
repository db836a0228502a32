"""qadapt: quantized base LLMs with full-precision LoRA and X-LoRA adapters."""

from __future__ import annotations

from .errors import AdapterError, FormatError, InputError, QadaptError, SourceError, UnsupportedError

__version__ = "0.1.0"

__all__ = [
    "QadaptError", "InputError", "FormatError", "UnsupportedError", "AdapterError", "SourceError",
    "load", "__version__",
]


def __getattr__(name):  # lazy: `import qadapt` must stay light
    if name == "load":
        from .load_model import load

        return load
    if name == "Model":
        from .api import Model

        return Model
    raise AttributeError(name)
