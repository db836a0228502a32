"""Write a benchmark report as ``bench.json``, ``bench.md`` (tables with ratios), ``bench.png`` and
``bench-summary.md`` (the compact decode table ``bench.md`` opens with, to paste into a README)."""

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
    ("batched_over_single", 8, "8 rows / 1 row, +1 adapter (same round)", 2),
    ("batched_tps", 1, "8 rows x 1 shared adapter tok/s", 2),
    ("batched_over_single", 1, "shared: 8 rows / 1 row (same round)", 2),
    ("peak_rss_mb", 8, "peak RSS MB", 0),
    ("rss_over_files", 8, "RSS added / (file + adapters)", 2),
    ("rss_over_files_one_load", 8, "same, one load + one round", 2),
    ("adapter_load_ms", 1, "adapter load ms", 1),
    ("decode_fraction_of_bound", 0, "decode / bound", 2),
)
RATIO_METRICS = (("prefill_tps", 0), ("decode_tps", 0), ("decode_tps", 1), ("decode_tps", 2), ("batched_tps", 1),
                 ("load_s", 0), ("peak_rss_mb", 8))
#: the summary's GGUF formats, and the transformers peer of each: full precision beside F16 / Q8_0,
#: bitsandbytes 4-bit beside the 4-bit formats
SUMMARY_FORMATS = ("F16", "Q8_0", "Q4_K_M", "Q4_0")
SUMMARY_PEER = {"F16": ("transformers", "bf16"), "Q8_0": ("transformers", "bf16"), "Q4_K_M": ("bnb", "nf4"),
                "Q4_0": ("bnb", "nf4")}
#: adapters active in the summary's decode figures
SUMMARY_ADAPTERS = 1


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


def _median(idx: dict, key: tuple) -> float | None:
    r = idx.get(key)
    return r["median"] if r else None


def _ratio(a: float | None, b: float | None) -> str:
    return _fmt(a / b, 2) if a is not None and b else "-"


def summary_markdown(report: dict[str, Any]) -> str:
    """Decode tokens/s per GGUF format, one adapter active: qadapt in place, llama.cpp on the same file,
    transformers + PEFT (bf16, or nf4 beside the 4-bit formats), the ratios and qadapt's fraction of the bound."""
    idx = _index(report["results"])
    m, s, mod = report["machine"], report["settings"], report["model"]
    ad = SUMMARY_ADAPTERS
    xlora = any(r["metric"] == "xlora_decode_tps" for r in report["results"])
    head = ["format", "qadapt in place, exact", "qadapt default (q8)", "llama.cpp", "transformers + PEFT",
            "exact / llama.cpp", "q8 / llama.cpp", "q8 / transformers", "q8 / bound"]
    if xlora:
        head.append(f"qadapt X-LoRA, {mod.get('xlora', {}).get('experts', '?')} experts (granular / fixed)")
    lora = mod.get("lora", {})
    lines = [
        f"Decode tokens/s, batch 1, one LoRA adapter active (rank {lora.get('rank', 16)} on "
        f"{', '.join(t.split('_')[0] for t in lora.get('targets', ('q', 'k', 'v', 'o')))}); random Llama "
        f"{mod['params'] / 1e9:.2f}B, {s['decode_tokens']} tokens after a {s['prompt_tokens']}-token prompt, median "
        f"of {s['runs']}; {m['cpu']}, {s['threads']} threads, read bandwidth {report['bandwidth_gbs']:.1f} GB/s. "
        "`bound` = read bandwidth / bytes of weights one token reads. `q8`: what `qadapt.load(path)` picks by "
        "default (`kernels=\"auto\"`: llama.cpp's arithmetic, activations rounded to 8 bits per block of 32); "
        "`exact`: float32 activations, gguf-py's weights (`kernels=\"exact\"`, for verification).",
        "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
    ]
    rows = 0
    for fmt in SUMMARY_FORMATS:
        q = _median(idx, ("qadapt", fmt, "inplace", "decode_tps", ad))
        q8 = _median(idx, ("qadapt", fmt, "q8", "decode_tps", ad))
        lc = _median(idx, ("llama.cpp", fmt, "", "decode_tps", ad))
        peer, pfmt = SUMMARY_PEER[fmt]
        hf = _median(idx, (peer, pfmt, "", "decode_tps", ad))
        frac = _median(idx, ("qadapt", fmt, "q8", "decode_fraction_of_bound", ad))
        if q is None and q8 is None and lc is None:
            continue
        cells = [fmt, _fmt(q, 2), _fmt(q8, 2), _fmt(lc, 2), f"{_fmt(hf, 2)} ({pfmt})" if hf is not None else "-",
                 _ratio(q, lc), _ratio(q8, lc), _ratio(q8, hf), _fmt(frac, 2)]
        if xlora:
            n_x = mod["xlora"]["experts"]
            xm = next((m for m in XLORA_MODES if ("qadapt", fmt, m, "xlora_decode_tps", n_x) in idx), "q8")
            g = _median(idx, ("qadapt", fmt, xm, "xlora_decode_tps", n_x))
            f = _median(idx, ("qadapt", fmt, xm, "xlora_nongranular_decode_tps", n_x))
            cells.append(f"{_fmt(g, 2)} / {_fmt(f, 2)}")
        lines.append("| " + " | ".join(cells) + " |")
        rows += 1
    if not rows:
        return ""
    return "\n".join(lines) + "\n"


