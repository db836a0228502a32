#!/usr/bin/env python
"""Load test for ``qadapt serve``: many concurrent clients, mixed requests, every answer checked.

What it does, in order:

1. Starts a server on loopback (a tiny random Llama GGUF with three random LoRA adapters, built
   with tests/models.py; or ``--model FILE --adapter NAME=PATH ...``), or targets ``--url``.
2. References: each (prompt, adapter set) is sent alone, greedy, once as a completion and once as a
   chat; those single-request answers are what every answer under load must equal.
3. Load: ``--clients`` async clients (httpx, one connection each) for ``--duration`` seconds, each
   looping over a weighted mix: completions and chats, streamed and not, LoRAX ``/generate`` and
   ``/generate_stream``, base / single adapters / two adapters at once, seeded sampling, clients that
   disconnect mid-stream or stop waiting, and hostile requests (garbage bytes, bad JSON, wrong types,
   unknown adapter, oversized max_tokens, a body over the size limit, no API key, unknown path).
   Every response's status must be one the request allows (a generation: 200 or 429; a hostile
   request: its 4xx); no 5xx ever; every completed greedy answer must equal its reference.
   ``/health`` is polled throughout: ``queued`` must never exceed the queue bound (429, not
   unbounded queueing).
4. Quiet: once the clients stop, ``active_sequences``, ``queued`` and ``adapters_in_use`` must return
   to 0 (no leaked rows or adapter references); server RSS before (after the references) and after.
5. Shutdown (when the server's pid is known): long requests fill the rows and the queue, then
   SIGINT (or ``--signal TERM``); each must finish with its reference answer or end with a clean
   503 "shutting down" (a JSON error, or an SSE error event then ``[DONE]``); the process must exit
   with 0 within ``--shutdown-timeout`` + 10 s, with no traceback in its log.

Examples::

    python tools/loadtest.py                                  # 100 clients, 60 s, tiny model
    python tools/loadtest.py --clients 20 --duration 10 --json --out /tmp/load.json
    python tools/loadtest.py --url http://127.0.0.1:8000 --api-key KEY --adapters a,b --pid 1234

Exit status: 0 when every check passed, 1 otherwise (the report says which failed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["the cat sat", "hello world", "a model", "lora quant", "the mat on"]
GREEDY_KINDS = ("completion", "completion_stream", "chat", "chat_stream", "generate", "generate_stream")
#: request kind -> weight in the mix
MIX = {
    "completion": 18, "completion_stream": 14, "chat": 9, "chat_stream": 9, "generate": 8, "generate_stream": 7,
    "sampled": 4, "disconnect_stream": 8, "disconnect_wait": 4,
    "garbage_bytes": 2, "bad_json": 2, "wrong_types": 2, "unknown_adapter": 2, "oversized_max_tokens": 2,
    "huge_body": 1, "no_auth": 1, "bad_path": 1,
}
#: statuses each kind may get under load (anything else is a failure); a full queue refuses generation
#: requests (429) before reading them, so hostile ones sent to generation endpoints may get 429 too
ALLOWED = {**{k: {200, 429} for k in (*GREEDY_KINDS, "sampled", "disconnect_stream", "disconnect_wait")},
           "garbage_bytes": {400, 429}, "bad_json": {400, 429}, "wrong_types": {400, 429},
           "unknown_adapter": {404, 429}, "oversized_max_tokens": {400, 429}, "huge_body": {413, 429},
           "no_auth": {401}, "bad_path": {404}}


@dataclass
class LoadConfig:
    clients: int = 100
    duration: float = 60.0
    max_tokens: int = 16  # greedy answers compared with the references
    prompts: int = len(PROMPTS)  # how many of PROMPTS (each costs a reference per adapter set)
    max_batch: int = 8
    max_queue: int = 32
    shutdown_timeout: float = 5.0
    shutdown_tokens: int = 64  # the requests in flight at the signal
    exit_slack: float = 10.0  # the process must exit within shutdown_timeout + this (torch's teardown alone: 1-3 s)
    signal: str = "INT"
    seed: int = 0
    url: str | None = None
    api_key: str | None = "sk-loadtest"
    adapters: list[str] = field(default_factory=list)  # with --url / --model: the adapter names served
    pid: int | None = None
    model: str | None = None
    model_adapters: list[str] = field(default_factory=list)  # NAME=PATH for --model
    chat_template: str | None = None  # --chat-template for the server (the tiny model gets ChatML)
    workdir: str | None = None


@dataclass
class Target:
    url: str
    api_key: str | None
    base: str
    adapters: list[str]
    pid: int | None = None
    proc: subprocess.Popen | None = None
    log: Path | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


# ---------------------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(folder: Path) -> tuple[Path, dict[str, Path]]:
    """The tests' tiny random Llama (Q8_0 GGUF, BPE tokenizer) and three random PEFT LoRA adapters."""
    sys.path.insert(0, str(ROOT / "tests"))
    from models import tiny_hf, write_quantized
    from server_helpers import write_peft_adapter

    hf = tiny_hf("llama", seed=3)
    gguf = folder / "tiny.gguf"
    write_quantized(hf, gguf, "Q8_0", seed=4)
    ads = {"a": write_peft_adapter(hf, folder / "a", 10),
           "b": write_peft_adapter(hf, folder / "b", 11, r=8, alpha=4, targets=("q_proj", "v_proj", "down_proj")),
           "c": write_peft_adapter(hf, folder / "c", 12, targets=("q_proj", "o_proj", "up_proj"))}
    return gguf, ads


