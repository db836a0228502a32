"""``qadapt serve --replicas 2`` on a local Ray cluster (loopback, small object store), as a user runs it.

References: the single-process server (``qadapt serve`` without --replicas, itself checked against the
Python API and PEFT in tests/test_server.py and tests/test_serving_api.py) on the same model and
adapters. Tolerance: none; greedy token ids and texts must be equal (the replicas run the same engine
on the same weights; their batches may differ, and test_server.py measured batched-vs-single logit
differences 250x below the smallest top-2 gap on this model). Routing is checked from the fleet's
own per-replica counters (``GET /fleet``, ``/metrics``), which come from the replicas' registries.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest

for _dep in ("ray", "starlette", "uvicorn", "httpx"):
    pytest.importorskip(_dep)
pytest.importorskip("ray.serve")

import httpx  # noqa: E402

from models import tiny_hf, write_quantized  # noqa: E402
from server_helpers import ServerProc, metric, write_peft_adapter  # noqa: E402

pytest_plugins = ["fixtures_s3"]

ADAPTERS = [f"a{i}" for i in range(6)]
PROMPT = "the cat sat"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from fixtures_s3 import free_port

    d = tmp_path_factory.mktemp("fleet")
    hf = tiny_hf("llama", seed=3)
    gguf = d / "tiny.gguf"
    write_quantized(hf, gguf, "Q8_0", seed=4)
    args = [str(gguf)]
    for i, name in enumerate(ADAPTERS):
        args += ["--adapter", f"{name}={write_peft_adapter(hf, d / name, 20 + i)}"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    many = ServerProc.spawn([*args, "--replicas", "2", "--replica-cpus", "1"], free_port(), d / "fleet.log", env=env)
    one = ServerProc.spawn(args, free_port(), d / "one.log")
    try:
        one.wait_ready()
        many.wait_ready(timeout=240)
        yield {"fleet": many, "one": one, "dir": d}
    finally:
        many.stop()
        one.stop()


def complete(url, model, n=8, **extra):
    r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0, **extra},
                   timeout=60)
    return r.status_code, r.json()


def test_routing_by_adapter_affinity(fleet):
    """Two rounds over six adapters, one request at a time: every adapter is loaded once in the whole fleet
    (6 loads, not up to 12) and each adapter's requests all land on the replica holding it; the second
    round is all affinity hits. (First in this module: it needs fresh replicas.)"""
    url = fleet["fleet"].url
    for rnd in range(2):
        for name in ADAPTERS:
            status, _ = complete(url, name, n=2)
            assert status == 200
        time.sleep(1.0)  # Ray's routers learn a replica's keys from its pushes (every ~0.1 s)
    rep = httpx.get(url + "/fleet").json()["replicas"]
    assert len(rep) == 2, rep
    homes = {}
    for r, s in rep.items():
        for key, n in s["keys"].items():
            assert key not in homes, f"{key} went to two replicas: {rep}"
            homes[key] = r
            assert n == 2
    assert sorted(homes) == ADAPTERS
    assert sum(s["adapter_loads"] for s in rep.values()) == 6, rep
    assert sum(s["affinity_hits"] for s in rep.values()) == 6, rep
    assert all(s["keys"] for s in rep.values()), f"one replica took every adapter: {rep}"
    print(f"\nfleet routing: {json.dumps({r: {k: s[k] for k in ('requests', 'affinity_hits', 'adapter_loads', 'keys')} for r, s in rep.items()})}")
    text = httpx.get(url + "/metrics").text
    for r, s in rep.items():
        assert metric(text, "qadapt_fleet_adapter_loads_total", f'replica="{r}"') == s["adapter_loads"]


def test_answers_equal_the_single_process_server(fleet):
    one, many = fleet["one"].url, fleet["fleet"].url
    bodies = [("/v1/completions", {"model": m, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}) for m in ["base", *ADAPTERS]]
    bodies += [("/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                    "adapters": ["a1", "a4"]}),
               ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                    "adapters": {"a2": 0.5, "a5": 1.5}}),
               ("/generate", {"inputs": PROMPT, "parameters": {"adapter_id": "a3", "max_new_tokens": 8,
                                                               "details": True}}),
               ("/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "merged_adapters": {
                   "ids": ["a0", "a1"], "weights": [0.7, 0.3], "merge_strategy": "ties", "density": 0.5}}}),
               ("/v1/completions", {"model": "nope", "prompt": PROMPT})]
    for path, body in bodies:
        a = httpx.post(one + path, json=body, timeout=60)
        b = httpx.post(many + path, json=body, timeout=60)
        assert a.status_code == b.status_code, (body, a.text, b.text)
        ja, jb = a.json(), b.json()
        if path == "/generate":
            assert ja == jb  # text, tokens, ids and logprobs (no ids or times in LoRAX's answer)
        elif a.status_code == 200:
            assert [c["text"] for c in ja["choices"]] == [c["text"] for c in jb["choices"]], body
        else:
            assert ja == jb
    # streamed: the same events' text
    for url in (one, many):
        with httpx.stream("POST", url + "/v1/completions", timeout=60,
                          json={"model": "a2", "prompt": PROMPT, "max_tokens": 8, "stream": True, "temperature": 0}) as r:
            events = [json.loads(x[6:]) for x in r.read().decode().split("\n\n") if x.startswith("data: {")]
            fleet.setdefault("streams", []).append("".join(e["choices"][0]["text"] for e in events if e["choices"]))
    assert fleet["streams"][0] == fleet["streams"][1] == complete(one, "a2")[1]["choices"][0]["text"]


def test_runtime_management_is_refused_by_name(fleet):
    r = httpx.post(fleet["fleet"].url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"})
    assert r.status_code == 501 and "--replicas" in r.json()["error"]["message"]


def test_killing_a_replica_answers_every_request(fleet):
    """Twelve requests in flight (half streamed), then one replica's process is killed: each request gets
    its complete answer or a clear 503 (an SSE error event in a stream), none hangs; Ray replaces the
    replica and every adapter answers again."""
    url = fleet["fleet"].url
    want = {name: complete(fleet["one"].url, name, n=40)[1]["choices"][0]["text"] for name in ADAPTERS}
    pid = next(iter(httpx.get(url + "/fleet").json()["replicas"].values()))["pid"]

    async def one(c, i):
        body = {"model": ADAPTERS[i % 6], "prompt": PROMPT, "max_tokens": 40, "stream": i % 2 == 1, "temperature": 0}
        if body["stream"]:
            async with c.stream("POST", url + "/v1/completions", json=body) as r:
                return r.status_code, "stream", (await r.aread()).decode(), body["model"]
        r = await c.post(url + "/v1/completions", json=body)
        return r.status_code, "json", r.json(), body["model"]

    async def run():
        async with httpx.AsyncClient(timeout=90) as c:
            tasks = [asyncio.create_task(one(c, i)) for i in range(12)]
            await asyncio.sleep(0.3)
            os.kill(pid, signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*tasks), 120)

    results = asyncio.run(run())
    outcome = {"ok": 0, "503": 0}
    for status, kind, body, model in results:
        if kind == "json":
            if status == 200:
                assert body["choices"][0]["text"] == want[model]
                outcome["ok"] += 1
            else:
                assert status == 503 and "stopped" in body["error"]["message"], body
                outcome["503"] += 1
        else:
            assert status == 200
            if '"error"' in body:
                assert "stopped" in body and body.rstrip().endswith("data: [DONE]")
                outcome["503"] += 1
            else:
                assert body.rstrip().endswith("data: [DONE]") and '"finish_reason": "' in body.replace(
                    '"finish_reason":"', '"finish_reason": "')
                outcome["ok"] += 1
    assert outcome["ok"] + outcome["503"] == 12
    fleet["kill"] = outcome
    print(f"\nreplica killed with 12 requests in flight: {outcome}")
    deadline = time.monotonic() + 120
    while True:  # until Ray has replaced the replica (a request routed to the dead one meanwhile gets a 503)
        try:
            got = [complete(url, name, n=40) for name in ADAPTERS]
        except httpx.HTTPError as e:
            got = [(599, repr(e))]
        if all(s == 200 for s, _ in got):
            break
        assert time.monotonic() < deadline, got
        time.sleep(1)
    assert [b["choices"][0]["text"] for _, b in got] == [want[n] for n in ADAPTERS]
    assert httpx.get(url + "/fleet").json()["replica_failures"] >= outcome["503"]


def test_http_endpoint_listens_on_loopback_only(fleet):
    """--host defaults to 127.0.0.1: Ray's HTTP proxy must not answer on the machine's other address."""
    import socket
    from urllib.parse import urlparse

    port = urlparse(fleet["fleet"].url).port
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: picks the outward interface's address
        addr = probe.getsockname()[0]
    except OSError:
        pytest.skip("no non-loopback interface")
    finally:
        probe.close()
    if addr.startswith("127."):
        pytest.skip("no non-loopback interface")
    with pytest.raises(OSError):
        socket.create_connection((addr, port), timeout=2).close()
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
