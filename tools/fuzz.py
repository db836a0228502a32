"""The long fuzz run for maintainers (the suite runs the same properties with ~120 inputs each).

    python tools/fuzz.py --examples 10000

Runs tests/test_fuzz.py with hypothesis at that many inputs per parser (GGUF reader, safetensors
header, ordering JSON and raw bytes, adapter_config.json, X-LoRA xlora_config.json, GPTQ
quantize_config.json / quantization_config) and prints hypothesis' statistics.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=10000, help="inputs per parser (default 10000)")
    ap.add_argument("-k", default=None, help="only the tests matching this pytest expression")
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, QADAPT_FUZZ_EXAMPLES=str(args.examples))
    cmd = [sys.executable, "-m", "pytest", str(root / "tests" / "test_fuzz.py"), "-q", "-p", "no:cacheprovider",
           "--hypothesis-show-statistics"]
    if args.k:
        cmd += ["-k", args.k]
    return subprocess.call(cmd, env=env, cwd=root)


if __name__ == "__main__":
    sys.exit(main())
