"""Helpers for tests/test_server.py: PEFT-format adapter folders and a ``qadapt serve`` subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_peft_adapter(hf_model, out: Path, seed: int, r: int = 4, alpha: float = 8,
                       targets=LLAMA_TARGETS) -> Path:
    """A LoRA adapter in PEFT's on-disk format (adapter_config.json + adapter_model.safetensors).

    Written directly rather than through ``peft.get_peft_model(...).save_pretrained`` to keep
    this file fast (importing peft costs seconds); tests/test_lora.py checks that qadapt reads
    PEFT's own output identically. A and B are random and large enough to change greedy text.
    """
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, mod in hf_model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in targets:
            a = torch.randn(r, mod.in_features, generator=g) / mod.in_features ** 0.5
            b = torch.randn(mod.out_features, r, generator=g) * 0.5
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
           "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none", "base_model_name_or_path": None}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


@dataclass
class ServerProc:
    proc: subprocess.Popen
    url: str
    log: Path

    @classmethod
    def spawn(cls, args: list[str], port: int, log: Path, env: dict[str, str] | None = None,  # None: inherit
              verbose: bool = False) -> "ServerProc":
        out = open(log, "wb")
        cmd = [sys.executable, "-m", "qadapt", *(["-v"] if verbose else []), "serve", *args, "--port", str(port)]
        proc = subprocess.Popen(cmd,
                                stdout=out, stderr=subprocess.STDOUT, env=env)
        out.close()
        return cls(proc, f"http://127.0.0.1:{port}", log)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qadapt serve exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"qadapt serve did not become healthy in {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample's value from a Prometheus text exposition (0 when absent)."""
    want = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0
