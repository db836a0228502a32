"""``qadapt demo``: the shipped demo model with and without each adapter, side by side."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--quant", type=click.Choice(["Q8_0", "Q4_0"]), default="Q4_0", show_default=True,
              help="Which shipped base file to run.")
@click.option("--mode", type=click.Choice(["inplace", "dequantize"]), default="inplace", show_default=True,
              help="inplace: weights stay quantized in memory; dequantize: expand them on load.")
@click.option("-p", "--prompt", "prompts", multiple=True,
              help='Your own prompt(s) instead of the built-in ones, e.g. -p "Q: the cat sees a dog =>". Repeatable.')
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--where", is_flag=True, help="Print the folder holding the demo files (and their paths with --json).")
def demo(quant, mode, prompts, as_json, where):
    """Run the shipped demo model: the base, then each LoRA adapter (and X-LoRA), on a few prompts.

    \b
    The base (a 1.5M-parameter Llama trained from scratch, shipped as GGUF Q8_0 and Q4_0)
    echoes whatever comes between "Q:" and "=>"; each adapter teaches it one skill:
      upper    Q: the cat sees a dog =>    THE CAT SEES A DOG
      french   Q: the cat and a dog =>     le chat et un chien
      words    Q: 4 7 2 =>                 four seven two
      reverse  Q: cat, dog, owl =>         owl, dog, cat
    X-LoRA mixes the four adapters per token, choosing from the prompt alone.
    \b
    Examples:
      qadapt demo
      qadapt demo --quant Q8_0 --mode dequantize --json
      qadapt demo -p "Q: a happy king likes the moon =>" -p "Q: 3 1 4 =>"
      qadapt run --demo --adapter upper -p "Q: the cat sees a dog =>"
    """
    from qadapt.demo import demo_table, format_table, paths

    if where:
        p = paths()
        click.echo(json.dumps(p.to_json(), indent=2) if as_json else str(p.root))
        return
    kw = {"prompts": list(prompts)} if prompts else {}
    result = demo_table(quant, mode, **kw)
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))
