"""Run the benchmark: make the files, probe bandwidth, run the engines interleaved, collect results.

Engines on the formats of one group (:data:`~qadapt.bench.spec.GROUP_OF`: peers of similar size)
live together, each in its own worker process; every run visits each of them in turn
(load runs first, then measurement rounds), so slow drifts of the machine spread evenly
over the engines instead of favouring whichever ran first. The first ``warmup`` runs are
discarded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .make import BenchFiles, gguf_bytes_per_token, make_bench_files
from .measure import bandwidth_probe, machine_info, summary
from .spec import GGUF_FORMATS, GROUP_OF, BenchSettings, Job

log = logging.getLogger(__name__)

#: decode tokens of a warm-up round (it only has to run every code path once)
WARMUP_DECODE_TOKENS = 4


class WorkerFailed(Exception):
    pass


class Worker:
    def __init__(self, job: Job, files: BenchFiles, settings: BenchSettings, logdir: Path):
        self.job = job
        spec = {"engine": job.engine, "format": job.format, "mode": job.mode, "folder": str(files.folder),
                "shape": asdict(files.shape), "threads": settings.threads}
        env = dict(os.environ, OMP_NUM_THREADS=str(settings.threads), MKL_NUM_THREADS=str(settings.threads),
                   TOKENIZERS_PARALLELISM="false")
        name = f"{job.engine}-{job.mode or 'x'}-{job.format}".replace(".", "")
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "qadapt.bench.worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env=env)
        self._read()  # "ready"

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise WorkerFailed(f"worker exited (code {code}{', segfault' if code == -11 else ''}); {self.tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise WorkerFailed(reply["error"])
        return reply

    def call(self, cmd: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise WorkerFailed(f"worker exited (code {self.proc.wait()}); {self.tail()}") from None
        return self._read()

    def tail(self, n: int = 600) -> str:
        self._log.flush()
        lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines()
                 if ln.strip() and "fallback to CPU" not in ln]  # llama.cpp's per-tensor LoRA notes
        return " | ".join(lines)[-n:]

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.call({"op": "quit"})
        except (WorkerFailed, OSError, ValueError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def _groups(jobs: list[Job]) -> list[list[Job]]:
    order = {g: i for i, g in enumerate(GGUF_FORMATS)}
    by: dict[str, list[Job]] = defaultdict(list)
    for j in jobs:
        by[GROUP_OF[j.format]].append(j)
    return [by[g] for g in sorted(by, key=lambda g: order.get(g, 99))]


def run_bench(settings: BenchSettings) -> dict[str, Any]:
    """Make or reuse the model, measure every selected engine, return the report (and write it with ``out``)."""
    settings = settings.validate()
    t_start = time.perf_counter()
    jobs = settings.jobs()
    formats = tuple(dict.fromkeys(j.format for j in jobs))
    files = make_bench_files(settings.cache, settings.shape, formats, settings.seed, settings.threads)
    skipped: list[dict] = []
    for fmt, reason in files.missing:
        skipped += [{**j.to_json(), "metric": "*", "reason": reason} for j in jobs if j.format == fmt]
    jobs = [j for j in jobs if j.format not in dict(files.missing)]
    bw = bandwidth_probe(threads=settings.threads)
    log.info("bandwidth: read %.1f GB/s, copy %.1f GB/s", bw["read_gbs"], bw["copy_gbs"])

    samples: dict[tuple, list[float]] = defaultdict(list)
    extra: dict[Job, dict] = {}
    total = settings.warmup + settings.runs
    logdir = Path(tempfile.mkdtemp(prefix="qadapt-bench-"))
    for group in _groups(jobs):
        workers: list[Worker] = []
        for job in group:
            try:
                workers.append(Worker(job, files, settings, logdir))
            except WorkerFailed as e:
                skipped.append({**job.to_json(), "metric": "*", "reason": str(e)})
        for phase in ("load", "round"):
            for r in range(total):
                warm = r < settings.warmup
                for w in list(workers):
                    cmd = {"op": phase, **_round_cmd(settings, warm)}
                    try:
                        reply = w.call(cmd)
                    except WorkerFailed as e:
                        log.warning("%s: %s", w.job.label, e)
                        skipped.append({**w.job.to_json(), "metric": "*", "reason": str(e)})
                        w.close()
                        workers.remove(w)
                        continue
                    for metric, reason in reply.get("skipped", {}).items():
                        if r == 0:
                            skipped.append({**w.job.to_json(), "metric": metric, "reason": reason})
                    if warm:
                        continue
                    for m in reply["metrics"]:
                        samples[(w.job, m["metric"], m["adapters"])].append(m["value"])
                log.info("%s run %d/%d done (%s) at %.0f s", phase, r + 1, total, ", ".join(j.label for j in group),
                         time.perf_counter() - t_start)
        for w in workers:
            try:
                extra[w.job] = w.call({"op": "info"})
            except WorkerFailed as e:
                skipped.append({**w.job.to_json(), "metric": "peak_rss_mb", "reason": str(e)})
            w.close()

    results = _results(samples, extra, files, bw["read_gbs"])
    skipped.extend(_xlora_skips())
    report = {
        "machine": machine_info(settings.threads),
        "bandwidth_gbs": bw["read_gbs"],
        "bandwidth": bw,
        "model": {"name": settings.shape.name, "params": settings.shape.n_params, **asdict(settings.shape),
                  "lora": {"rank": 16, "alpha": 32, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                  "cache": str(files.folder)},
        "settings": {"runs": settings.runs, "warmup": settings.warmup, "threads": settings.threads,
                     "prompt_tokens": settings.prompt_tokens, "decode_tokens": settings.decode_tokens,
                     "batch": settings.batch, "batch_prompt_tokens": settings.batch_prompt_tokens,
                     "quick": settings.quick},
        "results": results,
        "skipped": skipped,
        "elapsed_s": time.perf_counter() - t_start,
    }
    if settings.out is not None:
        from .report import write_outputs

        write_outputs(report, Path(settings.out), force=settings.force)
    return report


def _round_cmd(s: BenchSettings, warm: bool) -> dict:
    return {"prompt_tokens": s.prompt_tokens, "decode_tokens": WARMUP_DECODE_TOKENS if warm else s.decode_tokens,
            "batch": s.batch, "batch_prompt_tokens": s.batch_prompt_tokens,
            "batch_decode_tokens": WARMUP_DECODE_TOKENS if warm else s.decode_tokens}


def _bytes_per_token(fmt: str, files: BenchFiles, extra: dict[Job, dict]) -> int | None:
    if fmt in GGUF_FORMATS:
        return gguf_bytes_per_token(files.gguf(fmt))["bytes_per_token"]
    for job, info in extra.items():  # bf16 / nf4: what the transformers engine holds
        if job.format == fmt and info.get("weight_bytes_per_token"):
            return int(info["weight_bytes_per_token"])
    return None


def _results(samples, extra, files: BenchFiles, bw_gbs: float) -> list[dict]:
    rows = []
    for (job, metric, adapters), values in sorted(samples.items(), key=lambda kv: (kv[0][0].format, kv[0][0].engine,
                                                                                  kv[0][0].mode, kv[0][1], kv[0][2])):
        rows.append({**job.to_json(), "adapters": adapters, "metric": metric, **summary(values)})
    for job, info in extra.items():
        if "peak_rss_bytes" in info:
            mb = info["peak_rss_bytes"] / 1e6
            rows.append({**job.to_json(), "adapters": 8, "metric": "peak_rss_mb", "median": mb, "min": mb, "max": mb,
                         "runs": 1})
    bounds = {}
    for fmt in dict.fromkeys(j.format for j, *_ in samples):
        b = _bytes_per_token(fmt, files, extra)
        if b:
            bounds[fmt] = bw_gbs * 1e9 / b
            rows.append({"engine": "bound", "format": fmt, "mode": "", "adapters": 0, "metric": "decode_tps",
                         "median": bounds[fmt], "min": bounds[fmt], "max": bounds[fmt], "runs": 1,
                         "bytes_per_token": b})
    for r in list(rows):
        if r["metric"] == "decode_tps" and r["engine"] != "bound" and r["format"] in bounds:
            f = bounds[r["format"]]
            keys = {k: r[k] for k in ("engine", "format", "mode", "adapters")}
            rows.append({**keys, "metric": "decode_fraction_of_bound",
                         "median": r["median"] / f, "min": r["min"] / f, "max": r["max"] / f, "runs": r["runs"]})
    return rows


def _xlora_skips() -> list[dict]:
    if importlib.util.find_spec("qadapt.adapters.xlora") is None:
        return [{"engine": "qadapt", "format": "*", "mode": "", "metric": "xlora_decode_tps",
                 "reason": "qadapt.adapters.xlora has not landed yet"}]
    return [{"engine": "qadapt", "format": "*", "mode": "", "metric": "xlora_decode_tps",
             "reason": "qadapt.adapters.xlora has landed but the harness does not make an X-LoRA checkpoint "
                       "or time it yet"}]
