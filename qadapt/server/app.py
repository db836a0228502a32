"""The HTTP API: OpenAI-compatible and LoRAX/TGI-compatible endpoints over one engine (Starlette ASGI app).

Thin by design: parse and check a request (:mod:`.schemas`), resolve its adapters (:mod:`.registry`:
named adapters, or a mix built once and cached), hand one request per sequence to the engine thread
(:mod:`.scheduler`) and turn the engine's events into JSON or server-sent events (:mod:`.openai_api`,
:mod:`.lorax_api`). Model work never runs on the event loop; adapter fetching, mixing and grammar
compilation run in worker threads.

Which adapters a request uses: ``model`` names an adapter, or the base (its file stem, ``tgi`` or
``--served-model-name``: the default adapter set, empty unless ``--activate`` or ``POST
/activate_adapters`` set one; ``base``: the bare base always); ``adapters: [...]`` names several (their
sum), ``adapters: {name: weight}`` and llama.cpp's ``lora: [{id, scale}]`` weigh them (an exact weighted
sum), LoRAX's ``merged_adapters`` mixes them with PEFT's strategies. LoRAX's ``adapter_id`` (and, on the
OpenAI endpoints, a ``model`` with ``adapter_source``) is fetched on first use when runtime adapters are
allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..errors import InputError, UnsupportedError
from ..runtime.constrain import Constraint, Grammar, compile_constraint
from ..runtime.sampling import SamplingParams
from .http import ApiKeyMiddleware, Failed, Gone, error_body, read_json, route, rss_bytes
from .registry import BASE_ALIASES, AdapterRegistry, Busy, Forbidden, NotFound, Unavailable
from .scheduler import SHUTTING_DOWN, Engine, Failure, Finish, GenRequest, Metrics, PromptScores, TokenEvent
from .schemas import ActivateRequest, LoadAdapterRequest, UnloadAdapterRequest

log = logging.getLogger(__name__)

TGI_MODEL = "tgi"  # the model name text-generation's chat() always sends: the served model
MAX_BODY_BYTES = 4 << 20  # default request body limit: a 128k-token prompt is ~0.5 MiB of text


class _Job:
    """One submitted generation: the engine's events for it, read on the event loop."""

    def __init__(self, req: GenRequest, queue: asyncio.Queue):
        self.req, self.queue = req, queue
        self.done = False

    def abandon(self) -> None:
        """The response ended early (client gone, task cancelled): the engine drops the row."""
        if not self.done:
            self.req.cancelled = True

    async def events(self) -> AsyncIterator[Any]:
        """Token events, then one Finish or Failure; leaving early (client gone) cancels the request."""
        try:
            while True:
                ev = await self.queue.get()
                if isinstance(ev, (Finish, Failure)):
                    self.done = True
                yield ev
                if self.done:
                    return
        finally:
            if not self.done:
                self.req.cancelled = True

    async def result(self, request: Request) -> "Result":
        """Wait for the end (non-streaming), cancelling the request if the client disconnects meanwhile."""
        tokens: list[TokenEvent] = []
        prompt: PromptScores | None = None
        checked = time.monotonic()
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(self.queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    ev = None
                if time.monotonic() - checked >= 1.0:  # about once a second, however fast tokens come
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        log.info("request %s: client disconnected; cancelling", self.req.id)
                        raise Gone()
                if ev is None:
                    continue
                if isinstance(ev, TokenEvent):
                    tokens.append(ev)
                elif isinstance(ev, PromptScores):
                    prompt = ev
                elif isinstance(ev, Failure):
                    self.done = True
                    raise Failed(ev.status, ev.message)
                else:
                    self.done = True
                    return Result(ev, tokens, prompt)
        finally:
            if not self.done:
                self.req.cancelled = True


@dataclass
class Result:
    """One finished sequence: how it ended, its tokens, and the prompt's scores when asked for."""

    finish: Finish
    tokens: list[TokenEvent]
    prompt: PromptScores | None = None

    @property
    def logprob_sum(self) -> float:
        return sum(t.logprob for t in self.tokens)


@dataclass(frozen=True)
class AdapterChoice:
    """The adapters of a request: ``names`` (their plain sum), or with ``weights`` a mix of them (the exact
    weighted sum ``cat``, or one of PEFT's strategies for LoRAX's ``merged_adapters``)."""

    names: tuple[str, ...] = ()
    weights: tuple[float, ...] | None = None
    strategy: str = "cat"
    density: float = 1.0
    majority_sign: str = "total"
    seed: int = 0

    @property
    def label(self) -> str:
        if self.weights is None:
            return "+".join(self.names)
        return f"{self.strategy}(" + ",".join(f"{n}*{w:g}" for n, w in zip(self.names, self.weights)) + ")"


class Server:
    """The state behind the routes: model, registry, engine, metrics and options."""

    def __init__(self, model: Any, *, base_name: str, api_key: str | None = None, allow_runtime: bool = False,
                 adapter_root: str | None = None, max_batch: int = 8, max_adapters: int = 0, max_rank: int = 0,
                 max_queue: int = 64, max_seq_len: int | None = None, default_adapters: tuple[str, ...] = (),
                 max_body_bytes: int = MAX_BODY_BYTES, max_mixes: int = 8, max_adapter_bytes: int = 0):
        if model.tokenizer is None:
            raise InputError(f"{model.source} has no tokenizer: the server needs one to read prompts")
        if model.merged_adapters:
            raise InputError(f"{model.source} has adapters merged into its weights ({', '.join(model.merged_adapters)}): "
                             "requests choose their adapters per row, and the base would carry them; load it "
                             "without merging")
        if model.xlora:
            raise UnsupportedError("serving an X-LoRA model is not supported yet (the batched engine runs plain "
                                   "LoRA); run it with `qadapt run` or Model.generate")
        self.model = model
        self.base_name = base_name
        self.api_key = api_key
        self.allow_runtime = allow_runtime
        self.max_body_bytes = max_body_bytes
        self.metrics = Metrics()
        self.registry = AdapterRegistry(model, max_adapters=max_adapters, max_rank=max_rank, adapter_root=adapter_root,
                                        default=default_adapters, max_mixes=max_mixes, max_bytes=max_adapter_bytes)
        ctx = model.config.context_length
        self.max_seq_len = min(max_seq_len or ctx, ctx)
        self.engine = Engine(model, self.registry, max_batch=max_batch, max_queue=max_queue,
                             max_seq_len=self.max_seq_len, metrics=self.metrics)
        self.created = int(time.time())

    # ------------------------------------------------------------------ helpers
    def names_for(self, model: str, adapters: list[str] | None = None) -> tuple[str, ...]:
        """Public adapter names a request's ``model`` (and ``adapters``) select; NotFound for unknown models."""
        if not self.is_served(model):
            served = ", ".join([self.base_name, *BASE_ALIASES, *self.registry.names()])
            raise NotFound(f"model `{model}` does not exist (served: {served})")
        if adapters is not None:
            return tuple(dict.fromkeys(adapters))
        if model in BASE_ALIASES:
            return ()
        if model in (self.base_name, TGI_MODEL):
            return self.registry.default
        return (model,)

    def is_served(self, model: str) -> bool:
        return model in BASE_ALIASES or model in (self.base_name, TGI_MODEL) or self.registry.is_known(model)

    async def just_in_time(self, adapter_id: str, source: str | None, api_token: str | None = None) -> None:
        """LoRAX's first-use loading of ``adapter_id`` (when runtime adapters are allowed)."""
        if self.is_served(adapter_id):
            return
        if not self.allow_runtime:
            raise NotFound(f"adapter `{adapter_id}` is not loaded (start the server with --allow-runtime-adapters "
                           "to load adapters on first use)")
        await asyncio.to_thread(self.registry.ensure, adapter_id, adapter_id, source or "hub", api_token)

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return self.model._fits_vocab(list(prompt), "the prompt")
        ids = self.model.encode(prompt)
        if not ids:
            raise InputError("the prompt is empty (no tokens)")
        return ids

    def params(self, n_prompt: int, max_tokens: int | None, explicit: bool, **fields: Any) -> SamplingParams:
        """Sampling parameters for a prompt of ``n_prompt`` tokens: ``max_tokens`` None means up to the
        context; an ``explicit`` limit past it is refused, a default one is cut to fit."""
        room = self.max_seq_len - n_prompt
        if room <= 0:
            raise InputError(f"the prompt has {n_prompt} tokens; the context holds {self.max_seq_len} "
                             "(prompt and completion together)")
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            if explicit:
                raise InputError(f"max_tokens {max_tokens} plus the prompt's {n_prompt} tokens exceed the context of "
                                 f"{self.max_seq_len} tokens (at most {room} new tokens for this prompt)")
            max_tokens = room
        vocab = self.model.config.vocab_size
        for tok, _ in fields.get("logit_bias", ()):
            if not 0 <= tok < vocab:
                raise InputError(f"logit_bias names token {tok}, outside the vocabulary of {vocab}")
        return SamplingParams(max_new_tokens=max_tokens, **fields).validate()

    async def grammar(self, constraint: Constraint | None) -> Grammar | None:
        """``constraint`` compiled for this model's tokenizer (cached; compiled in a worker thread)."""
        if constraint is None:
            return None
        return await asyncio.to_thread(compile_constraint, self.model.tokenizer, constraint,
                                       self.model.config.vocab_size)

    def begin_shutdown(self, grace: float) -> None:
        """Stop taking work; running requests get ``grace`` seconds to finish (see Engine.drain)."""
        self.engine.drain(grace)

    async def body(self, request: Request) -> Any:
        """The request's JSON body, refused (413) past ``max_body_bytes`` before it is all read."""
        return await read_json(request, self.max_body_bytes)

    def admit(self, n: int = 1) -> None:
        """Refuse a generation request before reading it when it could not be queued (503 draining, 429 full):
        under overload, a refusal must cost far less than the work it protects."""
        if self.engine.draining:
            raise Unavailable(f"{SHUTTING_DOWN}; not taking new requests")
        if self.engine.queued + n > self.engine.max_queue:
            raise Busy(f"the request queue is full ({self.engine.max_queue} waiting, --max-queue); retry later")

    def _acquire(self, choice: AdapterChoice) -> tuple[str, ...]:
        if choice.weights is None:
            return self.registry.acquire(choice.names)
        return self.registry.acquire_mix(choice.names, choice.weights, choice.strategy, choice.density,
                                         choice.majority_sign, choice.seed)

    async def submit(self, ids: list[int], params: SamplingParams | list[SamplingParams],
                     adapters: AdapterChoice | tuple[str, ...], score_prompt: int | None = None) -> list[_Job]:
        """One engine request per sampling parameters (``n`` sequences of one prompt), each holding its
        adapters until it ends."""
        plist = params if isinstance(params, list) else [params]
        choice = adapters if isinstance(adapters, AdapterChoice) else AdapterChoice(tuple(adapters))
        self.admit(len(plist))  # again: the queue may have filled while this request was read and tokenized
        loop = asyncio.get_running_loop()
        jobs: list[_Job] = []
        try:
            for p in plist:
                keys = await asyncio.to_thread(self._acquire, choice)
                queue: asyncio.Queue = asyncio.Queue()

                def emit(ev: Any, queue=queue) -> None:
                    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
                        loop.call_soon_threadsafe(queue.put_nowait, ev)

                req = GenRequest(ids, p, choice.names, keys, emit, score_prompt=score_prompt,
                                 mix="" if choice.weights is None else choice.label)
                try:
                    self.engine.submit(req)
                except BaseException:
                    self.registry.release(keys)
                    raise
                jobs.append(_Job(req, queue))
        except BaseException:
            for j in jobs:
                j.abandon()
            raise
        return jobs

    def require_runtime(self) -> None:
        if not self.allow_runtime:
            raise Forbidden("runtime adapter management is off; start the server with --allow-runtime-adapters")

    # ------------------------------------------------------------------ management
    async def load_adapter(self, request: Request) -> Response:
        self.require_runtime()
        body = LoadAdapterRequest.parse(await self.body(request))
        entry = await asyncio.to_thread(self.registry.load, body.lora_name, body.lora_path, body.adapter_source,
                                        replace=body.load_inplace)
        return JSONResponse({"status": "ok", "lora_name": entry.name, "version": entry.key, "rank": entry.rank,
                             "message": f"Success: LoRA adapter '{entry.name}' added successfully."})

    async def unload_adapter(self, request: Request) -> Response:
        self.require_runtime()
        body = UnloadAdapterRequest.parse(await self.body(request))
        self.registry.unload(body.lora_name)
        return JSONResponse({"status": "ok", "lora_name": body.lora_name,
                             "message": f"Success: LoRA adapter '{body.lora_name}' removed successfully."})

    async def list_adapters(self, request: Request) -> Response:
        self.require_runtime()
        return JSONResponse({"adapters": self.registry.describe(), "default": list(self.registry.default),
                             "retired_in_use": self.registry.retired_in_use(),
                             "max_adapters": self.registry.max_adapters, "max_rank": self.registry.max_rank})

    async def lora_ids(self, request: Request) -> Response:
        """llama.cpp's ``GET /lora-adapters``: the ids a request's ``lora: [{id, scale}]`` names (scale 0: not
        applied unless a request asks)."""
        return JSONResponse([{"id": i, "path": a["source"], "name": a["name"], "scale": 0.0}
                             for i, a in enumerate(self.registry.describe())])

    async def activate(self, request: Request) -> Response:
        self.require_runtime()
        body = ActivateRequest.parse(await self.body(request))
        self.registry.set_default(tuple(body.adapter_names))
        return JSONResponse({"status": "ok", "adapter_names": list(self.registry.default)})

    # ------------------------------------------------------------------ operations
    async def health(self, request: Request) -> Response:
        """Liveness and load, open without the API key: 200 while serving, 503 when stopped or draining."""
        counts = {"active_sequences": self.engine.running, "queued": self.engine.queued,
                  "adapters_in_use": self.registry.in_use()}
        if not self.engine.alive:
            return JSONResponse({"status": "engine stopped", **counts}, status_code=503)
        if self.engine.draining:
            return JSONResponse({"status": "shutting down", **counts}, status_code=503)
        return JSONResponse({"status": "ok", **counts})

    async def metrics_text(self, request: Request) -> Response:
        extra = [
            ("qadapt_queue_length", "gauge", "Requests waiting for a batch row.", self.engine.queued),
            ("qadapt_running_requests", "gauge", "Requests being generated.", self.engine.running),
            ("qadapt_resident_adapters", "gauge", "Adapter versions loaded in the model.", self.registry.resident()),
            ("qadapt_known_adapters", "gauge", "Public adapter names (resident or evicted).",
             len(self.registry.names())),
            ("qadapt_adapter_loads_total", "counter", "Adapters loaded at run time.", self.registry.loads),
            ("qadapt_adapter_evictions_total", "counter", "Adapters evicted (least recently used).",
             self.registry.evictions),
            ("qadapt_resident_adapter_bytes", "gauge", "Memory of the resident adapter versions.",
             self.registry.resident_bytes()),
            ("qadapt_adapter_refs", "gauge", "Adapter references held by queued and running requests.",
             self.registry.in_use()),
        ]
        running, waiting = self.engine.adapter_load()
        gauge = {"running_lora_adapters": ",".join(running), "waiting_lora_adapters": ",".join(waiting),
                 "max_lora": str(self.registry.max_adapters or len(self.registry.names()))}
        labelled = [("vllm:lora_requests_info", "gauge", "Adapters of running and waiting requests (vLLM's "
                     "gauge, read by adapter-affinity routers); the value is when it was taken.", gauge, time.time()),
                    ("qadapt_adapter_mixes", "gauge", "Adapter mixes cached.", {}, self.registry.mixes())]
        rss = rss_bytes()
        if rss is not None:
            extra.append(("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", rss))
        return PlainTextResponse(self.metrics.render(extra, labelled), media_type="text/plain; version=0.0.4")


def create_app(model: Any, *, base_name: str, **options: Any) -> Starlette:
    """The ASGI app serving ``model`` (options: see :class:`Server`); the engine runs while the app does."""
    server = Server(model, base_name=base_name, **options)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        log.info("serving %s (%s) with %d adapter(s); max batch %d, context %d", base_name, model.source,
                 len(server.registry.names()), server.engine.stepper.rows, server.max_seq_len)
        try:
            yield
        finally:
            server.engine.stop()

    from .lorax_api import LoraxRoutes
    from .openai_api import OpenAIRoutes

    s, oa, lx = server, OpenAIRoutes(server), LoraxRoutes(server)
    routes = [
        Route("/health", s.health, methods=["GET"]),
        Route("/metrics", route(s, s.metrics_text), methods=["GET"]),
        Route("/v1/models", route(s, oa.models), methods=["GET"]),
        Route("/v1/completions", route(s, oa.completions), methods=["POST"]),
        Route("/v1/chat/completions", route(s, oa.chat), methods=["POST"]),
        Route("/", route(s, lx.compat, lorax=True), methods=["POST"]),
        Route("/generate", route(s, lx.generate, lorax=True), methods=["POST"]),
        Route("/generate_stream", route(s, lx.generate_stream, lorax=True), methods=["POST"]),
        Route("/info", route(s, lx.info, lorax=True), methods=["GET"]),
        Route("/lora-adapters", route(s, s.lora_ids), methods=["GET"]),
        Route("/v1/load_lora_adapter", route(s, s.load_adapter), methods=["POST"]),
        Route("/v1/unload_lora_adapter", route(s, s.unload_adapter), methods=["POST"]),
        Route("/v1/lora_adapters", route(s, s.list_adapters), methods=["GET"]),
        Route("/activate_adapters", route(s, s.activate), methods=["POST"]),
    ]

    async def http_error(request: Request, exc: HTTPException) -> Response:
        s.metrics.http_errors[exc.status_code] += 1
        return JSONResponse(error_body(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}"),
                            status_code=exc.status_code)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, "internal error; see the server log"), status_code=500)

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.server = server
    if server.api_key:
        app.add_middleware(ApiKeyMiddleware, key=server.api_key, metrics=server.metrics)
    return app
