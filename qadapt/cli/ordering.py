"""``qadapt ordering create|set-names|add-preload``: the mistral.rs ordering scripts as commands.

The ``tools/`` scripts run these same commands through :func:`script_main`,
which prompts for missing values the way mistral.rs's scripts do.
"""

from __future__ import annotations

import logging
import sys

import click

from ..errors import QadaptError
from .. import ordering as ordmod

log = logging.getLogger(__name__)
_force = click.option("--force", is_flag=True, help="Replace OUT if it exists.")
_out = click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output file.")


@click.group()
def ordering() -> None:
    """Create and edit mistral.rs ordering files."""


@ordering.command()
@click.option("--model", help="Model folder, config.json, .gguf file or Hub id (becomes base_model_id).")
@click.option("--arch", help="Architecture, when no model is at hand (needs --num-layers).")
@click.option("--num-layers", type=int, help="Number of decoder blocks (with --arch).")
@click.option("--base-model-id", help="base_model_id to write (default: the --model value).")
@click.option("--targets", required=True, help="Target modules, comma-separated (PEFT target_modules), or all-linear.")
@click.option("--names", required=True, help="Adapter names, comma-separated, in training order.")
@_out
@_force
def create(model, arch, num_layers, base_model_id, targets, names, output, force) -> None:
    """Write a new ordering whose `layers` is PEFT's enumeration of the wrapped modules."""
    from ..model_info import describe_model

    if bool(model) == bool(arch):
        raise click.UsageError("give exactly one of --model or --arch")
    info = describe_model(arch=arch, model=model)
    n = info.num_hidden_layers if num_layers is None else num_layers
    if n is None:
        raise click.UsageError("--arch needs --num-layers (the model's number of decoder blocks)")
    new = ordmod.create_ordering(
        info.layer_map, n, ordmod.split_list(targets, "--targets"), ordmod.split_list(names, "--names"),
        base_model_id or model, num_experts=(info.config or {}).get("num_experts", 0),
    )
    if new.base_model_id is None:
        log.warning("no base_model_id written (pass --base-model-id): mistral.rs requires one")
    _write(output, new, force)


@ordering.command("set-names")
@click.argument("input_file", metavar="IN", type=click.Path(dir_okay=False))
@click.option("--names", required=True, help="New adapter names, comma-separated, in training order.")
@_out
@_force
def set_names(input_file, names, output, force) -> None:
    """Copy an ordering with new adapter names (the order must match X-LoRA training)."""
    old = ordmod.read_ordering(input_file)
    _write(output, ordmod.set_names(old, ordmod.split_list(names, "--names")), force)


@ordering.command("add-preload")
@click.argument("input_file", metavar="IN", type=click.Path(dir_okay=False))
@click.option("--preload", "preloads", multiple=True, metavar="NAME=ADAPTER_MODEL_ID", help="Repeatable.")
@_out
@_force
def add_preload(input_file, preloads, output, force) -> None:
    """Copy an ordering with `preload_adapters` entries added (LoRA runtime activation)."""
    if not preloads:
        raise click.UsageError("give at least one --preload NAME=ADAPTER_MODEL_ID")
    old = ordmod.read_ordering(input_file)
    pairs = [ordmod.Preload(*ordmod.parse_assignment(p, "--preload")) for p in preloads]
    _write(output, ordmod.add_preloads(old, pairs), force)


def _write(output: str, new: ordmod.Ordering, force: bool) -> None:
    path = ordmod.write_ordering(output, new, force=force)
    click.echo(f"wrote {path} ({len(new.layers or {})} layers, {len(new.order or ())} adapters)")


# ---------------------------------------------------------------------- tools/ scripts
#: command -> (parameter, prompt) asked for when missing, as mistral.rs's scripts do
PROMPTS = {
    "create": [("model", "Enter the base model ID (or path)"),
               ("targets", "Enter the target modules as a comma delimited list"),
               ("names", "Enter a comma delimited list of adapter names as they were specified when training"),
               ("output", "Enter output file")],
    "set-names": [("input_file", "Enter the ordering file"), ("names", "Enter a comma delimited list of adapter names"),
                  ("output", "Enter output file")],
    "add-preload": [("input_file", "Enter the ordering file"),
                    ("preloads", "Enter the adapters to preload as NAME=ADAPTER_MODEL_ID, comma delimited"),
                    ("output", "Enter output file")],
}


def script_main(name: str, argv: list[str] | None = None) -> int:
    """Run ``qadapt ordering NAME`` as a script: prompt for missing values, then run the command.

    Prompts when stdin is a terminal, or always when no arguments are given
    (so answers can be piped, as with mistral.rs's scripts).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    cmd = ordering.commands[name]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    if "-h" in argv or "--help" in argv or (argv and not sys.stdin.isatty()):
        return _guarded(name, lambda: cmd.main(args=argv, prog_name=name, standalone_mode=False))
    ctx = cmd.make_context(name, argv, resilient_parsing=True)
    params = dict(ctx.params)
    for key, text in PROMPTS[name]:
        if params.get(key) in (None, ()) and not (key == "model" and params.get("arch")):
            answer = input(f"{text}: ").strip()
            params[key] = tuple(ordmod.split_list(answer, key)) if key == "preloads" else answer

    def run() -> None:
        with ctx:
            ctx.invoke(cmd.callback, **params)

    return _guarded(name, run)


def _guarded(name: str, run) -> int:
    """Run a command body; a QadaptError or click error becomes a message and an exit code."""
    try:
        run()
    except QadaptError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    return 0
