"""Write a benchmark report as ``bench.json``, ``bench.md`` (tables with ratios) and ``bench.png``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..io import atomic_path, atomic_write, write_json

log = logging.getLogger(__name__)

FORMAT_ORDER = ("F16", "bf16", "Q8_0", "Q4_K_M", "Q4_0", "nf4")
ENGINE_ORDER = ("qadapt", "llama.cpp", "transformers", "bnb")
#: (metric, adapters, column title, digits)
COLUMNS = (
    ("load_s", 0, "load s", 2),
    ("prefill_tps", 0, "prefill tok/s", 1),
    ("decode_tps", 0, "decode tok/s", 2),
    ("decode_tps", 1, "+1 adapter", 2),
    ("decode_tps", 2, "+2 adapters", 2),
    ("switch_ms", 1, "switch ms", 3),
    ("batched_tps", 8, "8 rows x 8 adapters tok/s", 2),
    ("peak_rss_mb", 8, "peak RSS MB", 0),
    ("decode_fraction_of_bound", 0, "decode / bound", 2),
)
RATIO_METRICS = (("prefill_tps", 0), ("decode_tps", 0), ("decode_tps", 1), ("decode_tps", 2), ("load_s", 0),
                 ("peak_rss_mb", 8))


def engine_label(engine: str, mode: str) -> str:
    if engine == "qadapt":
        return f"qadapt {mode}"
    return {"transformers": "transformers bf16 + PEFT", "bnb": "transformers nf4 (bitsandbytes) + PEFT",
            "llama.cpp": "llama.cpp (llama-cpp-python)"}.get(engine, engine)


def _index(results: list[dict]) -> dict[tuple, dict]:
    return {(r["engine"], r["format"], r["mode"], r["metric"], r["adapters"]): r for r in results}


def _rows(results: list[dict]) -> list[tuple[str, str, str]]:
    seen = {(r["format"], r["engine"], r["mode"]) for r in results if r["engine"] != "bound"}
    fo = {f: i for i, f in enumerate(FORMAT_ORDER)}
    eo = {e: i for i, e in enumerate(ENGINE_ORDER)}
    return sorted(seen, key=lambda t: (fo.get(t[0], 99), eo.get(t[1], 99), t[2] != "inplace"))


def _fmt(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def markdown(report: dict[str, Any], command: str | None = None) -> str:
    res = report["results"]
    idx = _index(res)
    m, s, mod = report["machine"], report["settings"], report["model"]
    bw = report["bandwidth"]
    lines = [
        "# qadapt benchmark",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['system']}; "
        f"{s['threads']} threads per engine.  ",
        f"Bandwidth probe: read {bw['read_gbs']:.1f} GB/s, copy {bw['copy_gbs']:.1f} GB/s "
        f"(best of {bw['repeats']} passes over {bw['array_gib']} GiB, {bw['threads']} threads).  ",
        f"Model: random Llama `{mod['name']}`, {mod['params'] / 1e9:.2f}B parameters (hidden {mod['hidden_size']}, "
        f"{mod['num_hidden_layers']} layers, intermediate {mod['intermediate_size']}, vocab {mod['vocab_size']}, "
        f"{mod['num_attention_heads']} heads, {mod['num_key_value_heads']} KV heads); LoRA rank 16 on q, k, v, o.  ",
        f"Medians of {s['runs']} runs after {s['warmup']} warm-up run(s); prompt {s['prompt_tokens']} tokens, "
        f"decode {s['decode_tokens']} tokens (batch 1, greedy); batched: {s['batch']} sequences on {s['batch']} "
        f"different adapters, {s['batch_prompt_tokens']}-token prompts.  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + ".",
    ]
    if command:
        lines += ["", f"Command: `{command}`"]
    head = ["format", "engine"] + [c[2] for c in COLUMNS]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    last_fmt = None
    for fmt, engine, mode in _rows(res):
        if fmt != last_fmt and ("bound", fmt, "", "decode_tps", 0) in idx:
            b = idx[("bound", fmt, "", "decode_tps", 0)]
            cells = ["-"] * len(COLUMNS)
            cells[2] = _fmt(b["median"], 2)
            lines.append(f"| {fmt} | **bound**: {b['bytes_per_token'] / 1e6:,.0f} MB read per token | "
                         + " | ".join(cells) + " |")
        last_fmt = fmt
        cells = []
        for metric, ad, _, digits in COLUMNS:
            r = idx.get((engine, fmt, mode, metric, ad))
            cells.append(_fmt(r["median"] if r else None, digits))
        lines.append(f"| {fmt} | {engine_label(engine, mode)} | " + " | ".join(cells) + " |")
    lines += ["", _ratio_table(idx, res)]
    lines += [
        "",
        "Reading the table: tokens/s are medians; `decode / bound` is decode tokens/s without adapter divided by "
        "the format's bound = read bandwidth / bytes of weights a decode step reads (every tensor of the file but "
        "the embedding table, of which one row; KV-cache reads not counted). `qadapt dequantize` expands the "
        "weights to float32 on load, so it reads 4 bytes per weight whatever the file's format. `switch ms` makes a "
        "different single adapter active. Peak RSS is the worker process's VmHWM over its loads and runs, "
        "with 8 adapters loaded.",
    ]
    if report.get("skipped"):
        lines += ["", "Not measured:", ""]
        for sk in report["skipped"]:
            who = (engine_label(sk["engine"], sk["mode"]) if sk.get("mode") else sk["engine"]) \
                + (f" {sk['format']}" if sk["format"] != "*" else "")
            lines.append(f"- {who}, {sk['metric']}: {sk['reason']}")
    return "\n".join(lines) + "\n"


def _ratio_table(idx: dict, res: list[dict]) -> str:
    """qadapt in place over llama.cpp (same file) and over transformers bf16 + PEFT, per metric."""
    titles = {("prefill_tps", 0): "prefill", ("decode_tps", 0): "decode", ("decode_tps", 1): "decode +1",
              ("decode_tps", 2): "decode +2", ("load_s", 0): "load time", ("peak_rss_mb", 8): "peak RSS"}
    head = ["ratio", "format"] + [titles[k] for k in RATIO_METRICS]
    out = ["Ratios (> 1: qadapt is faster, or uses more time / memory for load time and RSS):", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmts = [f for f in FORMAT_ORDER if any(r["format"] == f and r["engine"] == "qadapt" for r in res)]
    for peer, peer_fmt, label in (("llama.cpp", None, "qadapt / llama.cpp"),
                                  ("transformers", "bf16", "qadapt / transformers bf16")):
        for mode in ("inplace", "dequantize"):
            for fmt in fmts:
                cells = []
                for metric, ad in RATIO_METRICS:
                    a = idx.get(("qadapt", fmt, mode, metric, ad))
                    b = idx.get((peer, peer_fmt or fmt, "", metric, ad))
                    cells.append(_fmt(a["median"] / b["median"], 2) if a and b and b["median"] else "-")
                if any(c != "-" for c in cells):
                    lines_label = f"{label} ({mode})"
                    out.append(f"| {lines_label} | {fmt} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def chart(report: dict[str, Any], path: Path, *, force: bool) -> None:
    """Decode tokens/s per format and engine (no adapter, one adapter), with each format's bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = _index(report["results"])
    rows = _rows(report["results"])
    fmts = [f for f in FORMAT_ORDER if any(r[0] == f for r in rows)]
    engines = list(dict.fromkeys((e, m) for _, e, m in sorted(rows, key=lambda t: (ENGINE_ORDER.index(t[1])
                                                                                   if t[1] in ENGINE_ORDER else 9,
                                                                                   t[2] != "inplace"))))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    width = 0.8 / max(len(engines), 1)
    for ax, ad, title in ((axes[0], 0, "decode, no adapter"), (axes[1], 1, "decode, one LoRA adapter")):
        for k, (e, mode) in enumerate(engines):
            xs, ys, lo, hi = [], [], [], []
            for i, f in enumerate(fmts):
                r = idx.get((e, f, mode, "decode_tps", ad))
                if r:
                    xs.append(i - 0.4 + width * (k + 0.5))
                    ys.append(r["median"])
                    lo.append(r["median"] - r["min"])
                    hi.append(r["max"] - r["median"])
            if xs:
                ax.bar(xs, ys, width, yerr=[lo, hi], label=engine_label(e, mode), capsize=2)
        for i, f in enumerate(fmts):
            b = idx.get(("bound", f, "", "decode_tps", 0))
            if b:
                ax.hlines(b["median"], i - 0.45, i + 0.45, colors="black", linestyles="dashed",
                          label="bandwidth bound" if i == 0 else None)
        ax.set_xticks(range(len(fmts)), fmts)
        ax.set_title(title)
        ax.set_ylabel("tokens/s (batch 1)")
        ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left")
    m = report["machine"]
    fig.suptitle(f"qadapt vs peers, {report['model']['name']} ({report['model']['params'] / 1e9:.2f}B), "
                 f"{m['cpu']}, {report['settings']['threads']} threads, read bandwidth "
                 f"{report['bandwidth_gbs']:.1f} GB/s", fontsize=9)
    fig.tight_layout()
    with atomic_path(path, force=force) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_outputs(report: dict[str, Any], out: Path, *, force: bool = False, command: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench.json", report, force=force)
    atomic_write(out / "bench.md", markdown(report, command or report.get("command")), force=force)
    try:
        chart(report, out / "bench.png", force=force)
    except ImportError:
        log.warning("matplotlib is not installed: no bench.png (pip install matplotlib)")
