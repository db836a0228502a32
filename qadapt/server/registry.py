"""The server's adapter registry: public names, versions, reference counts, LRU and limits.

Adapters live in the :class:`~qadapt.api.Model` under internal keys (``name`` for
the adapters loaded at start, ``name@N`` for later loads); the registry maps each
public name to its current key. A request resolves its keys once, when it is
admitted, and holds a reference on them until it ends, so unloading or replacing
an adapter only changes the mapping: the old key leaves the model when the last
request using it finishes. Past ``max_adapters`` resident adapters the least
recently used one that no request holds is unloaded (its source is remembered, and
it is loaded again on its next use), and likewise past ``max_bytes`` of resident
adapter memory; adapters above ``max_rank`` are refused from their config and
weight headers, before any tensor is read. :meth:`remember` makes a name known
without loading it (a fleet replica loads the adapters it is routed on first use).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters.mix import MixSpec, mix
from ..errors import InputError, QadaptError

log = logging.getLogger(__name__)

BASE_ALIASES = ("base",)


class NotFound(QadaptError):
    """An unknown model or adapter name (HTTP 404)."""


class Forbidden(QadaptError):
    """Runtime adapter management is off, or a local path leaves the adapter root (HTTP 403)."""


class Busy(QadaptError):
    """A capacity limit is reached for now: queue full, every resident adapter in use (HTTP 429)."""


class Unavailable(QadaptError):
    """The server is shutting down and takes no new work (HTTP 503)."""


@dataclass
class Known:
    """A public adapter name: where it comes from and which key holds it now (None: not resident)."""

    name: str
    source: str
    adapter_source: str | None
    key: str | None
    rank: int
    trusted: bool = False  # given at start: reloaded from its folder without the adapter-root check
    nbytes: int = 0  # memory of the resident version (0 while evicted)
    token: str | None = field(default=None, repr=False)  # the Hub token it was fetched with (kept in memory)
    last_used: float = field(default_factory=time.monotonic)
    loaded_at: float = field(default_factory=time.time)


class AdapterRegistry:
    """Thread-safe: the event loop resolves and acquires, the engine thread releases, loads run in workers."""

    def __init__(self, model: Any, *, max_adapters: int = 0, max_rank: int = 0, adapter_root: str | None = None,
                 default: tuple[str, ...] = (), max_mixes: int = 8, max_bytes: int = 0):
        self.model = model
        self.max_bytes = max_bytes
        self.max_mixes = max_mixes
        self._mixes: OrderedDict[MixSpec, str] = OrderedDict()  # recent last
        self.mixes_built = 0
        self.max_adapters = max_adapters
        self.max_rank = max_rank
        self.adapter_root = Path(adapter_root).resolve() if adapter_root else None
        self._lock = threading.RLock()
        self._load_lock = threading.Lock()  # one load at a time (they mutate the model's layers)
        self._known: dict[str, Known] = {}
        self._refs: dict[str, int] = {}
        self._retired: set[str] = set()
        self._version = 0
        self.loads = self.evictions = 0
        for name, adapter in model.adapters.items():  # loaded at start: key == name
            check_name(name)
            rank = max((f.A.shape[0] for f in adapter.factors.values()), default=0)
            self._check_rank(name, rank)
            self._known[name] = Known(name, str(adapter.folder), "local", name, rank, trusted=True,
                                      nbytes=adapter.nbytes)
        self.default = self._checked_default(default)
        if max_adapters and len(self._known) > max_adapters:
            raise InputError(f"{len(self._known)} adapters given at start, more than --max-adapters {max_adapters}")
        if max_bytes and self.resident_bytes() > max_bytes:
            raise InputError(f"the adapters given at start hold {self.resident_bytes()} bytes, more than "
                             f"--max-adapter-bytes {max_bytes}")

    # ------------------------------------------------------------------ queries
    def names(self) -> list[str]:
        with self._lock:
            return list(self._known)

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"name": k.name, "source": k.source, "adapter_source": k.adapter_source, "rank": k.rank,
                     "resident": k.key is not None, "version": k.key, "in_use": self._refs.get(k.key or "", 0),
                     "loaded_at": int(k.loaded_at)} for k in self._known.values()]

    def retired_in_use(self) -> list[str]:
        """Versions replaced or unloaded that running requests still hold."""
        with self._lock:
            return sorted(self._retired)

    def resident(self) -> int:
        with self._lock:
            return sum(1 for k in self._known.values() if k.key is not None) + len(self._retired)

    def resident_bytes(self) -> int:
        with self._lock:
            return sum(k.nbytes for k in self._known.values() if k.key is not None)

    def in_use(self) -> int:
        """References held by requests (queued or running); 0 when the server is idle."""
        with self._lock:
            return sum(self._refs.values())

    def is_known(self, name: str) -> bool:
        with self._lock:
            return name in self._known

    # ------------------------------------------------------------------ requests
    def acquire(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """Keys of ``names``, loading evicted ones again; each key is held until :meth:`release`."""
        while True:
            with self._lock:
                missing = [n for n in names if n not in self._known]
                if missing:
                    raise NotFound(f"adapter `{missing[0]}` is not loaded (loaded: {', '.join(self._known) or 'none'})")
                evicted = [n for n in names if self._known[n].key is None]
                if not evicted:
                    keys = tuple(self._known[n].key for n in names)
                    now = time.monotonic()
                    for n, k in zip(names, keys):
                        self._known[n].last_used = now
                        self._refs[k] = self._refs.get(k, 0) + 1
                    return keys  # type: ignore[return-value]
                k = self._known[evicted[0]]
            log.info("adapter %s was evicted; loading it again from %s", k.name, k.source)
            self.load(k.name, k.source, k.adapter_source, replace=True, _reload=True, _trusted=k.trusted,
                      token=k.token)

    def acquire_mix(self, names: tuple[str, ...], weights: tuple[float, ...], strategy: str = "linear",
                    density: float = 1.0, majority_sign: str = "total", seed: int = 0) -> tuple[str, ...]:
        """The key of the mix of ``names`` (see :mod:`qadapt.adapters.mix`), held like :meth:`acquire`'s.
        A mix is built once per (adapter versions, weights, strategy, ...) and cached; past ``max_mixes`` the
        least recently used idle one is dropped."""
        if len(set(names)) != len(names):
            raise InputError("an adapter appears twice in the mix")
        keys = self.acquire(names)  # loads evicted parts; held while the mix is built
        try:
            spec = MixSpec(keys, tuple(float(w) for w in weights), strategy, float(density), majority_sign,
                           int(seed) if strategy.startswith("dare") else 0).check()
            with self._lock:
                key = self._mixes.get(spec)
                if key is not None:
                    self._mixes.move_to_end(spec)
                    self._refs[key] = self._refs.get(key, 0) + 1
                    return (key,)
            with self._load_lock:
                with self._lock:
                    key = self._mixes.get(spec)
                    if key is not None:  # built meanwhile
                        self._refs[key] = self._refs.get(key, 0) + 1
                        return (key,)
                    self._version += 1
                    key = f"mix@{self._version}"
                built = mix(key, [self.model.adapters[k] for k in keys], spec, self.model.targetable_layers())
                self._check_rank("mix of " + "+".join(names), max((f.A.shape[0] for f in built.factors.values()),
                                                                   default=0))
                self.model.add_adapter(built)
                with self._lock:
                    self._mixes[spec] = key
                    self._refs[key] = self._refs.get(key, 0) + 1
                    self.mixes_built += 1
                    self._trim_mixes()
                log.info("built adapter mix %s: %s (%s)", key, ", ".join(f"{n}*{w:g}" for n, w in zip(names, weights)),
                         spec.effective)
                return (key,)
        finally:
            self.release(keys)

    def _trim_mixes(self) -> None:
        """Drop least recently used idle mixes past ``max_mixes`` (lock held)."""
        for spec, key in list(self._mixes.items()):
            if len(self._mixes) <= self.max_mixes:
                return
            if not self._refs.get(key):
                del self._mixes[spec]
                self._drop(key)

    def mixes(self) -> int:
        with self._lock:
            return len(self._mixes)

    def release(self, keys: tuple[str, ...]) -> None:
        with self._lock:
            for k in keys:
                self._refs[k] -= 1
                if not self._refs[k]:
                    del self._refs[k]
                    if k in self._retired:
                        self._drop(k)
            self._trim_mixes()
            self._trim_bytes("")

    # ------------------------------------------------------------------ management
    def load(self, name: str, source: str, adapter_source: str | None = None, *, replace: bool = False,
             _reload: bool = False, _trusted: bool = False, token: str | None = None) -> Known:
        """Fetch and load an adapter under ``name`` (blocking: call from a worker thread)."""
        check_name(name)
        with self._load_lock:
            with self._lock:
                cur = self._known.get(name)
                if _reload and cur is not None and cur.key is not None:
                    return cur  # another request loaded it meanwhile
                if cur is not None and cur.key is not None and not replace:
                    raise InputError(f"an adapter named `{name}` is already loaded; unload it first "
                                     "(or pass load_inplace: true to replace it)")
            folder = Path(source) if _trusted else self.fetch(source, adapter_source, token)
            rank = adapter_rank(folder)
            self._check_rank(name, rank)
            with self._lock:
                self._make_room(name)
                self._version += 1
                key = f"{name}@{self._version}"
            self.model.load_adapter(key, str(folder), "local")
            nbytes = self.model.adapters[key].nbytes
            with self._lock:
                if self.max_bytes and nbytes > self.max_bytes:
                    self._drop(key)
                    raise InputError(f"adapter `{name}` holds {nbytes} bytes, more than --max-adapter-bytes "
                                     f"{self.max_bytes} by itself")
                old = self._known.get(name)
                entry = Known(name, source, adapter_source, key, rank, trusted=_trusted, token=token, nbytes=nbytes)
                self._known[name] = entry
                if old is not None and old.key is not None:
                    self._retire(old.key)
                self.loads += 1
                self._trim_bytes(name)
            log.info("adapter %s loaded from %s as %s (rank %d)", name, source, key, rank)
            return entry

    def remember(self, name: str, folder: str) -> None:
        """Know ``name`` (a local adapter folder given at start) without loading it: loaded on first use."""
        check_name(name)
        rank = adapter_rank(Path(folder))
        self._check_rank(name, rank)
        with self._lock:
            if name in self._known:
                raise InputError(f"adapter `{name}` is given twice")
            self._known[name] = Known(name, str(folder), "local", None, rank, trusted=True)

    def warm(self, names: tuple[str, ...]) -> int:
        """Load the known ones of ``names`` that are not resident (a fleet replica's adapter-affinity load,
        blocking); how many it loaded."""
        loaded = 0
        for name in names:
            with self._lock:
                k = self._known.get(name)
                if k is None or k.key is not None:
                    continue
            self.load(k.name, k.source, k.adapter_source, replace=True, _reload=True, _trusted=k.trusted,
                      token=k.token)
            loaded += 1
        return loaded

    def ensure(self, name: str, source: str, adapter_source: str | None = None, token: str | None = None) -> Known:
        """``name`` resident, loading it from ``source`` unless it already is (LoRAX's just-in-time loading)."""
        return self.load(name, source, adapter_source, replace=True, _reload=True, token=token)

    def unload(self, name: str) -> None:
        with self._lock:
            k = self._known.pop(name, None)
            if k is None:
                raise NotFound(f"adapter `{name}` is not loaded (loaded: {', '.join(self._known) or 'none'})")
            if k.key is not None:
                self._retire(k.key)
            self.default = tuple(n for n in self.default if n != name)

    def set_default(self, names: tuple[str, ...]) -> None:
        with self._lock:
            self.default = self._checked_default(names)

    def fetch(self, source: str, adapter_source: str | None, token: str | None = None) -> Path:
        """A local folder for an adapter source; local paths must stay inside the adapter root."""
        from ..adapters.sources import resolve_adapter

        kind = adapter_source or guess_source(source, self.adapter_root)
        if kind == "local":
            return self.confine(source)
        return resolve_adapter(source, kind, token=token)

    def confine(self, path: str) -> Path:
        """``path`` (relative to the adapter root, or absolute) resolved, refused if it leaves the root."""
        from ..adapters.sources import adapter_subfolder

        if self.adapter_root is None:
            raise Forbidden(f"local adapter `{path}`: loading local adapters at run time needs --adapter-root")
        p = Path(path)
        if p.is_absolute():
            real = Path(os.path.realpath(p))
            if not real.is_relative_to(self.adapter_root):
                raise Forbidden(f"local adapter `{path}` resolves to {real}, outside the adapter root "
                                f"{self.adapter_root}")
        else:
            try:
                real = adapter_subfolder(self.adapter_root, path).resolve()
            except InputError as e:
                raise Forbidden(f"local adapter `{path}`: {e}") from None
        if not real.is_dir():
            raise NotFound(f"local adapter `{path}`: no such folder under the adapter root {self.adapter_root}")
        return real

    # ------------------------------------------------------------------ internals
    def _checked_default(self, names) -> tuple[str, ...]:
        names = tuple(dict.fromkeys(names))
        unknown = [n for n in names if n not in self._known]
        if unknown:
            raise NotFound(f"adapter `{unknown[0]}` is not loaded (loaded: {', '.join(self._known) or 'none'})")
        return names

    def _check_rank(self, name: str, rank: int) -> None:
        if self.max_rank and rank > self.max_rank:
            raise InputError(f"adapter `{name}` has rank {rank}, above the server's --max-rank {self.max_rank}")

    def _make_room(self, name: str) -> None:
        """Evict least-recently-used idle adapters until one more (``name``) fits (lock held)."""
        if not self.max_adapters:
            return
        others = lambda: [k for k in self._known.values() if k.key is not None and k.name != name]  # noqa: E731
        while len(others()) >= self.max_adapters:
            idle = [k for k in others() if not self._refs.get(k.key)]
            if not idle:
                raise Busy(f"all {self.max_adapters} resident adapters are in use (--max-adapters); retry later")
            self._evict(min(idle, key=lambda k: k.last_used), f"--max-adapters {self.max_adapters}")

    def _trim_bytes(self, name: str) -> None:
        """Evict least-recently-used idle adapters other than ``name`` while resident memory is past
        ``max_bytes`` (lock held); adapters held by requests stay until their requests end."""
        while self.max_bytes and self.resident_bytes() > self.max_bytes:
            idle = [k for k in self._known.values() if k.key is not None and k.name != name
                    and not self._refs.get(k.key)]
            if not idle:
                log.warning("adapters hold %d bytes, past --max-adapter-bytes %d, all in use: evicting when "
                            "they are free", self.resident_bytes(), self.max_bytes)
                return
            self._evict(min(idle, key=lambda k: k.last_used), f"--max-adapter-bytes {self.max_bytes}")

    def _evict(self, victim: Known, why: str) -> None:
        log.info("evicting adapter %s (least recently used; %s)", victim.name, why)
        self._retire(victim.key)
        victim.key = None
        victim.nbytes = 0
        self.evictions += 1

    def _retire(self, key: str) -> None:
        if self._refs.get(key):
            self._retired.add(key)  # unloaded when its last request ends
        else:
            self._drop(key)

    def _drop(self, key: str) -> None:
        self._retired.discard(key)
        if key in self.model.adapters:
            self.model.unload_adapter(key)
            log.info("adapter version %s unloaded", key)


def check_name(name: str) -> None:
    if not isinstance(name, str) or not name.strip():
        raise InputError("an adapter name must be a non-empty string")
    if "@" in name:
        raise InputError(f"adapter name `{name}`: `@` is reserved for adapter versions")
    if name in BASE_ALIASES:
        raise InputError(f"adapter name `{name}` is reserved for the base model")


def guess_source(source: str, root: Path | None) -> str:
    """``s3`` for s3:// URLs; ``local`` for paths (absolute, ./ or ../, or present under the root); else ``hub``."""
    from ..adapters.sources import is_hub_id

    if source[:5].lower() == "s3://":
        return "s3"
    if source.startswith(("/", "./", "../", "~")) or ".." in source.split("/"):
        return "local"
    if root is not None and (root / source).exists():
        return "local"
    return "hub" if is_hub_id(source) else "local"


def adapter_rank(folder: Path) -> int:
    """The largest LoRA rank of an adapter, from its config and its weight headers (no tensor data read)."""
    from ..adapters.peft_format import adapter_weight_shapes, read_adapter_config

    cfg = read_adapter_config(folder)
    rank = max([cfg.r, *cfg.rank_pattern.values()])
    try:
        shapes = adapter_weight_shapes(folder)
    except QadaptError:
        return int(rank)  # the loader reports the weights' problem itself
    return int(max([rank, *(s["A"][0] for s in shapes.values() if "A" in s)]))