def _chatml(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from models import chatml_file

    return chatml_file(folder)


def start_server(cfg: LoadConfig, folder: Path) -> Target:
    if cfg.model:
        model, ads = Path(cfg.model), dict(a.split("=", 1) for a in cfg.model_adapters)
        chat = cfg.chat_template  # None: the model's own chat template
    else:
        model, ads = tiny_model(folder)
        chat = cfg.chat_template or str(_chatml(folder))  # the tiny model has none
    template = ["--chat-template", chat] if chat else []
    port = free_port()
    log = folder / "server.log"
    cmd = [sys.executable, "-m", "qadapt", "-v", "serve", str(model), "--port", str(port),
           "--max-batch", str(cfg.max_batch), "--max-queue", str(cfg.max_queue),
           "--shutdown-timeout", str(cfg.shutdown_timeout), *template]
    for name, path in ads.items():
        cmd += ["--adapter", f"{name}={path}"]
    env = dict(os.environ)
    if cfg.api_key:
        env["QADAPT_API_KEY"] = cfg.api_key
    from qadapt.io import open_log

    with open_log(log) as out:  # the server's own log, streamed while it runs
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    t = Target(f"http://127.0.0.1:{port}", cfg.api_key, model.stem, list(ads), proc.pid, proc, log)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"qadapt serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(t.url + "/health", timeout=1).status_code == 200:
                return t
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"qadapt serve did not become healthy in 180 s:\n{log.read_text()[-4000:]}")


