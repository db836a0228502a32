#!/usr/bin/env python
"""Train the demo model, its LoRA adapters and X-LoRA classifier, and write them to qadapt/data/demo.

    python tools/make_demo.py                 # the shipped demo (target: <= 15 minutes on 2 CPU cores)
    python tools/make_demo.py --fast -o /tmp/demo   # a smoke test of the pipeline (seconds)

Needs the dev extra (PEFT): pip install -e ".[dev]". Logic lives in qadapt.demo.train.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qadapt.demo.run import DATA  # noqa: E402
from qadapt.demo.train import DemoConfig, make_demo  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", type=Path, default=DATA, help=f"output folder (default: {DATA})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fast", action="store_true", help="tiny settings: checks the pipeline, learns little")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a DemoConfig field (repeatable), e.g. --set base_steps=800")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    kw = {"seed": args.seed}
    for item in args.set:
        key, _, value = item.partition("=")
        field_type = type(getattr(DemoConfig(), key))
        kw[key] = field_type(value)
    cfg = DemoConfig.fast(**kw) if args.fast else DemoConfig(**kw)
    manifest = make_demo(args.out, cfg)
    print(json.dumps({"out": str(args.out), "seconds": manifest["seconds"], "eval": manifest["eval"]["scores"],
                      "total_bytes": manifest["total_bytes"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
