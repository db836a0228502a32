"""tools/fleet_sim.py against an independent model of its caches.

Under random routing each replica sees a thinned Poisson stream with the fleet's Zipf popularity, so
its adapter cache is an LRU cache under the independent reference model, whose hit rate Che's
approximation gives (Che, Tung & Wang 2002; Fricker, Robert & Roberts 2012): find T with
sum_i (1 - exp(-p_i T)) = C, then hit = sum_i p_i (1 - exp(-p_i T)). Tolerance 0.02: the
approximation's own error for Zipf popularity is below 0.01 at these sizes, the sampling error of
~15,000 requests is ~0.004, and the simulated cache differs from ideal LRU only by loads in flight
(fast here) and adapters held by running rows (8 of 81).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _sim():
    spec = importlib.util.spec_from_file_location("fleet_sim", ROOT / "tools" / "fleet_sim.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fleet_sim"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def che_hit_rate(n: int, s: float, cache: int) -> float:
    w = [1 / (i + 1) ** s for i in range(n)]
    p = [x / sum(w) for x in w]
    lo, hi = 0.0, 1e9
    for _ in range(200):
        t = (lo + hi) / 2
        lo, hi = (t, hi) if sum(1 - math.exp(-q * t) for q in p) < cache else (lo, t)
    return sum(q * (1 - math.exp(-q * t)) for q in p)


COSTS = {"adapter_load_s": 0.015, "adapter_bytes": 13107200, "prefill_s_per_token": 0.0015, "batch": 8,
         "step_s_by_distinct_adapters": {"0": 0.0142, "1": 0.0154, "2": 0.0156, "4": 0.0159, "8": 0.0162}}


@pytest.mark.parametrize("adapters", [1000, 10000])
def test_random_routing_matches_che(tmp_path, adapters):
    fs = _sim()
    (tmp_path / "c.json").write_text(json.dumps(COSTS))
    costs = fs.Costs.read(tmp_path / "c.json")
    res = {}
    for pol in ("random", "least-loaded", "affinity-spill"):
        sim = fs.Sim(costs, replicas=8, adapters=adapters, zipf=1.0, memory=2**30, rate=25.0, prompt=64, output=64,
                     policy=pol, seed=1, hot_window=500, hot_share=0.02)
        res[pol] = sim.run(600.0, 60.0)
    cap = int(2**30 // COSTS["adapter_bytes"])
    want = che_hit_rate(adapters, 1.0, cap)
    assert abs(res["random"]["hit_rate"] - want) < 0.02, (res["random"], want)
    assert abs(res["least-loaded"]["hit_rate"] - want) < 0.02
    # affinity keeps each adapter on few replicas: the fleet caches ~8x more distinct adapters
    assert res["affinity-spill"]["hit_rate"] > che_hit_rate(adapters, 1.0, 4 * cap)
    for r in res.values():  # below capacity every policy keeps up: nothing piles up
        assert r["queued_at_end"] < 100 and r["completed"] > 0.9 * r["requests"]


def test_cli_writes_and_refuses_to_overwrite(tmp_path):
    fs = _sim()
    (tmp_path / "c.json").write_text(json.dumps(COSTS))
    out = tmp_path / "r.json"
    args = ["--costs", str(tmp_path / "c.json"), "--adapters", "100", "--duration", "60", "--out", str(out)]
    assert fs.main(args) == 0
    assert {r["policy"] for r in json.loads(out.read_text())["results"]} == set(fs.POLICIES)
    with pytest.raises(SystemExit):
        fs.main(args)
