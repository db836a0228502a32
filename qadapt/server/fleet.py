"""``qadapt serve --replicas N``: qadapt engines as Ray Serve replicas, routed by adapter affinity.

Two deployments. ``Engine`` replicas each hold the model and run the single-process server's own app
(:func:`qadapt.server.app.create_app`) in process, so every endpoint, parameter and error is exactly
the single server's, and each replica keeps batching requests for different adapters together (no
``@serve.batch``, which would split batches per model id). The ``Ingress`` (Ray's HTTP proxy calls it)
reads a request's adapter-affinity key (:mod:`.routing`) and forwards it through a handle with that
key as Ray's multiplexed model id: Ray sends it to a replica that holds the key (or is loading it),
and otherwise to the replica holding the fewest keys, which loads the adapters in its
``@serve.multiplexed`` loader. Ray unloads a replica's least recently used keys past
``--max-adapters`` keys; the replica's own registry also evicts by count and by bytes
(``--max-adapter-bytes``), so memory stays bounded whatever Ray believes a replica holds (a stale
belief costs one reload there, never a wrong answer).

A replica that dies is replaced by Ray; requests it held end with 503 (a JSON error, or an SSE error
event in a stream that had begun), never a hang. Runtime adapter management (``/v1/load_lora_adapter``
and friends) would change one replica only, so the fleet refuses it by name (501): adapters are given
at start, or loaded on first use from ``adapter_id`` + ``adapter_source`` where runtime adapters are
allowed.

``GET /fleet`` (JSON) and ``/metrics`` (appended to one replica's metrics) report per replica: requests,
the requests whose adapters it already held (affinity hits), adapter loads and its process id.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from .http import error_body, key_ok, sse
from .routing import LORAX_PATHS, key_names, routing_key

log = logging.getLogger(__name__)

MANAGEMENT = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/lora_adapters", "/activate_adapters")
REPLICA_HEADERS = ("x-qadapt-replica", "x-qadapt-pid", "x-qadapt-loads", "x-qadapt-hit")


@dataclass
class FleetConfig:
    """What every replica needs to build its engine: the model, its load options, the adapters given at
    start (``name`` -> local folder, resolved once by the launcher) and the server options."""

    model: str
    load_opts: dict[str, Any]
    adapters: dict[str, str]
    server_opts: dict[str, Any]
    base_name: str
    replicas: int = 2
    replica_cpus: float = 1.0
    threads: int = 1
    max_keys: int = 32  # Ray's multiplexed keys per replica
    max_body_bytes: int = 4 << 20
    listed: list[str] = field(default_factory=list)  # GET /lora-adapters order (the adapters given at start)
    default: tuple[str, ...] = ()  # --activate: the base name's adapter set


async def call_app(app: Any, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                   body: bytes) -> AsyncIterator[Any]:
    """Run one HTTP request through an ASGI ``app`` in process: yields ``(status, headers)`` and then the
    body's chunks as they are sent (a stream stays a stream)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query, "headers": headers,
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0), "root_path": ""}
    out: asyncio.Queue = asyncio.Queue()
    done = asyncio.Event()
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()  # the response ended (or the caller left): tell the app the client is gone
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await out.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await out.put(None)

    task = asyncio.create_task(run())
    try:
        while True:
            msg = await out.get()
            if msg is None:
                break
            if msg["type"] == "http.response.start":
                yield msg["status"], [(k.decode(), v.decode()) for k, v in msg.get("headers", [])]
            elif msg["type"] == "http.response.body":
                if msg.get("body"):
                    yield msg["body"]
                if not msg.get("more_body"):
                    break
    finally:
        done.set()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class EngineReplica:
    """One engine: the model and the single-process server's app, run in process."""

    def __init__(self, cfg: FleetConfig):
        import torch

        from ..cli.run import load_from_options
        from .app import create_app

        torch.set_num_threads(cfg.threads)
        model = load_from_options(cfg.model, **cfg.load_opts)
        self.app = create_app(model, base_name=cfg.base_name, **cfg.server_opts)
        self.server = self.app.state.server
        for name, folder in cfg.adapters.items():
            self.server.registry.remember(name, folder)
        self.server.registry.set_default(cfg.default)
        self.server.engine.start()

        async def hold(key: str) -> _Held:  # Ray's per-replica LRU cache of affinity keys (its loader)
            loaded = await asyncio.to_thread(self.server.registry.warm, key_names(key))
            return _Held(key, loaded)

        self._hold = serve.multiplexed(max_num_models_per_replica=cfg.max_keys)(hold)
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_id.unique_id if ctx is not None else "local"
        self.pid = os.getpid()
        log.info("replica %s (pid %d) serving %s", self.replica, self.pid, cfg.model)

    async def handle(self, req: dict[str, Any]) -> AsyncIterator[Any]:
        key = serve.get_multiplexed_model_id()
        before = self.server.registry.loads
        if key:
            try:
                await self._hold(key)
            except Exception as e:  # an unknown or broken adapter: the app's own route answers it
                log.info("affinity load of %s failed (%s); the request's route reports it", key, e)
        hit = "1" if key and self.server.registry.loads == before else "0"
        first = True
        async for part in call_app(self.app, req["method"], req["path"], req["query"], req["headers"], req["body"]):
            if first:
                status, headers = part
                headers += [("x-qadapt-replica", self.replica), ("x-qadapt-pid", str(self.pid)),
                            ("x-qadapt-loads", str(self.server.registry.loads)), ("x-qadapt-hit", hit)]
                part, first = (status, headers), False
            yield part

    def __del__(self):  # Ray calls it when the replica stops
        server = getattr(self, "server", None)
        if server is not None:
            server.engine.stop()


