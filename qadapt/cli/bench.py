"""``qadapt bench``: parse, call :func:`qadapt.bench.run_bench`, print the table."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from ..bench.spec import ENGINES, GGUF_FORMATS, OUTPUTS, QADAPT_MODES, default_cache

#: --quick's run settings where the options are not given: the smoke run CI can afford
QUICK_DEFAULTS = {"runs": 2, "warmup": 1, "decode_tokens": 8, "prompt_tokens": 16}
FULL_DEFAULTS = {"runs": 5, "warmup": 1, "decode_tokens": 64, "prompt_tokens": 128}


def _csv(value: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    return default if value is None else tuple(v.strip() for v in value.split(",") if v.strip())


@click.command()
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for bench.json, bench.md, bench.png and bench-summary.md (refuses to overwrite them "
                   "without --force).")
@click.option("--quick", is_flag=True,
              help="A small model (~13M parameters), 2 runs of 8 tokens after 16-token prompts, dequantize mode on "
                   "Q4_0 only, X-LoRA on Q4_0 only (unless given), a shorter bandwidth probe: a smoke run, < 3 min with every engine on "
                   "an idle 2-core machine.")
@click.option("--engines", default=None, metavar="A,B",
              help=f"Engines to run (default: all): {', '.join(ENGINES)}. Missing peers are reported as skipped.")
@click.option("--formats", default=None, metavar="A,B",
              help=f"Formats (default: all): {', '.join(GGUF_FORMATS)} (GGUF), bf16 (transformers), "
                   "nf4 (bitsandbytes).")
@click.option("--modes", default=None, metavar="A,B", help="qadapt modes (default: inplace,q8,dequantize; q8 = what qadapt.load(path) picks by default, in place "
                   "with kernels=auto; inplace = the exact kernels).")
@click.option("--dequantize-formats", default=None, metavar="A,B",
              help="Formats qadapt's dequantize mode runs on (default: all selected); every file expands to "
                   "the same float32 model, so one is enough to show it.")
@click.option("--runs", default=None, type=click.IntRange(min=1), help="Measured runs per metric [default: 5].")
@click.option("--warmup", default=None, type=click.IntRange(min=0), help="Discarded runs first [default: 1].")
@click.option("--decode-tokens", default=None, type=click.IntRange(min=1),
              help="Tokens per decode measurement (batch 1, batched and X-LoRA) [default: 64].")
@click.option("--prompt-tokens", default=None, type=click.IntRange(min=1),
              help="Prompt tokens of the batch-1 prefill [default: 128].")
@click.option("--no-xlora", is_flag=True, help="Skip qadapt's X-LoRA decode (granular and non-granular).")
@click.option("--xlora-formats", default=None, metavar="A,B",
              help="Formats qadapt's X-LoRA decode runs on (default: all selected GGUF formats).")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1), help="Threads per engine.")
@click.option("--cache", type=click.Path(file_okay=False), default=None,
              help=f"Where the made models are kept (default: {default_cache()}).")
@click.option("--force", is_flag=True, help="Overwrite bench.* files already in --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON instead of the table.")
@click.option("--constrained", "constrained", type=click.Path(dir_okay=False, exists=True), default=None,
              metavar="VOCAB.gguf",
              help="Only measure constrained decoding's per-token overhead (JSON schema, JSON object, regex, "
                   "choice) with the vocabulary of this GGUF (a model, or llama.cpp's "
                   "models/ggml-vocab-llama-bpe.gguf for Llama 3's 128k tokens), then exit.")
@click.option("--moe", "moe", type=click.Choice(["Q8_0", "Q4_0"]), default=None,
              help="Only measure mixture-of-experts decode (a random Mixtral-shaped GGUF of this type, with and "
                   "without LoRA on every expert, beside llama.cpp) against its active-parameter bound, then exit.")
@click.option("--serving-costs", "serving", type=click.Choice(["Q4_0", "Q8_0", "Q4_K_M"]), default=None,
              help="Only measure what a serving replica's time goes to (adapter load, prefill per token, a batched "
                   "decode step by the number of distinct adapters in it), the costs tools/fleet_sim.py runs on; "
                   "with --out, written to DIR/serving-costs.json. Then exit.")
@click.option("--many-adapters", "many", type=click.IntRange(min=1), default=None, metavar="N",
              help="Only measure N rank-16 adapters resident with 16 sequences decoding together on Zipf-drawn "
                   "adapters, against the same 16 on one adapter (the first of --formats, Q4_0 by default); "
                   "then exit.")
@click.option("--adapter-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True,
              help="The dtype the benchmark's adapter files store their factors in (bfloat16: as PEFT saves an "
                   "adapter trained in bf16; qadapt holds and reads them as stored; llama.cpp's LoRA GGUFs then "
                   "hold F16). Every measurement with the benchmark's adapters; refused with --moe and --constrained.")
@click.option("--depths", default=None, metavar="A,B",
              help="Only measure decode with one LoRA after prompts of these lengths (e.g. 128,4096,16384), qadapt "
                   "beside llama.cpp, on the first of --formats (Q4_0 by default); then exit.")
@click.option("--real-size", "real", type=click.Choice(["Q4_0", "Q8_0", "Q4_K_M"]), default=None,
              help="Only measure a real-size model of this type (--real-shape; random blocks, ~4.9 GB as Q4_K_M "
                   "at Llama 3 8B's shape) with and without a rank-16 LoRA, qadapt beside llama.cpp (and mistral.rs "
                   "with --engines), each engine in its own process: load, prefill, decode, resident memory; then "
                   "exit.")
@click.option("--real-shape", type=click.Choice(["llama3-8b", "qwen3-4b"]), default="llama3-8b", show_default=True,
              help="With --real-size: the model shape (Llama 3 8B, or Qwen3 4B with its q/k norms and tied output).")
def bench(out, quick, engines, formats, modes, dequantize_formats, runs, warmup, decode_tokens, prompt_tokens,
          no_xlora, xlora_formats, threads, cache, force, as_json, constrained, moe, serving, many, adapter_dtype,
          depths, real, real_shape) -> None:
    """Benchmark qadapt beside llama.cpp and transformers + PEFT, against the memory-bandwidth bound.

    \b
    Makes (once, cached) a random ~0.8B Llama as GGUF F16/Q8_0/Q4_0/Q4_K_M and a transformers
    checkpoint, with rank-16 LoRA adapters and an X-LoRA checkpoint over four of them; then measures
    load time, prefill and decode tokens/s (no / one / two adapters), adapter switch latency, 8
    sequences on 8 adapters and on one shared adapter, peak memory, and qadapt's X-LoRA decode
    (granular and non-granular).
    \b
    Examples:
      qadapt bench --quick --out /tmp/bench
      qadapt bench --engines qadapt,llama.cpp --formats Q4_0,Q8_0 --out docs/bench --force
      qadapt bench --constrained llama.cpp/models/ggml-vocab-llama-bpe.gguf
      qadapt bench --moe Q8_0
      qadapt bench --serving-costs Q4_0 --out docs/fleet
      qadapt bench --many-adapters 100 --formats Q4_K_M --adapter-dtype bfloat16
      qadapt bench --depths 128,4096,16384
      qadapt bench --real-size Q4_K_M --engines qadapt,llama.cpp,mistral.rs
      qadapt bench --real-size Q4_K_M --real-shape qwen3-4b
    """
    import json

    if real_shape != "llama3-8b" and not real:
        raise click.UsageError("--real-shape applies to --real-size only")
    if adapter_dtype != "float32" and (constrained or moe):
        raise click.UsageError("--adapter-dtype applies to measurements with the benchmark's adapters, not to "
                               + ("--constrained" if constrained else "--moe (its adapters are made by its own recipe)"))

    if constrained:
        import torch

        from ..bench.constrained import markdown as constrained_table
        from ..bench.constrained import measure
        from ..formats.gguf import GGUFFile
        from ..tokenizer import Tokenizer

        torch.set_num_threads(threads)
        result = measure(Tokenizer.from_gguf(GGUFFile(constrained)), sequences=runs or 10)
        click.echo(json.dumps(result, indent=2) if as_json else constrained_table(result))
        return

    if moe:
        from ..bench.moe import markdown as moe_table
        from ..bench.moe import measure as measure_moe

        result = measure_moe(Path(cache or default_cache()) / "moe", moe, quick=quick, tokens=decode_tokens or 64,
                             runs=runs or 5, threads=threads)
        click.echo(json.dumps(result, indent=2) if as_json else moe_table(result))
        return

    if serving:
        from ..bench.serving import markdown as serving_table
        from ..bench.serving import measure as measure_serving
        from ..io import write_json

        result = measure_serving(Path(cache or default_cache()), serving, runs=runs or 3, threads=threads,
                                 steps=decode_tokens or 16, quick=quick, adapter_dtype=adapter_dtype)
        if out:
            write_json(Path(out) / "serving-costs.json", result, force=force)
        click.echo(json.dumps(result, indent=2) if as_json else serving_table(result))
        return

    if real:
        from ..bench.big import markdown as big_table
        from ..bench.big import measure as measure_big

        result = measure_big(Path(cache or default_cache()), real, shape=real_shape, prompt=prompt_tokens or 512,
                             tokens=decode_tokens or 16, threads=threads, adapter_dtype=adapter_dtype,
                             engines=_csv(engines, ("qadapt", "llama.cpp")) if engines else ("qadapt", "llama.cpp"))
        click.echo(json.dumps(result, indent=2) if as_json else big_table(result))
        return

    if depths:
        from ..bench.depth import markdown as depth_table
        from ..bench.depth import measure as measure_depths

        fmt = formats.split(",")[0] if formats else "Q4_0"
        result = measure_depths(Path(cache or default_cache()), fmt, depths=tuple(int(d) for d in depths.split(",")),
                                tokens=decode_tokens or 32, threads=threads, quick=quick, adapter_dtype=adapter_dtype,
                                engines=_csv(engines, ("qadapt", "llama.cpp")) if engines else ("qadapt", "llama.cpp"))
        click.echo(json.dumps(result, indent=2) if as_json else depth_table(result))
        return

    if many:
        from ..bench.serving import many_adapters, many_markdown

        fmt = formats.split(",")[0] if formats else "Q4_0"
        result = many_adapters(Path(cache or default_cache()), fmt, adapters=many, runs=runs or 3, threads=threads,
                               steps=decode_tokens or 16, quick=quick, adapter_dtype=adapter_dtype)
        click.echo(json.dumps(result, indent=2) if as_json else many_markdown(result))
        return

    from ..bench import BenchSettings, run_bench
    from ..bench.report import markdown, write_outputs

    kw = {}
    if cache:
        kw["cache"] = Path(cache)
    given = {"runs": runs, "warmup": warmup, "decode_tokens": decode_tokens, "prompt_tokens": prompt_tokens}
    for k, default in (QUICK_DEFAULTS if quick else FULL_DEFAULTS).items():
        kw[k] = default if given[k] is None else given[k]
    if quick:
        kw.update(probe_gib=0.5, probe_repeats=3, batch_prompt_tokens=8)
        if dequantize_formats is None:
            dequantize_formats = "Q4_0"
        if xlora_formats is None:
            xlora_formats = "Q4_0"
    settings = BenchSettings(
        out=None, quick=quick, engines=_csv(engines, tuple(ENGINES)),
        formats=_csv(formats, GGUF_FORMATS + ("bf16", "nf4")), modes=_csv(modes, QADAPT_MODES),
        dequantize_formats=None if dequantize_formats is None else _csv(dequantize_formats, ()),
        xlora=not no_xlora, xlora_formats=None if xlora_formats is None else _csv(xlora_formats, ()),
        threads=threads, force=force, adapter_dtype=adapter_dtype, **kw,
    )
    if out:  # check before the (long) run that the outputs may be written
        from dataclasses import replace

        replace(settings, out=Path(out)).validate()
    report = run_bench(settings)
    prog = ["qadapt"] if Path(sys.argv[0]).name == "qadapt" else ["python", sys.argv[0]]
    report["command"] = shlex.join(prog + sys.argv[1:])
    if out:
        write_outputs(report, Path(out), force=force)
        click.echo(f"wrote {', '.join(str(Path(out) / n) for n in OUTPUTS if (Path(out) / n).exists())}", err=True)
    click.echo(json.dumps(report, indent=2) if as_json else markdown(report))
