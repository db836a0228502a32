"""The ceiling and the yardsticks: memory-bandwidth probe, resident memory, statistics, machine facts."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time


def bandwidth_probe(gib: float = 1.0, repeats: int = 7, threads: int = 2) -> dict[str, float]:
    """Read bandwidth in GB/s (1e9 bytes): the best of ``repeats`` sums over a ``gib`` GiB float32 array.

    A decode step streams the weights once, so a read (sum) with the benchmark's thread
    count is the relevant ceiling; a copy (read + write, counted as both) is reported beside it.
    """
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n = int(gib * (1 << 30)) // 4
        x = torch.ones(n, dtype=torch.float32)
        y = torch.empty_like(x)
        read = copy = 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            x.sum()
            read = max(read, x.numel() * 4 / (time.perf_counter() - t0) / 1e9)
            t0 = time.perf_counter()
            y.copy_(x)
            copy = max(copy, 2 * x.numel() * 4 / (time.perf_counter() - t0) / 1e9)
        return {"read_gbs": read, "copy_gbs": copy, "array_gib": gib, "repeats": repeats, "threads": threads}
    finally:
        torch.set_num_threads(old)


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if platform.system() == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def summary(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "runs": len(samples)}


def machine_info(threads: int) -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem = 0
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("transformers", "peft", "gguf", "llama_cpp_python", "bitsandbytes", "qadapt"):
        versions[pkg] = _version(pkg)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / (1 << 30), 1),
            "system": f"{platform.system()} {platform.release()}", "threads": threads, "versions": versions}


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg.replace("_", "-"))
    except PackageNotFoundError:
        return None