@dataclass
class _Held:
    key: str
    loaded: int


@dataclass
class _ReplicaStats:
    pid: int = 0
    requests: int = 0
    hits: int = 0
    keyed: int = 0
    loads: int = 0
    keys: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class Ingress:
    """Ray's HTTP proxy calls this for every request: route by affinity key, relay the replica's answer."""

    def __init__(self, engine: Any, cfg: FleetConfig):
        self.engine, self.cfg = engine, cfg
        self.base = {cfg.base_name, "tgi"}
        self.stats: dict[str, _ReplicaStats] = defaultdict(_ReplicaStats)
        self.failed = 0
        self.lock = threading.Lock()

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        lorax = path in LORAX_PATHS
        if path in MANAGEMENT:
            return self._error(501, f"{path} is not available with --replicas: it would change one replica only; "
                                    "give adapters at start, or load them on first use with adapter_id and "
                                    "adapter_source (--allow-runtime-adapters)", lorax)
        if path == "/fleet":  # the replicas check the key on every other path
            key = self.cfg.server_opts.get("api_key")
            if key and not key_ok(dict(request.headers.raw), key.encode()):
                return self._error(401, "missing or wrong API key (send Authorization: Bearer KEY)", False)
            return JSONResponse(self.report())
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.cfg.max_body_bytes:
                return self._error(413, f"the request body is over {self.cfg.max_body_bytes} bytes "
                                        "(--max-body-bytes)", lorax)
        key = routing_key(path, body, base_names=self.base, listed=self.cfg.listed)
        req = {"method": request.method, "path": path, "query": request.url.query.encode(),
               "headers": [(k.encode(), v.encode()) for k, v in request.headers.items()], "body": body}
        gen = self.engine.options(stream=True, multiplexed_model_id=key).handle.remote(req)
        try:
            status, headers = await gen.__anext__()
        except BackPressureError:
            return self._error(429, "every replica's queue is full (--max-queue per replica); retry later", lorax)
        except (RayError, StopAsyncIteration) as e:
            return self._lost(e, lorax)
        self._record(dict(headers), key)
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        if path == "/metrics" and status == 200:
            text = b"".join([bytes(c) async for c in gen]).decode()
            return PlainTextResponse(text + self.metrics_text(), status_code=status,
                                     headers={k: v for k, v in headers if k.lower() != "content-type"})
        if dict((k.lower(), v) for k, v in headers).get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(self._relay(gen, lorax), status_code=status, headers=dict(headers))
        chunks = []
        try:
            async for c in gen:
                chunks.append(bytes(c))
        except RayError as e:
            return self._lost(e, lorax)
        return Response(b"".join(chunks), status_code=status, headers=dict(headers))

    async def _relay(self, gen: Any, lorax: bool) -> AsyncIterator[bytes]:
        try:
            async for c in gen:
                yield bytes(c)
        except RayError as e:
            self._count_failure(e)
            yield sse(error_body(503, _LOST, lorax)).encode()
            if not lorax:
                yield b"data: [DONE]\n\n"

    def _lost(self, e: BaseException, lorax: bool) -> Response:
        self._count_failure(e)
        return self._error(503, _LOST, lorax)

    def _count_failure(self, e: BaseException) -> None:
        with self.lock:
            self.failed += 1
        log.warning("a replica failed during a request (%s: %s)", type(e).__name__, str(e).splitlines()[0][:200])

    @staticmethod
    def _error(status: int, message: str, lorax: bool) -> Response:
        headers = {"Retry-After": "1"} if status in (429, 503) else None
        return JSONResponse(error_body(status, message, lorax), status_code=status, headers=headers)

    def _record(self, headers: dict[str, str], key: str) -> None:
        replica = headers.get("x-qadapt-replica")
        if replica is None:
            return
        with self.lock:
            st = self.stats[replica]
            st.pid = int(headers.get("x-qadapt-pid", 0))
            st.loads = int(headers.get("x-qadapt-loads", 0))
            st.requests += 1
            if key:
                st.keyed += 1
                st.hits += headers.get("x-qadapt-hit") == "1"
                st.keys[key] += 1

    def report(self) -> dict[str, Any]:
        with self.lock:
            reps = {r: {"pid": s.pid, "requests": s.requests, "adapter_requests": s.keyed, "affinity_hits": s.hits,
                        "adapter_loads": s.loads, "keys": dict(s.keys)} for r, s in self.stats.items()}
            return {"replicas": reps, "replica_failures": self.failed, "time": time.time()}

    def metrics_text(self) -> str:
        rep = self.report()
        lines = ["# HELP qadapt_fleet_requests_total Requests relayed to each replica.",
                 "# TYPE qadapt_fleet_requests_total counter"]
        for r, s in rep["replicas"].items():
            lines.append(f'qadapt_fleet_requests_total{{replica="{r}"}} {s["requests"]}')
        lines += ["# HELP qadapt_fleet_affinity_hits_total Adapter requests a replica served with its adapters "
                  "already resident.", "# TYPE qadapt_fleet_affinity_hits_total counter"]
        for r, s in rep["replicas"].items():
            lines.append(f'qadapt_fleet_affinity_hits_total{{replica="{r}"}} {s["affinity_hits"]}')
        lines += ["# HELP qadapt_fleet_adapter_loads_total Adapter loads of each replica (as it last reported).",
                  "# TYPE qadapt_fleet_adapter_loads_total counter"]
        for r, s in rep["replicas"].items():
            lines.append(f'qadapt_fleet_adapter_loads_total{{replica="{r}"}} {s["adapter_loads"]}')
        lines += ["# HELP qadapt_fleet_replica_failures_total Requests answered 503 because their replica died.",
                  "# TYPE qadapt_fleet_replica_failures_total counter",
                  f"qadapt_fleet_replica_failures_total {rep['replica_failures']}"]
        return "\n".join(lines) + "\n"


