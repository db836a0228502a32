"""The shipped demo: where its files are, loading it, and the side-by-side table of ``qadapt demo``."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError
from . import tasks

log = logging.getLogger(__name__)

QUANTS = ("Q8_0", "Q4_0")
DEMO_PROMPTS = (  # one per skill (upper, french, words, reverse); none is in any training set (tasks.is_held_out)
    "Q: red cow and the queen =>",
    "Q: a quiet lion helps the happy bear =>",
    "Q: 9 6 0 8 =>",
    "Q: frog, bee, ship, mouse, lion =>",
)
DATA = Path(__file__).resolve().parent.parent / "data" / "demo"


@dataclass(frozen=True)
class DemoPaths:
    """The shipped demo files (inside the installed package)."""

    root: Path
    gguf: dict[str, Path]  # quant type -> base file
    adapters_dir: Path  # one sub-folder per skill, plus the X-LoRA classifier files
    adapters: dict[str, Path]  # skill -> PEFT adapter folder
    lora_ordering: Path
    xlora_ordering: Path
    tokenizer: Path
    manifest: Path

    def to_json(self) -> dict[str, Any]:
        return {k: ({n: str(p) for n, p in v.items()} if isinstance(v, dict) else str(v))
                for k, v in self.__dict__.items()}


def paths(folder: str | os.PathLike | None = None) -> DemoPaths:
    """Where the demo files are (``folder`` overrides the packaged ``qadapt/data/demo``)."""
    root = Path(folder) if folder is not None else DATA
    if not (root / "qadapt-demo.Q8_0.gguf").exists():
        raise InputError(f"the demo files are missing from {root}; regenerate them with `python tools/make_demo.py`")
    return DemoPaths(
        root=root, gguf={q: root / f"qadapt-demo.{q}.gguf" for q in QUANTS}, adapters_dir=root / "adapters",
        adapters={s: root / "adapters" / s for s in tasks.SKILLS}, lora_ordering=root / "ordering-lora.json",
        xlora_ordering=root / "ordering-xlora.json", tokenizer=root / "tokenizer.json",
        manifest=root / "MANIFEST.json",
    )


def load_demo(quant: str = "Q4_0", mode: str = "inplace", folder: str | os.PathLike | None = None,
              adapters: bool = True):
    """The demo base of ``quant`` with every skill's adapter loaded (none active)."""
    import qadapt

    if quant not in QUANTS:
        raise InputError(f"the demo ships {', '.join(QUANTS)}; got {quant!r}")
    p = paths(folder)
    ads = {s: str(f) for s, f in p.adapters.items()} if adapters else None
    return qadapt.load(p.gguf[quant], mode=mode, adapters=ads, activate=[])


def xlora_available() -> bool:
    """Whether this qadapt can run X-LoRA (``qadapt.adapters.xlora``)."""
    return importlib.util.find_spec("qadapt.adapters.xlora") is not None


def answer(model, prompt: str, adapter: str | None, max_new_tokens: int = 24) -> str:
    """Greedy continuation of ``prompt`` with only ``adapter`` active (None: the base)."""
    model.activate_adapters([adapter] if adapter else [])
    return model.generate(prompt, max_new_tokens=max_new_tokens).text.strip()


def exact_match(model, examples: Sequence[tasks.Example], adapter: str | None) -> float:
    """Share of ``examples`` that greedy decoding answers exactly (answer tokens, then EOS).

    Computed in one teacher-forced batch: greedy decoding yields exactly the answer's tokens
    and then EOS if and only if, at every answer position, the argmax of the logits is the
    next answer token (and EOS after the last one). Same verdict as decoding, far cheaper.
    """
    model.activate_adapters([adapter] if adapter else [])
    tok = model.tokenizer
    return teacher_forced_match(model.logits, tok.encode, tok.eos_ids[0], examples)


def teacher_forced_match(logits_fn, encode, eos: int, examples: Sequence[tasks.Example]) -> float:
    """``logits_fn(ids [B, T]) -> [B, T, V]``; ``encode(text)`` with BOS. See :func:`exact_match`."""
    import torch

    rows, spans = [], []
    for e in examples:
        prompt, full = encode(e.prompt), encode(e.text) + [eos]
        if full[: len(prompt)] != prompt:  # the answer would change the prompt's tokens: never exact
            raise InputError(f"{e.prompt!r} tokenizes differently inside {e.text!r}")
        rows.append(full)
        spans.append(len(prompt))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), eos, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    with torch.no_grad():
        pred = logits_fn(ids).argmax(-1)
    hits = sum(bool((pred[i, n - 1: len(r) - 1] == ids[i, n: len(r)]).all()) for i, (r, n) in enumerate(zip(rows, spans)))
    return round(hits / len(rows), 3)


def demo_table(quant: str = "Q4_0", mode: str = "inplace", prompts: Sequence[str] = DEMO_PROMPTS,
               folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """Each prompt run on the base and with each adapter (and X-LoRA when available), greedy."""
    m = load_demo(quant, mode, folder)
    columns = ["base", *tasks.SKILLS]
    rows = [{"prompt": p, **{c: answer(m, p, None if c == "base" else c) for c in columns}} for p in prompts]
    notes = []
    if xlora_available():
        columns.append("xlora")
        try:
            xm = _load_xlora(quant, mode, folder)
            for r in rows:
                r["xlora"] = xm.generate(r["prompt"], max_new_tokens=24).text.strip()
        except Exception as e:  # the X-LoRA runtime is new: say why the column is empty, keep the rest
            notes.append(f"X-LoRA column skipped: {type(e).__name__}: {e}")
            columns.pop()
    else:
        notes.append("X-LoRA column skipped: this qadapt has no X-LoRA runtime (qadapt.adapters.xlora); "
                     "the classifier files are shipped in " + str(paths(folder).adapters_dir))
    for n in notes:
        log.warning(n)
    return {"model": str(paths(folder).gguf[quant]), "quant": quant, "mode": mode, "columns": columns,
            "rows": rows, "notes": notes}


def _load_xlora(quant: str, mode: str, folder):
    import qadapt

    p = paths(folder)
    return qadapt.load(p.gguf[quant], mode=mode, xlora=str(p.adapters_dir), ordering=p.xlora_ordering)


def format_table(result: dict[str, Any], width: int = 28) -> str:
    """A plain-text table: one row per prompt, one column per model variant."""
    cols = ["prompt", *result["columns"]]

    def cell(s: str) -> str:
        return s if len(s) <= width else s[: width - 1] + "…"

    lines = [f"qadapt demo: {result['model']} ({result['quant']}, {result['mode']})", ""]
    table = [cols] + [[cell(r[c]) for c in cols] for r in result["rows"]]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for j, row in enumerate(table):
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += [""] + [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines).rstrip()


def run_options(model: str | None, adapters: Sequence[str], quant: str = "Q4_0") -> tuple[str, list[str]]:
    """``qadapt run --demo``: MODEL is the shipped base; a bare ``--adapter NAME`` is the demo adapter NAME."""
    if model is not None:
        raise InputError(f"--demo runs the shipped demo model; drop MODEL ({model}) or drop --demo")
    p = paths()
    out = []
    for a in adapters:
        if "=" not in a:
            if a not in p.adapters:
                raise InputError(f"--demo: no demo adapter `{a}`; the demo has {', '.join(p.adapters)} "
                                 "(or give NAME=SOURCE for your own)")
            a = f"{a}={p.adapters[a]}"
        out.append(a)
    return str(p.gguf[quant]), out
