"""Progress bars for load, download and quantization (tqdm on stderr; off with QADAPT_NO_PROGRESS=1)."""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def enabled() -> bool:
    return os.environ.get("QADAPT_NO_PROGRESS", "") in ("", "0") and sys.stderr.isatty()


def progress(it: Iterable[T], desc: str, unit: str = "it", total: int | None = None) -> Iterable[T]:
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, unit=unit, total=total, disable=not enabled(), leave=False)