_LOST = "the replica serving this request stopped (Ray replaces it); retry the request"


def build_app(cfg: FleetConfig) -> Any:
    """The Ray Serve application: ``cfg.replicas`` engines behind one ingress."""
    engine_cls = serve.deployment(EngineReplica, name="Engine", num_replicas=cfg.replicas,
                                  ray_actor_options={"num_cpus": cfg.replica_cpus},
                                  # a replica with a full batch and a full batch waiting is passed over:
                                  # Ray then routes the adapter to another replica (tools/fleet_sim.py:
                                  # affinity-spill), and past --max-queue per replica callers get 429
                                  max_ongoing_requests=2 * cfg.server_opts.get("max_batch", 8),
                                  max_queued_requests=cfg.replicas * cfg.server_opts.get("max_queue", 64),
                                  health_check_period_s=2, health_check_timeout_s=30)
    ingress_cls = serve.deployment(Ingress, name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0},
                                   max_ongoing_requests=4096)
    return ingress_cls.bind(engine_cls.bind(cfg), cfg)


#: app_builder's arguments: name -> (type, default); server options as `qadapt serve` names them
_BUILDER_ARGS = {"model": (str, None), "adapters": (str, ""), "replicas": (int, 2), "replica_cpus": (float, 1.0),
                 "served_model_name": (str, None), "mode": (str, "inplace"), "kernels": (str, None),
                 "device": (str, None),
                 "api_key": (str, None), "max_batch": (int, 8), "max_queue": (int, 64), "max_adapters": (int, 32),
                 "max_adapter_bytes": (int, 0), "max_rank": (int, 256), "max_seq_len": (int, 4096),
                 "max_body_bytes": (int, 4 << 20), "allow_runtime_adapters": (bool, False),
                 "adapter_root": (str, None)}


