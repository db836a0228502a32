#!/usr/bin/env python
"""The benchmark harness: same as `qadapt bench` (see `python tools/bench.py --help`).

Example: python tools/bench.py --quick --out /tmp/bench
"""

import logging
import sys

import click

from qadapt.cli.bench import bench
from qadapt.errors import QadaptError

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        bench(prog_name="tools/bench.py", standalone_mode=False)
    except QadaptError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
