"""``qadapt`` command line: a thin layer that parses, calls the Python API and prints.

Subcommands live one per module and are imported only when used, so
``qadapt --help`` stays fast and an optional backend never breaks the others.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys

import click

from ..errors import QadaptError

#: command name -> "module:attribute"
COMMANDS = {
    "check": "qadapt.cli.check:check",
    "ordering": "qadapt.cli.ordering:ordering",
    "run": "qadapt.cli.run:run",
    "inspect": "qadapt.cli.run:inspect",
    "serve": "qadapt.cli.serve:serve",
    "demo": "qadapt.cli.demo:demo",
    "bench": "qadapt.cli.bench:bench",
    "adapters": "qadapt.cli.adapters:adapters",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(n for n, t in COMMANDS.items() if importlib.util.find_spec(t.split(":")[0]) is not None)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None or importlib.util.find_spec(target.split(":")[0]) is None:
            return None
        mod, attr = target.split(":")
        return getattr(importlib.import_module(mod), attr)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except QadaptError as e:
            click.echo(f"qadapt: error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("qadapt: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output: -v info, -vv debug.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
@click.version_option(package_name="qadapt")
def main(verbose: int, quiet: bool) -> None:
    """Run quantized LLMs (GGUF, GPTQ, bitsandbytes) with full-precision LoRA / X-LoRA adapters.

    \b
    Start here:
      qadapt demo                                   the shipped demo model with each of its adapters
      qadapt check ORDERING.json --arch llama       validate an ordering file
      qadapt run MODEL.gguf --prompt "Hello"        generate text
      qadapt inspect MODEL.gguf                     what is inside a model file
    Every command has its own --help.
    """
    level = logging.ERROR if quiet else [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    main()