def rss_bytes(t: Target) -> int | None:
    """The server's resident memory: /proc/PID/status when the pid is known, else /metrics."""
    if t.pid:
        try:
            for line in Path(f"/proc/{t.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    try:
        text = httpx.get(t.url + "/metrics", headers=t.headers, timeout=5).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return int(float(line.split()[1]))
    return None


# ---------------------------------------------------------------------------------------- requests
def model_sets(t: Target) -> list[tuple[str, list[str] | None]]:
    """(model, adapters field) pairs: the bare base, each adapter, and two adapters at once."""
    sets: list[tuple[str, list[str] | None]] = [("base", None)] + [(a, None) for a in t.adapters]
    if len(t.adapters) >= 2:
        sets.append((t.base, t.adapters[:2]))
    return sets


def openai_body(model: str, adapters, prompt: str, chat: bool, n: int, stream: bool, **kw) -> dict:
    body: dict[str, Any] = {"model": model, "max_tokens": n, "temperature": 0, "stream": stream, **kw}
    if adapters is not None:
        body["adapters"] = adapters
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def lorax_body(model: str, adapters, prompt: str, n: int) -> dict | None:
    if adapters is not None:  # LoRAX takes one adapter_id
        return None
    params: dict[str, Any] = {"max_new_tokens": n, "details": True}
    if model != "base":
        params["adapter_id"] = model
    else:
        params["adapter_id"] = "base"
    return {"inputs": prompt, "parameters": params}


@dataclass
class Outcome:
    kind: str
    status: int  # HTTP status; 0: transport error, -1: the client gave up on purpose
    seconds: float
    ok: bool  # status allowed and (for greedy 200s) the answer equals the reference
    detail: str = ""
    text: str | None = None


def parse_sse(lines: list[str]) -> tuple[list[Any], bool]:
    events, done = [], False
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            continue
        events.append(json.loads(data))
    return events, done


def stream_text(kind: str, events: list[dict], done: bool) -> tuple[str | None, str]:
    """(text, problem) of a finished stream; problem is "" when the stream ended properly."""
    errors = [e for e in events if "error" in e]
    if errors:
        return None, f"error event: {errors[0]['error']}"
    if kind == "generate_stream":
        if not events or events[-1].get("generated_text") is None:
            return None, "no final event with generated_text"
        joined = "".join(e["token"]["text"] for e in events)
        if joined != events[-1]["generated_text"]:
            return None, f"token texts {joined!r} != generated_text {events[-1]['generated_text']!r}"
        return events[-1]["generated_text"], ""
    if not done:
        return None, "stream ended without [DONE]"
    chunks = [e for e in events if e.get("choices")]
    if not any(c["choices"][0].get("finish_reason") for c in chunks):
        return None, "no chunk with a finish_reason"
    if kind == "chat_stream":
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks), ""
    return "".join(c["choices"][0]["text"] for c in chunks), ""


async def send_greedy(c: httpx.AsyncClient, kind: str, model: str, adapters, prompt: str, n: int,
                      headers: dict) -> tuple[int, str | None, str]:
    """One greedy request of ``kind``: (status, text or None, problem)."""
    chat = kind.startswith("chat")
    stream = kind.endswith("_stream")
    if kind.startswith("generate"):
        path = "/generate_stream" if stream else "/generate"
        body = lorax_body(model, adapters, prompt, n)
    else:
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body = openai_body(model, adapters, prompt, chat, n, stream)
    if not stream:
        r = await c.post(path, json=body, headers=headers)
        if r.status_code != 200:
            return r.status_code, None, _error_text(r)
        j = r.json()
        if kind == "generate":
            return 200, j["generated_text"], ""
        ch = j["choices"][0]
        return 200, ch["message"]["content"] if chat else ch["text"], ""
    async with c.stream("POST", path, json=body, headers=headers) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, None, _error_text(r)
        lines = [line async for line in r.aiter_lines()]
    events, done = parse_sse(lines)
    text, problem = stream_text(kind, events, done)
    return 200, text, problem


def _error_text(r: httpx.Response) -> str:
    try:
        e = r.json()["error"]
        return e["message"] if isinstance(e, dict) else str(e)
    except (ValueError, KeyError, TypeError):
        return r.text[:200]


