#!/usr/bin/env python
"""mistral.rs's `lora_add_preload_adapters.py`, over qadapt: same as `qadapt ordering add-preload`.

Flags as in `qadapt ordering add-preload --help`; missing values are asked for when
stdin is a terminal, and every value is asked for when no flags are given.
"""

import sys

from qadapt.cli.ordering import script_main

if __name__ == "__main__":
    sys.exit(script_main("add-preload"))
