"""Where qadapt keeps what it downloads, and the lock that lets processes share it.

Several processes (a server and a CLI run, two workers) may fill the same cache
at once; :func:`file_lock` serialises them per entry so that one never reads a
folder the other is half-way through writing.
"""

from __future__ import annotations

import hashlib
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:  # POSIX only; elsewhere the cache works unlocked (one process at a time)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The qadapt cache folder: ``cache_dir``, else ``$QADAPT_CACHE``, else ``$XDG_CACHE_HOME/qadapt``
    (``~/.cache/qadapt``), read at call time so tests and servers can redirect it."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("QADAPT_CACHE"):
        return Path(os.environ["QADAPT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "qadapt"


@contextmanager
def file_lock(root: Path, key: str) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``root/locks/<hash of key>.lock`` for the ``with`` block.

    The lock files live apart from the cached data, so a cached folder holds only
    what was downloaded. The lock is released by the kernel if the process dies.
    """
    locks = root / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    path = locks / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".lock")
    with open(path, "a+b") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info("waiting for another process to finish filling the cache for %s", key)
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield path
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