# ---------------------------------------------------------------------------------------- the run
class Load:
    def __init__(self, cfg: LoadConfig, t: Target):
        self.cfg, self.t = cfg, t
        self.sets = model_sets(t)
        self.prompts = PROMPTS[:max(1, cfg.prompts)]
        self.refs: dict[tuple[str, str, str], str] = {}  # (chat|text, model/adapters, prompt) -> text
        self.outcomes: list[Outcome] = []
        self.health: list[dict] = []
        self.stop_at = 0.0

    def key(self, chat: bool, model: str, adapters, prompt: str, n: int) -> tuple:
        return ("chat" if chat else "text", model, tuple(adapters or ()), prompt, n)

    async def references(self, n: int, prompts=None, sets=None) -> None:
        """Every (prompt, adapter set) alone: completion, chat and LoRAX (which must equal the completion)."""
        async with httpx.AsyncClient(base_url=self.t.url, timeout=300) as c:
            for model, adapters in sets or self.sets:
                for p in prompts or self.prompts:
                    for chat in (False, True):
                        st, text, problem = await send_greedy(c, "chat" if chat else "completion", model, adapters,
                                                              p, n, self.t.headers)
                        if st != 200:
                            raise RuntimeError(f"reference request {model} {adapters} {p!r} got {st}: {problem}")
                        self.refs[self.key(chat, model, adapters, p, n)] = text
                    if adapters is None:
                        st, text, problem = await send_greedy(c, "generate", model, adapters, p, n, self.t.headers)
                        want = self.refs[self.key(False, model, adapters, p, n)]
                        if st != 200 or text != want:
                            raise RuntimeError(f"LoRAX /generate for {model} {p!r} gave {st} {text!r}, the "
                                               f"completion gave {want!r}")

    async def one(self, c: httpx.AsyncClient, rng: random.Random, kind: str | None = None) -> Outcome:
        kind = kind or rng.choices(list(MIX), weights=list(MIX.values()))[0]
        if not self.t.api_key and kind == "no_auth":
            kind = "completion"
        model, adapters = rng.choice(self.sets)
        if kind.startswith("generate") and adapters is not None:
            model, adapters = rng.choice([s for s in self.sets if s[1] is None])
        prompt = rng.choice(self.prompts)
        n, h = self.cfg.max_tokens, self.t.headers
        t0 = time.monotonic()
        try:
            if kind in GREEDY_KINDS:
                st, text, problem = await send_greedy(c, kind, model, adapters, prompt, n, h)
                ok = st in ALLOWED[kind] and (st != 200 or not problem)
                if st == 200 and ok:
                    want = self.refs[self.key(kind.startswith("chat"), model, adapters, prompt, n)]
                    if text != want:
                        ok, problem = False, f"answer {text!r} != single-request reference {want!r}"
                return Outcome(kind, st, time.monotonic() - t0, ok, "" if ok else
                               f"{kind} {model} {adapters} {prompt!r}: {st} {problem}", text)
            if kind == "sampled":
                body = openai_body(model, adapters, prompt, False, n, False, temperature=0.8,
                                   seed=rng.randrange(1000))
                r = await c.post("/v1/completions", json=body, headers=h)
                st = r.status_code
            elif kind == "disconnect_stream":
                body = openai_body(model, adapters, prompt, rng.random() < 0.5, 4 * n, True)
                path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
                async with c.stream("POST", path, json=body, headers=h) as r:
                    st = r.status_code
                    if st == 200:
                        async for line in r.aiter_lines():
                            if line.startswith("data:"):
                                break  # leave with the rest unread: the connection closes
                    else:
                        await r.aread()
                if st == 200:
                    await c.aclose()  # this client's connection is gone; the caller opens a new one
            elif kind == "disconnect_wait":
                body = openai_body(model, adapters, prompt, False, 4 * n, False)
                try:
                    r = await c.post("/v1/completions", json=body, headers=h, timeout=rng.uniform(0.02, 0.3))
                    st = r.status_code
                except httpx.TimeoutException:
                    await c.aclose()
                    return Outcome(kind, -1, time.monotonic() - t0, True)
            else:
                st, r = await self.hostile(c, kind, model, prompt, h)
            ok = st in ALLOWED[kind]
            detail = "" if ok else f"{kind}: {st} {_error_text(r)}"
            if ok and st >= 400 and not _has_json_error(r):
                ok, detail = False, f"{kind}: {st} without a JSON error body: {r.text[:200]!r}"
            return Outcome(kind, st, time.monotonic() - t0, ok, detail)
        except httpx.HTTPError as e:
            return Outcome(kind, 0, time.monotonic() - t0, False, f"{kind}: transport error {type(e).__name__}: {e}")

    async def hostile(self, c, kind: str, model: str, prompt: str, h: dict) -> tuple[int, httpx.Response]:
        json_h = {**h, "content-type": "application/json"}
        if kind == "garbage_bytes":
            r = await c.post("/v1/completions", content=os.urandom(random.randrange(1, 2000)), headers=json_h)
        elif kind == "bad_json":
            r = await c.post("/v1/chat/completions", content=b'{"model": "base", "messages": [', headers=json_h)
        elif kind == "wrong_types":
            r = await c.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": "8",
                                                      "temperature": "hot"}, headers=h)
        elif kind == "unknown_adapter":
            r = await c.post("/v1/completions", json={"model": "no-such-adapter", "prompt": prompt,
                                                      "max_tokens": 4}, headers=h)
        elif kind == "oversized_max_tokens":
            r = await c.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 10 ** 9},
                             headers=h)
        elif kind == "huge_body":
            r = await c.post("/v1/completions", content=b'{"model": "base", "prompt": "' + b"x" * (9 << 20) + b'"}',
                             headers=json_h)
        elif kind == "no_auth":
            r = await c.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 4})
        else:  # bad_path
            r = await c.post("/v1/nothing-here", json={}, headers=h)
        return r.status_code, r

    async def client(self, i: int) -> None:
        rng = random.Random(f"{self.cfg.seed}/{i}")
        c = None
        first = list(MIX)[i % len(MIX)]  # every kind at least once when there are as many clients as kinds
        while time.monotonic() < self.stop_at:
            if c is None or c.is_closed:
                c = httpx.AsyncClient(base_url=self.t.url, timeout=120)
            out = await self.one(c, rng, first)
            first = None
            self.outcomes.append(out)
            if out.status == 429:
                await asyncio.sleep(rng.uniform(0.2, 1.0))  # Retry-After: 1, with jitter
        if c is not None:
            await c.aclose()

    async def monitor(self) -> None:
        async with httpx.AsyncClient(base_url=self.t.url, timeout=10) as c:
            while time.monotonic() < self.stop_at:
                try:
                    r = await c.get("/health")
                    self.health.append({"t": time.monotonic(), "status": r.status_code, **r.json()})
                except (httpx.HTTPError, ValueError):
                    pass
                await asyncio.sleep(0.25)

    async def run_load(self) -> None:
        self.stop_at = time.monotonic() + self.cfg.duration
        await asyncio.gather(self.monitor(), *(self.client(i) for i in range(self.cfg.clients)))

    async def quiet(self, timeout: float = 15.0) -> tuple[dict, float]:
        """Poll /health until nothing runs, waits or holds an adapter; (last health, seconds it took)."""
        t0 = time.monotonic()
        h: dict = {}
        async with httpx.AsyncClient(base_url=self.t.url, timeout=10) as c:
            while time.monotonic() - t0 < timeout:
                h = (await c.get("/health")).json()
                if not (h.get("active_sequences") or h.get("queued") or h.get("adapters_in_use")):
                    break
                await asyncio.sleep(0.1)
        return h, time.monotonic() - t0

    async def shutdown(self) -> dict:
        """Fill the rows and the queue with long requests, signal the server, classify what each got."""
        cfg, t = self.cfg, self.t
        n = cfg.shutdown_tokens
        sets = self.sets[1:2] or self.sets[:1]  # one adapter: references of this length cost seconds each
        cases = [(m, a, PROMPTS[0]) for m, a in sets]
        await self.references(n, prompts=[PROMPTS[0]], sets=sets)
        signalled = False
        total = cfg.max_batch + max(1, cfg.max_queue // 2)
        kinds = ["completion", "completion_stream", "chat_stream", "generate_stream"]
        results: list[dict] = []

        async def go(i: int) -> None:
            kind = kinds[i % len(kinds)]
            model, adapters, prompt = cases[i % len(cases)]
            async with httpx.AsyncClient(base_url=t.url, timeout=cfg.shutdown_timeout + 60) as c:
                try:
                    while True:  # requests arriving together can outrun prefill and fill the queue: retry
                        st, text, problem = await send_greedy(c, kind, model, adapters, prompt, n, t.headers)
                        if st != 429 or signalled:
                            break
                        await asyncio.sleep(0.05)
                except httpx.HTTPError as e:
                    results.append({"kind": kind, "outcome": "unclean", "detail": f"{type(e).__name__}: {e}"})
                    return
            want = self.refs[self.key(kind.startswith("chat"), model, adapters, prompt, n)]
            if st == 200 and not problem and text == want:
                outcome = "finished"
            elif st == 200 and "error event" in problem and "shutting down" in problem:
                outcome = "cancelled"  # an SSE error event, then [DONE] (OpenAI) / the end (LoRAX)
            elif st == 503 and "shutting down" in problem:
                outcome = "cancelled"
            else:
                outcome = "unclean"
            results.append({"kind": kind, "status": st, "outcome": outcome,
                            "detail": problem or ("" if text == want else f"{text!r} != {want!r}")})

        tasks = [asyncio.create_task(go(i)) for i in range(total)]
        deadline = time.monotonic() + 30
        h: dict = {}
        async with httpx.AsyncClient(base_url=t.url, timeout=10) as c:
            while time.monotonic() < deadline:  # every request admitted or queued: all are in flight
                h = (await c.get("/health")).json()
                if h.get("active_sequences", 0) + h.get("queued", 0) >= total:
                    break
                await asyncio.sleep(0.02)
        sig = signal.SIGTERM if cfg.signal.upper() in ("TERM", "SIGTERM") else signal.SIGINT
        t0 = time.monotonic()
        signalled = True
        os.kill(t.pid, sig)
        await asyncio.wait(tasks, timeout=cfg.shutdown_timeout + 30)
        bound = cfg.shutdown_timeout + cfg.exit_slack
        code = None
        if t.proc is not None:
            try:
                code = await asyncio.to_thread(t.proc.wait, max(0.1, bound - (time.monotonic() - t0)))
            except subprocess.TimeoutExpired:
                t.proc.kill()
                t.proc.wait()
        else:
            while time.monotonic() - t0 < bound and _alive(t.pid):
                await asyncio.sleep(0.1)
            code = 0 if not _alive(t.pid) else None  # not our child: its exit code is unknown; gone counts
        seconds = time.monotonic() - t0
        counts = Counter(r["outcome"] for r in results)
        seen_all = h.get("active_sequences", 0) + h.get("queued", 0) >= total
        return {"signal": sig.name, "in_flight": total, "in_flight_seen": h, "all_in_flight": seen_all,
                "finished": counts["finished"],
                "cancelled": counts["cancelled"], "unclean": counts["unclean"],
                "lost": total - len(results), "exit_code": code, "seconds": round(seconds, 2), "bound_s": bound,
                "problems": [r for r in results if r["outcome"] == "unclean"][:10]}


def _has_json_error(r: httpx.Response) -> bool:
    try:
        return "error" in r.json()
    except ValueError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run(cfg: LoadConfig) -> dict[str, Any]:
    """The whole test; returns the report (``passed`` and ``failures`` say whether it held)."""
    tmp = None
    folder = Path(cfg.workdir) if cfg.workdir else Path(tmp := tempfile.mkdtemp(prefix="qadapt-load-"))
    folder.mkdir(parents=True, exist_ok=True)
    if cfg.url:
        t = Target(cfg.url.rstrip("/"), cfg.api_key, "base", list(cfg.adapters), cfg.pid)
        t.base = httpx.get(t.url + "/v1/models", headers=t.headers, timeout=10).json()["data"][0]["id"]
    else:
        t0 = time.monotonic()
        t = start_server(cfg, folder)
        started = time.monotonic() - t0
    load = Load(cfg, t)
    failures: list[str] = []
    report: dict[str, Any] = {"config": {k: v for k, v in asdict(cfg).items() if k != "api_key"}, "url": t.url}
    if not cfg.url:
        report["startup_s"] = round(started, 1)  # building the tiny model and starting the server
    try:
        if cfg.duration > 0:  # 0: the shutdown phase only
            t0 = time.monotonic()
            asyncio.run(load.references(cfg.max_tokens))
            report["references"] = {"count": len(load.refs), "seconds": round(time.monotonic() - t0, 2)}
            rss0 = rss_bytes(t)
            t0 = time.monotonic()
            asyncio.run(load.run_load())
            wall = time.monotonic() - t0
            health, drain = asyncio.run(load.quiet())
            rss1 = rss_bytes(t)

            outs = load.outcomes
            codes = Counter(o.status for o in outs)
            served = [o for o in outs if o.status == 200]
            greedy_ok = [o for o in outs if o.kind in GREEDY_KINDS and o.status == 200 and o.ok]
            lat = [o.seconds * 1000 for o in outs
                   if o.kind in (*GREEDY_KINDS, "sampled") and o.status == 200 and o.ok]
            bad = [o for o in outs if not o.ok]
            max_q = max((h.get("queued", 0) for h in load.health), default=None)
            max_active = max((h.get("active_sequences", 0) for h in load.health), default=None)
            report.update({
                "requests": len(outs), "seconds": round(wall, 1), "requests_per_s": round(len(outs) / wall, 1),
                "served": len(served), "greedy_checked": len(greedy_ok),
                "codes": {("gave_up" if k == -1 else "transport_error" if k == 0 else str(k)): v
                          for k, v in sorted(codes.items())},
                "by_kind": {k: dict(Counter(str(o.status) for o in outs if o.kind == k)) for k in MIX},
                "latency_ms": {"p50": _r(percentile(lat, 0.5)), "p99": _r(percentile(lat, 0.99)),
                               "max": _r(max(lat, default=None)), "n": len(lat)},
                "queue": {"bound": cfg.max_queue if not cfg.url else None, "max_queued_seen": max_q,
                          "max_active_seen": max_active},
                "after": {"health": health, "drain_s": round(drain, 2)},
                "rss_mib": {"before": _mib(rss0), "after": _mib(rss1),
                            "growth": _mib(rss1 - rss0) if rss0 and rss1 else None},
                "problems": [o.detail for o in bad][:20], "problem_count": len(bad),
            })
            if bad:
                failures.append(f"{len(bad)} responses failed their check (see problems)")
            if any(500 <= k < 600 for k in codes):
                failures.append(f"5xx responses: { {k: v for k, v in codes.items() if k >= 500} }")
            if health.get("active_sequences") or health.get("queued") or health.get("adapters_in_use"):
                failures.append(f"the server did not return to idle: {health}")
            if not cfg.url and max_q is not None and max_q > cfg.max_queue:
                failures.append(f"{max_q} requests queued, above the bound {cfg.max_queue}")
            if not greedy_ok:
                failures.append("no greedy answer was checked")
        if t.pid:
            sd = report["shutdown"] = asyncio.run(load.shutdown())
            if sd["unclean"] or sd["lost"]:
                failures.append(f"shutdown: {sd['unclean']} unclean, {sd['lost']} without an outcome")
            if sd["exit_code"] != 0:
                failures.append(f"shutdown: exit code {sd['exit_code']} (within {sd['bound_s']} s)")
        if t.log is not None and t.proc is not None and t.proc.poll() is not None:
            log = t.log.read_text(errors="replace")
            report["server_log"] = {"tracebacks": log.count("Traceback"), "errors": log.count("\nERROR"),
                                    "path": str(t.log)}
            if "Traceback" in log:
                i = log.index("Traceback")
                failures.append(f"traceback in the server log: {log[i:i + 1500]}")
    finally:
        if t.proc is not None and t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait()
    report["failures"] = failures
    report["passed"] = not failures
    if tmp and report["passed"]:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def _mib(b: int | None) -> float | None:
    return None if b is None else round(b / 2**20, 1)


def summary(rep: dict) -> str:
    lines = [f"{rep.get('requests', 0)} requests in {rep.get('seconds')} s ({rep.get('requests_per_s')}/s); "
             f"served (200) {rep.get('served')}, greedy answers checked {rep.get('greedy_checked')}",
             f"codes: {rep.get('codes')}",
             f"latency of served generations: {rep.get('latency_ms')}",
             f"queue: {rep.get('queue')}; after: {rep.get('after')}",
             f"RSS MiB: {rep.get('rss_mib')}"]
    if "shutdown" in rep:
        sd = rep["shutdown"]
        lines.append(f"shutdown ({sd['signal']}): {sd['in_flight']} in flight -> {sd['finished']} finished, "
                     f"{sd['cancelled']} cancelled (503), {sd['unclean']} unclean; exit {sd['exit_code']} "
                     f"after {sd['seconds']} s")
    lines.append("PASSED" if rep["passed"] else "FAILED:\n  " + "\n  ".join(rep["failures"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    d = LoadConfig()
    ap.add_argument("--clients", type=int, default=d.clients)
    ap.add_argument("--duration", type=float, default=d.duration, help="seconds of load")
    ap.add_argument("--max-tokens", type=int, default=d.max_tokens)
    ap.add_argument("--prompts", type=int, default=d.prompts, help=f"how many of the {len(PROMPTS)} prompts to use")
    ap.add_argument("--max-batch", type=int, default=d.max_batch, help="the started server's --max-batch")
    ap.add_argument("--max-queue", type=int, default=d.max_queue, help="the started server's --max-queue")
    ap.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout)
    ap.add_argument("--shutdown-tokens", type=int, default=d.shutdown_tokens)
    ap.add_argument("--exit-slack", type=float, default=d.exit_slack,
                    help="seconds past --shutdown-timeout the server may take to exit")
    ap.add_argument("--signal", choices=["INT", "TERM"], default=d.signal)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--url", help="target a running server instead of starting one")
    ap.add_argument("--api-key", default=d.api_key)
    ap.add_argument("--adapters", default="", help="with --url: adapter names it serves, comma-separated")
    ap.add_argument("--pid", type=int, help="with --url: the server's pid (RSS, and the shutdown phase)")
    ap.add_argument("--model", help="serve this model file instead of the tiny random one")
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="with --model")
    ap.add_argument("--chat-template", metavar="FILE", help="with --model: the server's --chat-template")
    ap.add_argument("--workdir", help="where the tiny model and the server log go (default: a temp folder)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--out", help="also write the JSON report here (atomically)")
    ap.add_argument("--force", action="store_true", help="overwrite --out")
    a = ap.parse_args(argv)
    cfg = LoadConfig(clients=a.clients, duration=a.duration, max_tokens=a.max_tokens, prompts=a.prompts,
                     max_batch=a.max_batch, max_queue=a.max_queue, shutdown_timeout=a.shutdown_timeout,
                     shutdown_tokens=a.shutdown_tokens, exit_slack=a.exit_slack, signal=a.signal, seed=a.seed,
                     url=a.url, api_key=a.api_key,
                     adapters=[x for x in a.adapters.split(",") if x], pid=a.pid, model=a.model,
                     model_adapters=a.adapter, chat_template=a.chat_template, workdir=a.workdir)
    rep = run(cfg)
    rep["command"] = " ".join(["python", "tools/loadtest.py", *(argv if argv is not None else sys.argv[1:])])
    if a.out:
        from qadapt.io import write_json

        write_json(a.out, rep, force=a.force)
    print(json.dumps(rep, indent=2) if a.json else summary(rep))
    return 0 if rep["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
