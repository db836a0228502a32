"""``qadapt adapters``: tools for adapter folders."""

from __future__ import annotations

import json

import click


@click.group()
def adapters() -> None:
    """Work with adapter folders (see each command's --help)."""


@adapters.command()
@click.argument("adapter", type=click.Path(file_okay=False, exists=True))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--model", "-m", required=True, metavar="MODEL",
              help="The base it was trained on: a transformers folder or Hub id, or a GGUF file (only its "
                   "architecture is read; no weights are loaded).")
@click.option("--gguf-file", default=None, metavar="NAME", help="The GGUF file inside a Hub repo given as --model.")
@click.option("--rank", default="64", show_default=True, metavar="R",
              help="LoRA rank: an integer, or a share of each layer's delta energy in (0, 1] (e.g. 0.99).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def convert(adapter, out, model, gguf_file, rank, force, as_json) -> None:
    """Convert a LoHa, LoKr or other PEFT adapter to LoRA with PEFT's own convert_to_lora.

    \b
    The result is a PEFT LoRA folder that `qadapt run --adapter` and `qadapt serve` load like any other.
    Examples:
      qadapt adapters convert ./my-loha ./my-loha-as-lora --model meta-llama/Llama-3.1-8B --rank 32
      qadapt adapters convert ./my-lokr ./lora --model model.Q4_K_M.gguf --rank 0.99
    """
    from ..adapters.convert import convert as run_convert
    from ..errors import InputError

    try:
        r: int | float = int(rank)
    except ValueError:
        try:
            r = float(rank)
        except ValueError:
            raise InputError(f"--rank {rank!r}: expected an integer or a fraction in (0, 1]") from None
    summary = run_convert(adapter, out, model, r, gguf_file=gguf_file, force=force)
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"converted {summary['from']} ({summary['peft_type']}) to LoRA: {summary['to']} "
                   f"({summary['tensors']} tensors, rank {', '.join(map(str, summary['ranks']))})")
