"""Shared test setup: tests import their model builders from ``tests/models.py``."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("QADAPT_NO_PROGRESS", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))
