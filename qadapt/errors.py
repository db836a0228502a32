"""One exception root for every user-facing failure.

The CLI turns a :class:`QadaptError` into a one-line message and ``exit_code``;
anything else escaping is a bug in qadapt.
"""

from __future__ import annotations


class QadaptError(Exception):
    """Root of every error a user can cause (bad file, bad flag, bad adapter)."""

    exit_code = 1


class InputError(QadaptError):
    """A file or argument could not be read or parsed (CLI exit code 2)."""

    exit_code = 2


class FormatError(InputError):
    """A model, adapter or ordering file is malformed or inconsistent."""


class UnsupportedError(QadaptError):
    """Valid input that qadapt does not handle (an architecture, a quant type, a PEFT option)."""


class AdapterError(QadaptError):
    """An adapter does not fit the base model (shapes, targets, names)."""


class SourceError(QadaptError):
    """A model or adapter could not be fetched (Hub, S3, local path)."""


def nearest(name: str, candidates: list[str] | tuple[str, ...]) -> str | None:
    """The closest candidate to ``name`` (for 'did you mean' hints), or None."""
    import difflib

    hits = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return hits[0] if hits else None


def did_you_mean(name: str, candidates) -> str:
    hit = nearest(name, list(candidates))
    return f" (did you mean `{hit}`?)" if hit else ""