def app_builder(args: dict[str, Any]) -> Any:
    """Ray Serve's application builder, for ``serve run`` and KubeRay's RayService (``serveConfigV2``)::

        serve run qadapt.server.fleet:app_builder model=/models/m.gguf replicas=4 adapters=math=/loras/math

    ``adapters``: ``NAME=SOURCE`` pairs separated by commas (or a mapping); the other keys are
    ``qadapt serve``'s options (see ``_BUILDER_ARGS``). Unknown keys are refused by name."""
    from pathlib import Path

    from ..adapters.sources import resolve_adapter, split_source
    from ..errors import InputError

    unknown = sorted(set(args) - set(_BUILDER_ARGS))
    if unknown:
        raise InputError(f"qadapt fleet: unknown argument(s) {', '.join(unknown)} (known: {', '.join(_BUILDER_ARGS)})")
    if not args.get("model"):
        raise InputError("qadapt fleet: `model` is required (a GGUF file, folder or Hub id every node can reach)")
    v: dict[str, Any] = {}
    for k, (kind, default) in _BUILDER_ARGS.items():
        x = args.get(k, default)
        try:
            v[k] = x if x is None or isinstance(x, dict) else (
                str(x).lower() in ("1", "true", "yes") if kind is bool else kind(x))
        except ValueError:
            raise InputError(f"qadapt fleet: `{k}` must be {kind.__name__}, not {x!r}") from None
    pairs = v["adapters"] if isinstance(v["adapters"], dict) else dict(
        split_source(p) for p in str(v["adapters"]).split(",") if p)
    folders = {n: str(resolve_adapter(str(src), None)) for n, src in pairs.items()}
    server_opts = {"api_key": v["api_key"], "allow_runtime": v["allow_runtime_adapters"],
                   "adapter_root": v["adapter_root"], "max_batch": v["max_batch"], "max_queue": v["max_queue"],
                   "max_adapters": v["max_adapters"], "max_rank": v["max_rank"], "max_seq_len": v["max_seq_len"],
                   "max_body_bytes": v["max_body_bytes"], "max_adapter_bytes": v["max_adapter_bytes"],
                   "default_adapters": ()}
    cfg = FleetConfig(model=v["model"], load_opts={"mode": v["mode"], "dtype": None, "gguf_file": None,
                                                   "revision": None, "kernels": v["kernels"], "device": v["device"]},
                      adapters=folders, server_opts=server_opts,
                      base_name=v["served_model_name"] or Path(v["model"]).stem, replicas=v["replicas"],
                      replica_cpus=v["replica_cpus"], threads=max(1, int(v["replica_cpus"])),
                      max_keys=v["max_adapters"] or 1024, max_body_bytes=v["max_body_bytes"], listed=list(folders))
    return build_app(cfg)


def run_fleet(cfg: FleetConfig, *, host: str, port: int, ray_address: str | None, object_store_bytes: int) -> None:
    """Start (or join) a Ray cluster, run the fleet on it until SIGINT/SIGTERM, then take it down."""
    import signal

    import ray

    # the replicas run with this process's qadapt settings ($QADAPT_KERNELS, $QADAPT_CACHE, ...)
    runtime_env = {"env_vars": {k: v for k, v in os.environ.items() if k.startswith("QADAPT_")}}
    if ray_address:
        ray.init(address=ray_address, namespace="qadapt", log_to_driver=False, runtime_env=runtime_env)
    else:
        cpus = max(os.cpu_count() or 1, int(cfg.replicas * cfg.replica_cpus) + 1)
        # Ray's own services listen on this node's address (Ray 2.60 resolves 127.0.0.1 to it); the HTTP
        # endpoint listens on --host only (loopback by default)
        ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=object_store_bytes,
                 namespace="qadapt", log_to_driver=False, runtime_env=runtime_env)
    try:
        serve.start(http_options={"host": host, "port": port}, detached=False)
        serve.run(build_app(cfg), name="qadapt", route_prefix="/", blocking=False)
        log.info("fleet of %d replicas serving %s on http://%s:%d", cfg.replicas, cfg.model, host, port)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(0.5):
            pass
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
