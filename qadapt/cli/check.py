"""``qadapt check ORDERING``: a thin wrapper over :func:`qadapt.check.check_ordering`."""

from __future__ import annotations

import json

import click

from ..ordering import parse_assignment


@click.command()
@click.argument("ordering", type=click.Path(dir_okay=False))
@click.option("--arch", help="Architecture to check against (llama, mistral, phi3, qwen2, qwen, gpt2).")
@click.option("--model", help="Model folder, config.json, .gguf file or Hugging Face Hub id.")
@click.option("--quant", help="Base quantization: Q4_K, Q8_0, gptq-4bit, nf4, int8, ... (default: full precision).")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=SOURCE", help="An adapter to check (repeatable).")
@click.option("--adapter-model-id", help="Folder holding one sub-folder per adapter name in `order` (mistral.rs).")
@click.option("--xlora", default=None, metavar="SRC",
              help="X-LoRA checkpoint (folder, Hub id or s3:// URL) the ordering must fit.")
@click.option("--offline", is_flag=True, default=None, help="Do not contact the Hub (HF_HUB_OFFLINE=1 does the same).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def check(ordering, arch, model, quant, adapters, adapter_model_id, xlora, offline, as_json) -> None:
    """Check an ordering file (and its adapters) against a base model; report every problem.

    Exit code 0: valid (warnings allowed); 1: problems found; 2: bad usage or unreadable input.
    """
    from ..check import check_ordering

    if arch and model:
        raise click.UsageError("give --arch or --model, not both")
    pairs = [parse_assignment(a, "--adapter") for a in adapters]
    report = check_ordering(
        ordering, arch=arch, model=model, quant=quant, adapters=pairs,
        adapter_model_id=adapter_model_id, offline=offline, xlora=xlora,
    )
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        for line in report.lines():
            click.echo(line)
    click.get_current_context().exit(0 if report.valid else 1)