#: the modes X-LoRA is reported in, the default first
XLORA_MODES = ("q8", "inplace")


def _xlora_table(idx: dict, report: dict[str, Any]) -> str:
    xl = report["model"].get("xlora", {})
    n = xl.get("experts")
    runs = [(f, m) for f in FORMAT_ORDER for m in XLORA_MODES
            if ("qadapt", f, m, "xlora_decode_tps", n) in idx or ("qadapt", f, m, "xlora_nongranular_decode_tps", n) in idx]
    if not runs:
        return ""
    head = ["format", "kernels", "decode, no adapter", "X-LoRA decode, granular", "X-LoRA decode, non-granular",
            "granular / no adapter", "non-granular / no adapter", "X-LoRA prefill tok/s", "X-LoRA load s",
            "X-LoRA peak RSS MB"]
    out = [f"X-LoRA, qadapt in place, tokens/s (batch 1): {n} experts (adapters a0..a{n - 1}), classifier of depth "
           f"{xl.get('depth')} (hidden {xl.get('size')}), layerwise scalings. Granular: every token runs the scaling "
           "pass (base model, its own KV cache) and the classifier before the real pass, so its bound is half the "
           "no-adapter rate. Non-granular: "
           f"`tgt_non_granular_index={xl.get('non_granular_index')}`, the scalings are fixed from the prompt and "
           "decoding skips the scaling pass. Kernels: `q8` the default, `inplace` the exact ones.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for fmt, mode in runs:
        base = _median(idx, ("qadapt", fmt, mode, "decode_tps", 0))
        g = _median(idx, ("qadapt", fmt, mode, "xlora_decode_tps", n))
        f = _median(idx, ("qadapt", fmt, mode, "xlora_nongranular_decode_tps", n))
        cells = [fmt, "q8 (default)" if mode == "q8" else "exact", _fmt(base, 2), _fmt(g, 2), _fmt(f, 2),
                 _ratio(g, base), _ratio(f, base),
                 _fmt(_median(idx, ("qadapt", fmt, mode, "xlora_prefill_tps", n)), 1),
                 _fmt(_median(idx, ("qadapt", fmt, mode, "xlora_load_s", n)), 2),
                 _fmt(_median(idx, ("qadapt", fmt, mode, "xlora_peak_rss_mb", n)), 0)]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def markdown(report: dict[str, Any], command: str | None = None) -> str:
    res = report["results"]
    idx = _index(res)
    m, s, mod = report["machine"], report["settings"], report["model"]
    bw = report["bandwidth"]
    summary = summary_markdown(report)
    lines = ["# qadapt benchmark", ""]
    if summary:
        lines += [summary, "Details:", ""]
    lines += [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['system']}; "
        f"{s['threads']} threads per engine.  ",
        f"Bandwidth probe: read {bw['read_gbs']:.1f} GB/s, copy {bw['copy_gbs']:.1f} GB/s "
        f"(best of {bw['repeats']} passes over {bw['array_gib']} GiB, {bw['threads']} threads).  ",
        f"Model: random Llama `{mod['name']}`, {mod['params'] / 1e9:.2f}B parameters (hidden {mod['hidden_size']}, "
        f"{mod['num_hidden_layers']} layers, intermediate {mod['intermediate_size']}, vocab {mod['vocab_size']}, "
        f"{mod['num_attention_heads']} heads, {mod['num_key_value_heads']} KV heads); LoRA rank 16 on q, k, v, o, "
        f"factors stored in {mod.get('lora', {}).get('dtype', 'float32')}.  ",
        f"Medians of {s['runs']} runs after {s['warmup']} warm-up run(s); prompt {s['prompt_tokens']} tokens, "
        f"decode {s['decode_tokens']} tokens (batch 1, greedy); batched: {s['batch']} sequences on {s['batch']} "
        f"different adapters, and on one shared adapter, {s['batch_prompt_tokens']}-token prompts.  ",
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
    rt = _ratio_table(idx, res)
    if rt:
        lines += ["", rt]
    xt = _xlora_table(idx, report)
    if xt:
        lines += ["", xt]
    lines += [
        "",
        "Reading the table: tokens/s are medians; `decode / bound` is decode tokens/s without adapter divided by "
        "the format's bound = read bandwidth / bytes of weights a decode step reads (every tensor of the file but "
        "the embedding table, of which one row; KV-cache reads not counted). `qadapt dequantize` expands the "
        "weights to float32 on load, so it reads 4 bytes per weight whatever the file's format. `switch ms` makes a "
        "different single adapter active. `8 rows / 1 row` is the median over rounds of each round's batched rate "
        "over its own one-row rate with one adapter (taken seconds apart, so the machine's drift between rounds "
        "does not enter the ratio); `shared` is the same with every row on the same adapter, the one batched form "
        "llama.cpp has (one adapter set per context). Peak RSS is the worker process's VmHWM over its loads and runs, "
        "with 8 adapters loaded; `RSS added / (file + adapters)` is that peak less the RSS with the libraries "
        "imported, over the GGUF file plus the 8 adapter files, for the timed worker (6 loads, 6 rounds in one "
        "process) and for a fresh process alone on the machine that loads once and runs one round.",
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
              ("decode_tps", 2): "decode +2", ("batched_tps", 1): "8 rows, shared adapter", ("load_s", 0): "load time",
              ("peak_rss_mb", 8): "peak RSS"}
    head = ["ratio", "format"] + [titles[k] for k in RATIO_METRICS]
    out = ["Ratios (> 1: qadapt is faster, or uses more time / memory for load time and RSS):", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmts = [f for f in FORMAT_ORDER if any(r["format"] == f and r["engine"] == "qadapt" for r in res)]
    for peer, peer_fmt, label in (("llama.cpp", None, "qadapt / llama.cpp"),
                                  ("transformers", "bf16", "qadapt / transformers bf16")):
        for mode in ("inplace", "q8", "dequantize"):
            for fmt in fmts:
                cells = []
                for metric, ad in RATIO_METRICS:
                    a = idx.get(("qadapt", fmt, mode, metric, ad))
                    b = idx.get((peer, peer_fmt or fmt, "", metric, ad))
                    cells.append(_fmt(a["median"] / b["median"], 2) if a and b and b["median"] else "-")
                if any(c != "-" for c in cells):
                    lines_label = f"{label} ({mode})"
                    out.append(f"| {lines_label} | {fmt} | " + " | ".join(cells) + " |")
    return "\n".join(out) if len(out) > 4 else ""


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
    n_x = report["model"].get("xlora", {}).get("experts")
    xfmts = [f for f in fmts if ("qadapt", f, "inplace", "xlora_decode_tps", n_x) in idx]
    panels = [(0, "decode, no adapter", engines, "decode_tps"), (1, "decode, one LoRA adapter", engines, "decode_tps")]
    if xfmts:
        panels.append((n_x, f"qadapt in place: X-LoRA decode, {n_x} experts", [("qadapt", "inplace")] * 2,
                       ("xlora_decode_tps", "xlora_nongranular_decode_tps")))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), sharey=True)
    for ax, (ad, title, series, metrics) in zip(axes, panels):
        width = 0.8 / max(len(series), 1)
        for k, (e, mode) in enumerate(series):
            metric = metrics if isinstance(metrics, str) else metrics[k]
            label = engine_label(e, mode) if isinstance(metrics, str) else \
                ("granular scalings" if k == 0 else "non-granular (fixed from the prompt)")
            xs, ys, lo, hi = [], [], [], []
            for i, f in enumerate(fmts):
                r = idx.get((e, f, mode, metric, ad))
                if r:
                    xs.append(i - 0.4 + width * (k + 0.5))
                    ys.append(r["median"])
                    lo.append(r["median"] - r["min"])
                    hi.append(r["max"] - r["median"])
            if xs:
                ax.bar(xs, ys, width, yerr=[lo, hi], label=label, capsize=2)
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
    if xfmts:
        axes[-1].legend(fontsize=7, loc="upper left")
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
    summary = summary_markdown(report)
    if summary:
        atomic_write(out / "bench-summary.md", summary, force=force)
    try:
        chart(report, out / "bench.png", force=force)
    except ImportError:
        log.warning("matplotlib is not installed: no bench.png (pip install matplotlib)")
