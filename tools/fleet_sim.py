#!/usr/bin/env python
"""A fleet of qadapt replicas serving thousands of adapters, simulated on measured costs.

Which routing policy should a fleet use when there are far more adapters than any replica holds? This
simulates replicas running qadapt's engine (continuous batching of up to ``batch`` rows, each row with
its own adapter; an adapter cache of ``memory / adapter bytes`` entries per replica, least recently used
idle adapters evicted; one adapter load at a time per replica, during which the engine keeps stepping)
under Poisson arrivals whose adapters follow a Zipf law, with the costs ``qadapt bench --serving-costs``
measured (docs/fleet/serving-costs.json: adapter load time and bytes, prefill per prompt token, and the
batched decode step's time by the number of distinct adapters in the batch).

Policies:
  random           any replica, uniformly
  least-loaded     power of two choices on outstanding requests (Ray Serve's default router)
  affinity         Ray Serve's multiplexed routing: a replica that holds or is loading the adapter (two
                   choices among them); else one of those holding the fewest adapters (two choices); a
                   replica with ``--max-ongoing`` requests is not chosen while another is not (Ray's
                   max_ongoing_requests; the default 72 is --max-queue + --max-batch, i.e. no limit here)
  affinity-spill   the same with max_ongoing_requests = 2 x batch (what ``qadapt serve --replicas`` sets):
                   a replica with a full batch and a full batch waiting spills to others, which then load
                   the adapter (hot adapters get replicas where they are needed)
  affinity+replicate  affinity, but a hot adapter (its share of the last ``--hot-window`` requests above
                   ``--hot-share``) whose holders all have every row busy is also loaded on the least
                   loaded other replica

Per policy: adapter-cache hit rate (requests that found their adapter resident), adapter loads per
second, throughput (generated tokens/s) and latency percentiles (arrival to last token).

Examples:
    python tools/fleet_sim.py                                   # the table for docs/fleet
    python tools/fleet_sim.py --adapters 10000 --replicas 16 --json
    python tools/fleet_sim.py --plot docs/fleet/fleet_sim.png --out docs/fleet/fleet_sim.json --force
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
from bisect import bisect_left
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

POLICIES = ("random", "least-loaded", "affinity", "affinity-spill", "affinity+replicate")


@dataclass
class Costs:
    load_s: float
    adapter_bytes: int
    prefill_s_per_token: float
    batch: int
    steps: dict[int, float]  # distinct adapters -> decode step seconds

    @classmethod
    def read(cls, path: Path) -> "Costs":
        d = json.loads(path.read_text())
        return cls(d["adapter_load_s"], d["adapter_bytes"], d["prefill_s_per_token"], d["batch"],
                   {int(k): v for k, v in d["step_s_by_distinct_adapters"].items()})

    def step(self, distinct: int) -> float:
        """Decode step time with ``distinct`` adapters among the rows (linear between measured counts)."""
        ks = sorted(self.steps)
        if distinct in self.steps:
            return self.steps[distinct]
        i = min(max(bisect_left(ks, distinct), 1), len(ks) - 1)
        k0, k1 = ks[i - 1], ks[i]
        return self.steps[k0] + (self.steps[k1] - self.steps[k0]) * (distinct - k0) / (k1 - k0)


@dataclass
class Request:
    arrival: float
    adapter: int
    left: int
    hit: bool = False


@dataclass
class Replica:
    capacity: int
    running: list = field(default_factory=list)
    waiting: deque = field(default_factory=deque)
    cache: OrderedDict = field(default_factory=OrderedDict)  # adapter -> None, least recent first
    loading: set = field(default_factory=set)
    load_queue: deque = field(default_factory=deque)
    busy_until: float = -1.0  # the step in progress ends then (-1: idle)
    loader_until: float = -1.0
    pending_prefill: float = 0.0

    @property
    def outstanding(self) -> int:
        return len(self.running) + len(self.waiting)

    def holds(self, a: int) -> bool:
        return a in self.cache or a in self.loading


class Sim:
    def __init__(self, costs: Costs, *, replicas: int, adapters: int, zipf: float, memory: float, rate: float,
                 prompt: int, output: int, policy: str, seed: int, hot_window: int, hot_share: float,
                 max_ongoing: int = 72):
        self.c, self.policy, self.rng = costs, policy, random.Random(seed)
        self.cap = 2 * costs.batch if policy == "affinity-spill" else max_ongoing
        cap = max(1, int(memory // costs.adapter_bytes))
        self.reps = [Replica(cap) for _ in range(replicas)]
        weights = [1 / (i + 1) ** zipf for i in range(adapters)]
        total = sum(weights)
        self.cdf = []
        acc = 0.0
        for w in weights:
            acc += w / total
            self.cdf.append(acc)
        self.rate, self.prompt, self.output = rate, prompt, output
        self.events: list = []
        self.seq = 0
        self.recent: deque = deque(maxlen=hot_window)
        self.recent_counts: dict[int, int] = {}
        self.hot_share = hot_share
        self.done: list[float] = []
        self.tokens = 0
        self.loads = 0
        self.hits = 0
        self.arrived = 0

    def push(self, t: float, kind: str, *data) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, data))

    def run(self, duration: float, warmup: float) -> dict:
        self.push(self.rng.expovariate(self.rate), "arrive")
        self.warmup = warmup
        while self.events:
            t, _, kind, data = heapq.heappop(self.events)
            if t > duration:
                break
            self.now = t
            if kind == "arrive":
                self.arrive(t)
                self.push(t + self.rng.expovariate(self.rate), "arrive")
            elif kind == "step":
                self.step_done(data[0])
            else:
                self.load_done(*data)
        span = duration - warmup
        lat = sorted(self.done)
        pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else math.nan  # noqa: E731
        return {"policy": self.policy, "requests": self.arrived, "completed": len(lat),
                "hit_rate": self.hits / max(1, self.arrived), "loads_per_s": self.loads / span,
                "tokens_per_s": self.tokens / span, "p50_s": pct(0.5), "p99_s": pct(0.99),
                "queued_at_end": sum(r.outstanding for r in self.reps)}

    # ------------------------------------------------------------------ routing
    def two(self, cands: list[int]) -> int:
        if len(cands) == 1:
            return cands[0]
        a, b = self.rng.sample(cands, 2)
        return a if self.reps[a].outstanding <= self.reps[b].outstanding else b

    def route(self, a: int) -> int:
        n = len(self.reps)
        if self.policy == "random":
            return self.rng.randrange(n)
        if self.policy == "least-loaded":
            return self.two(list(range(n)))
        open_ = [i for i, r in enumerate(self.reps) if r.outstanding < self.cap] or list(range(n))
        holders = [i for i in open_ if self.reps[i].holds(a)] if self.policy != "affinity+replicate" else \
            [i for i, r in enumerate(self.reps) if r.holds(a)]
        if holders:
            if (self.policy == "affinity+replicate" and len(holders) < n
                    and self.recent_counts.get(a, 0) > self.hot_share * len(self.recent)
                    and min(len(self.reps[i].running) for i in holders) >= self.c.batch):
                others = [i for i in range(n) if i not in holders]
                return min(others, key=lambda i: self.reps[i].outstanding)
            return self.two(holders)
        held = {i: len(self.reps[i].cache) + len(self.reps[i].loading) for i in open_}
        fewest = min(held.values())
        return self.two([i for i, k in held.items() if k == fewest])

    # ------------------------------------------------------------------ events
    def arrive(self, t: float) -> None:
        a = min(bisect_left(self.cdf, self.rng.random()), len(self.cdf) - 1)
        if len(self.recent) == self.recent.maxlen:
            old = self.recent[0]
            self.recent_counts[old] -= 1
        self.recent.append(a)
        self.recent_counts[a] = self.recent_counts.get(a, 0) + 1
        i = self.route(a)
        r = self.reps[i]
        req = Request(t, a, self.output, hit=a in r.cache)
        if t >= self.warmup:
            self.arrived += 1
            self.hits += req.hit
        r.waiting.append(req)
        if not req.hit and a not in r.loading:
            r.loading.add(a)
            r.load_queue.append(a)
            self.start_load(i)
        self.admit(i)

    def start_load(self, i: int) -> None:
        r = self.reps[i]
        if r.loader_until >= 0 or not r.load_queue:
            return
        in_use = {q.adapter for q in r.running}
        while len(r.cache) >= r.capacity:
            victim = next((a for a in r.cache if a not in in_use), None)
            if victim is None:
                return  # every resident adapter is in use: load when a row frees one
            del r.cache[victim]
        a = r.load_queue.popleft()
        r.loader_until = self.now + self.c.load_s
        self.push(r.loader_until, "load", i, a)

    def load_done(self, i: int, a: int) -> None:
        r = self.reps[i]
        r.loader_until = -1.0
        r.loading.discard(a)
        r.cache[a] = None
        if self.now >= self.warmup:
            self.loads += 1
        self.start_load(i)
        self.admit(i)

    def admit(self, i: int) -> None:
        r = self.reps[i]
        kept = deque()
        while r.waiting:
            q = r.waiting.popleft()
            if len(r.running) < self.c.batch and q.adapter in r.cache:
                r.cache.move_to_end(q.adapter)
                r.running.append(q)
                r.pending_prefill += self.prompt * self.c.prefill_s_per_token
            else:
                kept.append(q)
        r.waiting = kept
        if r.busy_until < 0 and r.running:
            self.start_step(i)

    def start_step(self, i: int) -> None:
        r = self.reps[i]
        t = self.c.step(len({q.adapter for q in r.running})) + r.pending_prefill
        r.pending_prefill = 0.0
        r.busy_until = self.now + t
        self.push(r.busy_until, "step", i)

    def step_done(self, i: int) -> None:
        r = self.reps[i]
        r.busy_until = -1.0
        live = []
        for q in r.running:
            q.left -= 1
            if self.now >= self.warmup:
                self.tokens += 1
            if q.left:
                live.append(q)
            elif q.arrival >= self.warmup:
                self.done.append(self.now - q.arrival)
        r.running = live
        self.start_load(i)
        self.admit(i)
        if r.busy_until < 0 and r.running:
            self.start_step(i)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("Examples:")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--costs", type=Path, default=Path("docs/fleet/serving-costs.json"),
                   help="qadapt bench --serving-costs output [%(default)s]")
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--adapters", type=int, nargs="+", default=[1000, 10000], help="fleet sizes to simulate")
    p.add_argument("--zipf", type=float, default=1.0, help="popularity exponent s (rank k has weight k^-s)")
    p.add_argument("--memory-gib", type=float, default=1.0, help="adapter memory per replica [GiB]")
    p.add_argument("--load", type=float, default=0.7,
                   help="offered load as a fraction of the fleet's capacity with one adapter per batch and no loads")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens per request")
    p.add_argument("--output", type=int, default=64, help="generated tokens per request")
    p.add_argument("--duration", type=float, default=600.0, help="simulated seconds (the first tenth is warm-up)")
    p.add_argument("--hot-window", type=int, default=500)
    p.add_argument("--hot-share", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--load-s", type=float, default=None,
                   help="adapter load time instead of the measured one (e.g. 0.5 for a fetch from S3)")
    p.add_argument("--max-ongoing", type=int, default=72, help="Ray's max_ongoing_requests for 'affinity' [72]")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--plot", type=Path, help="write a PNG of the results here (matplotlib)")
    p.add_argument("--force", action="store_true", help="overwrite --out / --plot")
    a = p.parse_args(argv)
    if not a.costs.exists():
        p.error(f"{a.costs} does not exist: make it with `python tools/bench.py --serving-costs Q4_0 --out "
                f"{a.costs.parent}`")
    for path in (a.out, a.plot):
        if path is not None and path.exists() and not a.force:
            p.error(f"{path} exists; pass --force to overwrite it")
    if a.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib (pip install 'qadapt[bench]')")
    costs = Costs.read(a.costs)
    if a.load_s is not None:
        costs.load_s = a.load_s
    # requests/s one replica finishes with one adapter per batch: each request's prefill, and its share of the steps
    per_replica = 1 / (a.prompt * costs.prefill_s_per_token + a.output * costs.step(1) / costs.batch)
    rate = a.load * per_replica * a.replicas
    results = []
    for n in a.adapters:
        for pol in POLICIES:
            sim = Sim(costs, replicas=a.replicas, adapters=n, zipf=a.zipf, memory=a.memory_gib * 2**30, rate=rate,
                      prompt=a.prompt, output=a.output, policy=pol, seed=a.seed, hot_window=a.hot_window,
                      hot_share=a.hot_share, max_ongoing=a.max_ongoing)
            res = sim.run(a.duration, a.duration / 10)
            res.update(adapters=n, cache_per_replica=sim.reps[0].capacity)
            results.append(res)
            print(f"simulated {pol} with {n} adapters", file=sys.stderr)
    report = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
              "costs": vars(costs) | {"steps": {str(k): v for k, v in costs.steps.items()}},
              "rate_per_s": rate, "results": results}
    if a.out:
        from qadapt.io import write_json

        write_json(a.out, report, force=a.force)
    if a.plot:
        plot(results, a.plot, a.force)
    print(json.dumps(report, indent=2) if a.json else table(report))
    return 0


def table(report: dict) -> str:
    s = report["settings"]
    lines = [f"{s['replicas']} replicas, {report['rate_per_s']:.1f} requests/s ({s['load']:.0%} of capacity), "
             f"Zipf s={s['zipf']}, {s['prompt']}+{s['output']} tokens, {s['memory_gib']} GiB of adapters per "
             f"replica ({report['results'][0]['cache_per_replica']} adapters)", "",
             "| adapters | policy | cache hit rate | loads/s | tokens/s | p50 s | p99 s | queued at end |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(f"| {r['adapters']} | {r['policy']} | {r['hit_rate']:.3f} | {r['loads_per_s']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | {r['queued_at_end']} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path, force: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qadapt.io import atomic_path

    sizes = sorted({r["adapters"] for r in results})
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (metric, label) in zip(axes, [("hit_rate", "adapter-cache hit rate"), ("tokens_per_s", "tokens/s"),
                                          ("p99_s", "p99 latency (s)")]):
        for j, n in enumerate(sizes):
            rs = [r for r in results if r["adapters"] == n]
            xs = [i + (j - (len(sizes) - 1) / 2) * 0.35 for i in range(len(rs))]
            ax.bar(xs, [r[metric] for r in rs], width=0.35, label=f"{n} adapters")
        ax.set_xticks(range(len(POLICIES)), POLICIES, rotation=15, fontsize=8)
        ax.set_title(label)
        if metric == "p99_s":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, force=force) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
