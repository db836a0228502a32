#!/usr/bin/env python
"""mistral.rs's `set_names.py`, over qadapt: same as `qadapt ordering set-names`.

Flags as in `qadapt ordering set-names --help`; missing values are asked for when
stdin is a terminal, and every value is asked for when no flags are given.
"""

import sys

from qadapt.cli.ordering import script_main

if __name__ == "__main__":
    sys.exit(script_main("set-names"))
