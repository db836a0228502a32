"""Run the benchmark: make the files, probe bandwidth, run the engines interleaved, collect results.

Engines on the formats of one group (:data:`~qadapt.bench.spec.GROUP_OF`: peers of similar size)
live together, each in its own worker process; every run visits each of them in turn
(load runs first, then measurement rounds), so slow drifts of the machine spread evenly
over the engines instead of favouring whichever ran first. The first ``warmup`` runs are
discarded.
"""

from __future__ import annotations

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

from ..io import open_log
from .make import BenchFiles, gguf_bytes_per_token, make_bench_files
from .measure import bandwidth_probe, machine_info, summary
from .spec import (GGUF_FORMATS, GROUP_OF, LORA_ALPHA, LORA_RANK, LORA_TARGETS, XLORA_DEPTH, XLORA_EXPERTS,
                   XLORA_NON_GRANULAR_INDEX, XLORA_SIZE, BenchSettings, Job)

log = logging.getLogger(__name__)

#: decode tokens of a warm-up round (it only has to run every code path once)
WARMUP_DECODE_TOKENS = 4


class WorkerFailed(Exception):
    pass


class Worker:
    def __init__(self, job: Job, files: BenchFiles, settings: BenchSettings, logdir: Path):
        self.job = job
        spec = {"engine": job.engine, "format": job.format, "mode": job.mode, "task": job.task,
                "folder": str(files.folder), "shape": asdict(files.shape), "threads": settings.threads,
                "adapter_dtype": files.adapter_dtype}
        env = dict(os.environ, OMP_NUM_THREADS=str(settings.threads), MKL_NUM_THREADS=str(settings.threads),
                   TOKENIZERS_PARALLELISM="false")
        name = f"{job.engine}-{job.mode or 'x'}-{job.task + '-' if job.task else ''}{job.format}".replace(".", "")
        self.log_path = logdir / f"{name}.log"
        self._log = open_log(self.log_path)  # streamed while the worker runs: evidence if it crashes
        self.proc = subprocess.Popen([sys.executable, "-m", "qadapt.bench.worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env=env)

    def ready(self) -> None:
        """Wait for the worker's "ready" (workers of a group start together: their imports overlap)."""
        self._read()

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

    def kill(self) -> None:
        """Stop the worker now if it still runs (closing normally asks it to quit first)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

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
    files = make_bench_files(settings.cache, settings.shape, formats, settings.seed, settings.threads,
                             xlora=any(j.task == "xlora" for j in jobs), adapter_dtype=settings.adapter_dtype)
    skipped: list[dict] = []
    for fmt, reason in files.missing:
        skipped += [_skip(j, "*", reason) for j in jobs if j.format == fmt]
    jobs = [j for j in jobs if j.format not in dict(files.missing)]
    bw = bandwidth_probe(settings.probe_gib, settings.probe_repeats, threads=settings.threads)
    log.info("bandwidth: read %.1f GB/s, copy %.1f GB/s", bw["read_gbs"], bw["copy_gbs"])

    samples: dict[tuple, list[float]] = defaultdict(list)
    extra: dict[Job, dict] = {}
    walls: dict[str, dict[str, float]] = {}
    logdir = Path(tempfile.mkdtemp(prefix="qadapt-bench-"))
    lives: dict[Job, dict] = {}
    for group in _groups(jobs):
        started = [Worker(job, files, settings, logdir) for job in group]
        try:
            _run_group(started, settings, samples, extra, skipped, t_start, walls)
        finally:  # an error or ^C here must not leave engines running
            for w in started:
                w.kill()
        for job in group:
            if not job.task and job in extra:
                info = _one_life(job, files, settings, logdir)
                if info is not None:
                    lives[job] = info

    results = _results(samples, extra, files, bw["read_gbs"], lives)
    report = {
        "machine": machine_info(settings.threads),
        "bandwidth_gbs": bw["read_gbs"],
        "bandwidth": bw,
        "model": {"name": settings.shape.name, "params": settings.shape.n_params, **asdict(settings.shape),
                  "lora": {"rank": LORA_RANK, "alpha": LORA_ALPHA, "targets": list(LORA_TARGETS),
                           "dtype": settings.adapter_dtype},
                  "xlora": {"experts": XLORA_EXPERTS, "depth": XLORA_DEPTH, "size": XLORA_SIZE,
                            "layerwise_scalings": True, "non_granular_index": XLORA_NON_GRANULAR_INDEX},
                  "cache": str(files.folder)},
        "settings": {"runs": settings.runs, "warmup": settings.warmup, "threads": settings.threads,
                     "prompt_tokens": settings.prompt_tokens, "decode_tokens": settings.decode_tokens,
                     "batch": settings.batch, "batch_prompt_tokens": settings.batch_prompt_tokens,
                     "quick": settings.quick},
        "results": results,
        "skipped": skipped,
        "elapsed_s": time.perf_counter() - t_start,
        "wall_s": {k: {p: round(v, 2) for p, v in d.items()} for k, d in walls.items()},
    }
    if settings.out is not None:
        from .report import write_outputs

        write_outputs(report, Path(settings.out), force=settings.force)
    return report


def _run_group(started: list[Worker], settings: BenchSettings, samples: dict, extra: dict, skipped: list,
               t_start: float, walls: dict) -> None:
    """Load runs, then measurement rounds, each visiting every live worker of the group in turn.

    ``walls``: job label -> seconds the runner waited on it per op (start, load, round), to see where a
    run's time goes."""
    total = settings.warmup + settings.runs
    workers: list[Worker] = []
    t0 = time.perf_counter()
    for w in started:
        try:
            w.ready()
            workers.append(w)
        except WorkerFailed as e:
            skipped.append(_skip(w.job, "*", str(e)))
            w.close()
    walls["(group start) " + ", ".join(w.job.label for w in started)] = {"start": time.perf_counter() - t0}
    for phase in ("load", "round"):
        for r in range(total):
            warm = r < settings.warmup
            for w in list(workers):
                cmd = {"op": phase, **_round_cmd(settings, warm)}
                t0 = time.perf_counter()
                try:
                    reply = w.call(cmd)
                except WorkerFailed as e:
                    log.warning("%s: %s", w.job.label, e)
                    skipped.append(_skip(w.job, "*", str(e)))
                    w.close()
                    workers.remove(w)
                    continue
                wall = walls.setdefault(w.job.label, {})
                wall[phase] = wall.get(phase, 0.0) + time.perf_counter() - t0
                for metric, reason in reply.get("skipped", {}).items():
                    if r == 0:
                        skipped.append(_skip(w.job, metric, reason))
                if warm:
                    continue
                for m in reply["metrics"]:
                    samples[(w.job, m["metric"], m["adapters"])].append(m["value"])
            log.info("%s run %d/%d done (%s) at %.0f s", phase, r + 1, total, ", ".join(w.job.label for w in started),
                     time.perf_counter() - t_start)
    for w in workers:
        try:
            extra[w.job] = w.call({"op": "info"})
        except WorkerFailed as e:
            skipped.append(_skip(w.job, "peak_rss_mb", str(e)))
        w.close()


def _one_life(job: Job, files: BenchFiles, settings: BenchSettings, logdir: Path) -> dict | None:
    """Memory as a user's process has it: a fresh worker, alone on the machine, loads once (model and
    the 8 adapters) and runs one measured round; its peak RSS over that life. (The timed workers load
    ``warmup + runs`` times in one process, which the allocator's reuse makes a few percent larger.)"""
    w = Worker(job, files, settings, logdir)
    try:
        w.ready()
        w.call({"op": "load"})
        w.call({"op": "round", **_round_cmd(settings, False)})
        return w.call({"op": "info"})
    except WorkerFailed as e:
        log.warning("%s: one-life memory run: %s", job.label, e)
        return None
    finally:
        w.close()


def _skip(job: Job, metric: str, reason: str) -> dict:
    """A skipped measurement; a failed X-LoRA worker skips the X-LoRA metrics, not the engine's others."""
    if job.task and metric in ("*", "peak_rss_mb"):
        metric = f"{job.task}_{'*' if metric == '*' else metric}"
    return {**job.to_json(), "metric": metric, "reason": reason}


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


def _model_bytes(job: Job, files: BenchFiles) -> int | None:
    """The GGUF file plus the 8 adapters in the format the engine loads them (PEFT safetensors, or
    llama.cpp's LoRA GGUF): what a model's resident memory is compared with."""
    if job.format not in GGUF_FORMATS:
        return None
    n = len(files.adapter_names)
    if job.engine == "llama.cpp":
        ad = sum(files.lora_gguf(k).stat().st_size for k in range(n))
    else:
        ad = sum(f.stat().st_size for k in range(n) for f in files.adapter(k).glob("*.safetensors"))
    return files.gguf(job.format).stat().st_size + ad


def _results(samples, extra, files: BenchFiles, bw_gbs: float, lives: dict | None = None) -> list[dict]:
    rows = []
    for (job, metric, adapters), values in sorted(samples.items(), key=lambda kv: (kv[0][0].format, kv[0][0].engine,
                                                                                  kv[0][0].mode, kv[0][1], kv[0][2])):
        rows.append({**job.to_json(), "adapters": adapters, "metric": metric, **summary(values)})
    for job, info in extra.items():
        if "peak_rss_bytes" in info:
            mb = info["peak_rss_bytes"] / 1e6
            metric, ad = ("xlora_peak_rss_mb", XLORA_EXPERTS) if job.task == "xlora" else ("peak_rss_mb", 8)
            rows.append({**job.to_json(), "adapters": ad, "metric": metric, "median": mb, "min": mb, "max": mb,
                         "runs": 1})
            model_bytes = _model_bytes(job, files)
            if "start_rss_bytes" in info and model_bytes and not job.task:
                ratio = (info["peak_rss_bytes"] - info["start_rss_bytes"]) / model_bytes
                rows.append({**job.to_json(), "adapters": ad, "metric": "rss_over_files", "median": ratio,
                             "min": ratio, "max": ratio, "runs": 1, "file_bytes": model_bytes})
    for job, info in (lives or {}).items():
        model_bytes = _model_bytes(job, files)
        if model_bytes and "start_rss_bytes" in info:
            ratio = (info["peak_rss_bytes"] - info["start_rss_bytes"]) / model_bytes
            rows.append({**job.to_json(), "adapters": 8, "metric": "rss_over_files_one_load", "median": ratio,
                         "min": ratio, "max": ratio, "runs": 1, "file_bytes": model_bytes,
                         "peak_rss_mb": info["peak_rss_bytes"] / 1e6})
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
