"""The adapter-affinity key of a request: which adapters it needs, as one stable string.

A fleet (:mod:`qadapt.server.fleet`) sends each request to a replica that already holds this key's
adapters (Ray Serve's multiplexed model id). The key reads the body the way the endpoints do
(:mod:`.openai_api`, :mod:`.lorax_api`) without validating it: a malformed request gets the key ""
(any replica), and that replica answers it with the endpoint's own error. Nothing here decides what a
request computes; a key that routes badly costs an adapter load, never a wrong answer.

Format: adapter names joined by ``@`` (a character adapter names cannot hold), sorted for a plain sum
(``a@b``), in request order for a weighted mix followed by ``@@`` and the mix (``a@b@@ties(0.5,0.5)``).
"""

from __future__ import annotations

import json
from typing import Any, Iterable

OPENAI_PATHS = ("/v1/completions", "/v1/chat/completions")
LORAX_PATHS = ("/", "/generate", "/generate_stream")


def routing_key(path: str, body: bytes, *, base_names: Iterable[str] = (), listed: list[str] | None = None) -> str:
    """The key of a request to ``path`` with JSON ``body``. ``base_names``: the names that mean the base
    model; ``listed``: the adapter order of ``GET /lora-adapters`` (llama.cpp's integer ``lora`` ids)."""
    if path not in OPENAI_PATHS and path not in LORAX_PATHS:
        return ""
    try:
        req = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError):
        return ""
    if not isinstance(req, dict):
        return ""
    base = set(base_names) | {"base"}
    try:
        if path in OPENAI_PATHS:
            return _openai(req, base, listed or [])
        return _lorax(req, base)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError):
        return ""


def key_names(key: str) -> tuple[str, ...]:
    """The adapter names a key needs."""
    names = key.split("@@", 1)[0]
    return tuple(n for n in names.split("@") if n)


def _sum(names: Iterable[Any]) -> str:
    return "@".join(sorted({str(n) for n in names if n}))


def _mix(names: list[Any], weights: list[Any], how: str) -> str:
    if not names:
        return ""
    return "@".join(str(n) for n in names) + "@@" + how + "(" + ",".join(f"{float(w):g}" for w in weights) + ")"


def _openai(req: dict[str, Any], base: set[str], listed: list[str]) -> str:
    lora = req.get("lora")
    if isinstance(lora, list):
        names, weights = [], []
        for item in lora:
            ident, scale = item.get("id"), item.get("scale", 1.0)
            if isinstance(ident, int):
                if not 0 <= ident < len(listed):
                    return ""
                ident = listed[ident]
            if scale:
                names.append(ident)
                weights.append(scale)
        return _mix(names, weights, "cat")
    adapters = req.get("adapters")
    if isinstance(adapters, dict):
        return _mix(list(adapters), list(adapters.values()), "cat")
    if isinstance(adapters, list):
        return _sum(adapters)
    model = req.get("model")
    return "" if not isinstance(model, str) or model in base else model


def _lorax(req: dict[str, Any], base: set[str]) -> str:
    p = req.get("parameters") or {}
    merged = p.get("merged_adapters")
    if isinstance(merged, dict):
        ids = list(merged.get("ids") or [])
        weights = list(merged.get("weights") or [1.0] * len(ids))
        return _mix(ids, weights, str(merged.get("merge_strategy", "linear")).lower())
    adapter = p.get("adapter_id")
    return adapter if isinstance(adapter, str) and adapter not in base else ""
