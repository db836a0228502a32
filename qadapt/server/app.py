"""The HTTP API: OpenAI-compatible and LoRAX-compatible endpoints over one engine (Starlette ASGI app).

Thin by design: parse and check a request (:mod:`.schemas`), resolve its
adapters (:mod:`.registry`), hand it to the engine thread (:mod:`.scheduler`) and
turn the engine's events into JSON or server-sent events. Model work never runs
on the event loop; adapter fetching and loading run in worker threads.

Which adapters a request uses: ``model`` names an adapter, or the base (its file
stem, or ``--served-model-name``: the default adapter set, empty unless
``--activate`` or ``POST /activate_adapters`` set one; ``base``: the bare base
always); an ``adapters: [...]`` field names several. LoRAX's ``/generate`` uses
``parameters.adapter_id`` (+ ``adapter_source``), fetched on first use when
runtime adapters are allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import os
import time
import uuid
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..adapters.sources import EndpointUnreachableError
from ..errors import InputError, QadaptError, SourceError, UnsupportedError
from ..runtime.generate import SamplingParams
from .registry import BASE_ALIASES, AdapterRegistry, Busy, Forbidden, NotFound, Unavailable
from .scheduler import SHUTTING_DOWN, Engine, Failure, Finish, GenRequest, Metrics, TokenEvent
from .schemas import (ActivateRequest, ChatRequest, CompletionRequest, GenerateRequest, LoadAdapterRequest,
                      UnloadAdapterRequest)

log = logging.getLogger(__name__)

_LORAX_REASONS = {"length": "length", "eos": "eos_token", "stop_sequence": "stop_sequence", "cancelled": "length"}
MAX_BODY_BYTES = 4 << 20  # default request body limit: a 128k-token prompt is ~0.5 MiB of text


class TooLarge(QadaptError):
    """A request body above the server's limit (HTTP 413)."""


class _Failed(Exception):
    """The engine failed a request (its status and message)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


#: error class -> HTTP status, most specific first; anything else is a bug (500)
_STATUS = ((NotFound, 404), (Forbidden, 403), (Busy, 429), (Unavailable, 503), (TooLarge, 413),
           (EndpointUnreachableError, 502), (SourceError, 404), (QadaptError, 400))


def status_of(e: BaseException) -> int:
    if isinstance(e, _Failed):
        return e.status
    return next((status for cls, status in _STATUS if isinstance(e, cls)), 500)


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error", 502: "upstream_error",
          503: "unavailable_error"}


def error_body(status: int, message: str, lorax: bool = False) -> dict[str, Any]:
    kind = _TYPES.get(status, "internal_error")
    if lorax:
        return {"error": message, "error_type": kind}
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Gone(Exception):
    """The client of a non-streamed request disconnected."""


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

    async def result(self, request: Request) -> tuple[Finish, list[TokenEvent]]:
        """Wait for the end (non-streaming), cancelling the request if the client disconnects meanwhile."""
        tokens: list[TokenEvent] = []
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
                        raise _Gone()
                if ev is None:
                    continue
                if isinstance(ev, TokenEvent):
                    tokens.append(ev)
                elif isinstance(ev, Failure):
                    self.done = True
                    raise _Failed(ev.status, ev.message)
                else:
                    self.done = True
                    return ev, tokens
        finally:
            if not self.done:
                self.req.cancelled = True


class Server:
    """The state behind the routes: model, registry, engine, metrics and options."""

    def __init__(self, model: Any, *, base_name: str, api_key: str | None = None, allow_runtime: bool = False,
                 adapter_root: str | None = None, max_batch: int = 8, max_adapters: int = 0, max_rank: int = 0,
                 max_queue: int = 64, max_seq_len: int | None = None, default_adapters: tuple[str, ...] = (),
                 max_body_bytes: int = MAX_BODY_BYTES):
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
                                        default=default_adapters)
        ctx = model.config.context_length
        self.max_seq_len = min(max_seq_len or ctx, ctx)
        self.engine = Engine(model, self.registry, max_batch=max_batch, max_queue=max_queue,
                             max_seq_len=self.max_seq_len, metrics=self.metrics)
        self.created = int(time.time())

    # ------------------------------------------------------------------ helpers
    def names_for(self, model: str, adapters: list[str] | None = None) -> tuple[str, ...]:
        """Public adapter names a request's ``model`` (and ``adapters``) select; NotFound for unknown models."""
        if model not in BASE_ALIASES and model != self.base_name and not self.registry.is_known(model):
            served = ", ".join([self.base_name, *BASE_ALIASES, *self.registry.names()])
            raise NotFound(f"model `{model}` does not exist (served: {served})")
        if adapters is not None:
            return tuple(dict.fromkeys(adapters))
        if model in BASE_ALIASES:
            return ()
        if model == self.base_name:
            return self.registry.default
        return (model,)

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return self.model._fits_vocab(list(prompt), "the prompt")
        ids = self.model.encode(prompt)
        if not ids:
            raise InputError("the prompt is empty (no tokens)")
        return ids

    def params(self, n_prompt: int, max_tokens: int | None, explicit: bool, *, temperature: float, top_p: float,
               top_k: int, repetition_penalty: float, seed: int | None, stop: tuple[str, ...]) -> SamplingParams:
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
        return SamplingParams(max_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop).validate()

    def begin_shutdown(self, grace: float) -> None:
        """Stop taking work; running requests get ``grace`` seconds to finish (see Engine.drain)."""
        self.engine.drain(grace)

    async def body(self, request: Request) -> Any:
        """The request's JSON body, refused (413) past ``max_body_bytes`` before it is all read."""
        return await _json(request, self.max_body_bytes)

    def admit(self) -> None:
        """Refuse a generation request before reading it when it could not be queued (503 draining, 429 full):
        under overload, a refusal must cost far less than the work it protects."""
        if self.engine.draining:
            raise Unavailable(f"{SHUTTING_DOWN}; not taking new requests")
        if self.engine.queued >= self.engine.max_queue:
            raise Busy(f"the request queue is full ({self.engine.max_queue} waiting, --max-queue); retry later")

    async def submit(self, ids: list[int], params: SamplingParams, names: tuple[str, ...]) -> _Job:
        self.admit()  # again: the queue may have filled while this request was read and tokenized
        keys = await asyncio.to_thread(self.registry.acquire, names)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(ev: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(queue.put_nowait, ev)

        req = GenRequest(ids, params, names, keys, emit)
        try:
            self.engine.submit(req)
        except BaseException:
            self.registry.release(keys)
            raise
        return _Job(req, queue)

    def require_runtime(self) -> None:
        if not self.allow_runtime:
            raise Forbidden("runtime adapter management is off; start the server with --allow-runtime-adapters")

    # ------------------------------------------------------------------ OpenAI
    async def completions(self, request: Request) -> Response:
        self.admit()
        body = CompletionRequest.parse(await self.body(request))
        ids = await asyncio.to_thread(self.encode, body.prompt_value())  # a long prompt must not stall the loop
        return await self._openai(request, body, ids, chat=False)

    async def chat(self, request: Request) -> Response:
        self.admit()
        body = ChatRequest.parse(await self.body(request))
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]

        def encode() -> list[int]:
            return self.model.encode_chat(messages)

        return await self._openai(request, body, await asyncio.to_thread(encode), chat=True)

    async def _openai(self, request: Request, body, ids: list[int], chat: bool) -> Response:
        names = self.names_for(body.model, body.adapters)
        params = self.params(len(ids), body.max_tokens, "max_tokens" in body.model_fields_set
                             or "max_completion_tokens" in body.model_fields_set,
                             temperature=1.0 if body.temperature is None else body.temperature,
                             top_p=body.top_p or 1.0, top_k=body.top_k or 0,
                             repetition_penalty=body.repetition_penalty or 1.0, seed=body.seed, stop=body.stops)
        job = await self.submit(ids, params, names)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": body.model}
        if body.stream:
            return StreamingResponse(self._openai_stream(job, head, chat, body.include_usage),
                                     media_type="text/event-stream")
        fin, _ = await job.result(request)
        choice: dict[str, Any] = {"index": 0, "finish_reason": fin.openai_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": fin.text}
        else:
            choice["text"] = fin.text
        return JSONResponse({**head, "choices": [choice], "usage": _usage(fin)})

    async def _openai_stream(self, job: _Job, head: dict, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(text: str | None, reason: str | None = None) -> str:
            if chat:
                delta = {} if text is None else {"content": text}
                c = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                c = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
            return _sse({**head, "choices": [c]})

        try:
            if chat:
                yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "finish_reason": None, "logprobs": None}]})
            async for ev in job.events():
                if isinstance(ev, TokenEvent):
                    if ev.text:
                        yield chunk(ev.text)
                elif isinstance(ev, Finish):
                    yield chunk(None, ev.openai_reason)
                    if include_usage:
                        yield _sse({**head, "choices": [], "usage": _usage(ev)})
                else:
                    self.metrics.http_errors[ev.status] += 1
                    yield _sse(error_body(ev.status, ev.message))
            yield "data: [DONE]\n\n"
        finally:  # also when the client left while this generator waited at a yield
            job.abandon()

    async def models(self, request: Request) -> Response:
        data = [{"id": self.base_name, "object": "model", "created": self.created, "owned_by": "qadapt",
                 "root": self.model.source, "parent": None}]
        for a in self.registry.describe():
            data.append({"id": a["name"], "object": "model", "created": a["loaded_at"], "owned_by": "qadapt",
                         "root": a["source"], "parent": self.base_name})
        return JSONResponse({"object": "list", "data": data})

    # ------------------------------------------------------------------ LoRAX
    async def generate(self, request: Request) -> Response:
        body, job = await self._lorax_start(request)
        if body.stream:
            return StreamingResponse(self._lorax_stream(job, body), media_type="text/event-stream")
        fin, tokens = await job.result(request)
        out: dict[str, Any] = {"generated_text": _full(body, fin.text), "details": None}
        if body.parameters.details:
            out["details"] = {**_lorax_details(fin, body),
                              "tokens": [{"id": t.id, "text": t.text, "logprob": t.logprob, "special": t.special}
                                         for t in tokens]}
        return JSONResponse(out)

    async def generate_stream(self, request: Request) -> Response:
        body, job = await self._lorax_start(request, stream=True)
        return StreamingResponse(self._lorax_stream(job, body), media_type="text/event-stream")

    async def _lorax_start(self, request: Request, stream: bool = False) -> tuple[GenerateRequest, _Job]:
        self.admit()
        body = GenerateRequest.parse(await self.body(request))
        if stream:
            body.stream = True
        p = body.parameters
        names = await self._lorax_adapter(p.adapter_id, p.adapter_source)
        ids = await asyncio.to_thread(self.encode, body.inputs)
        params = self.params(len(ids), p.max_new_tokens, True, temperature=p.temperature_value(),
                             top_p=p.top_p or 1.0, top_k=p.top_k or 0,
                             repetition_penalty=p.repetition_penalty or 1.0, seed=p.seed, stop=tuple(p.stop))
        return body, await self.submit(ids, params, names)

    async def _lorax_adapter(self, adapter_id: str | None, source: str | None) -> tuple[str, ...]:
        """LoRAX's adapter_id: a loaded adapter, the base, or (with runtime adapters) one fetched now."""
        if not adapter_id:
            return self.registry.default
        if adapter_id in BASE_ALIASES or adapter_id == self.base_name or self.registry.is_known(adapter_id):
            return self.names_for(adapter_id)
        if not self.allow_runtime:
            raise NotFound(f"adapter `{adapter_id}` is not loaded (start the server with --allow-runtime-adapters "
                           "to load adapters on first use)")
        await asyncio.to_thread(self.registry.ensure, adapter_id, adapter_id, source or "hub")
        return (adapter_id,)

    async def _lorax_stream(self, job: _Job, body: GenerateRequest) -> AsyncIterator[str]:
        held: TokenEvent | None = None

        def event(t: TokenEvent, fin: Finish | None = None) -> str:
            return _sse({"token": {"id": t.id, "text": t.text, "logprob": t.logprob, "special": t.special},
                         "generated_text": None if fin is None else _full(body, fin.text),
                         "details": None if fin is None else _lorax_details(fin, body)})

        try:
            async for ev in job.events():
                if isinstance(ev, TokenEvent):
                    if held is not None:
                        yield event(held)
                    held = ev
                elif isinstance(ev, Finish):
                    if held is not None:
                        yield event(held, ev)
                else:
                    self.metrics.http_errors[ev.status] += 1
                    yield _sse(error_body(ev.status, ev.message, lorax=True))
        finally:
            job.abandon()

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
            ("qadapt_adapter_refs", "gauge", "Adapter references held by queued and running requests.",
             self.registry.in_use()),
        ]
        rss = _rss_bytes()
        if rss is not None:
            extra.append(("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", rss))
        return PlainTextResponse(self.metrics.render(extra), media_type="text/plain; version=0.0.4")


def _usage(fin: Finish) -> dict[str, int]:
    n = len(fin.token_ids)
    return {"prompt_tokens": fin.prompt_tokens, "completion_tokens": n, "total_tokens": fin.prompt_tokens + n}


def _full(body: GenerateRequest, text: str) -> str:
    return body.inputs + text if body.parameters.return_full_text else text


def _lorax_details(fin: Finish, body: GenerateRequest) -> dict[str, Any]:
    return {"finish_reason": _LORAX_REASONS[fin.reason], "prompt_tokens": fin.prompt_tokens,
            "generated_tokens": len(fin.token_ids), "seed": body.parameters.seed}


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None  # not Linux


async def _json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:  # refused unread
        raise TooLarge(f"the request body has {int(declared)} bytes, above the limit of {limit} (--max-body-bytes)")
    chunks, size = [], 0  # no (or a false) Content-Length: count while reading
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the request body is above the limit of {limit} bytes (--max-body-bytes)")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"malformed JSON in the request body: {e}") from None


def _route(server: Server, fn, lorax: bool = False):
    """Turn exceptions into JSON error bodies with their status; only bugs give 500 (and are logged)."""

    @functools.wraps(fn)
    async def handler(request: Request) -> Response:
        try:
            return await fn(request)
        except _Gone:  # nobody reads this response
            return Response(status_code=499)
        except Exception as e:
            status = status_of(e)
            if status == 500:
                log.exception("%s %s failed", request.method, request.url.path)
                message = f"internal error ({type(e).__name__}); see the server log"
            else:
                message = str(e)
                log.info("%s %s -> %d: %s", request.method, request.url.path, status, message)
            server.metrics.http_errors[status] += 1
            headers = {"Retry-After": "1"} if status in (429, 503) else None
            return JSONResponse(error_body(status, message, lorax), status_code=status, headers=headers)

    return handler


class ApiKeyMiddleware:
    """``Authorization: Bearer KEY`` or ``x-api-key: KEY`` on every path but ``/health``; 401 otherwise."""

    def __init__(self, app, key: str, metrics: Metrics):
        self.app, self.key, self.metrics = app, key.encode(), metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"x-api-key", b"")
            auth = headers.get(b"authorization", b"")
            if auth[:7].lower() == b"bearer ":
                given = auth[7:].strip()
            if not given or not hmac.compare_digest(given, self.key):
                self.metrics.http_errors[401] += 1
                lorax = scope["path"].startswith("/generate")
                resp = JSONResponse(error_body(401, "missing or wrong API key (send Authorization: Bearer KEY)", lorax),
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


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

    s = server
    routes = [
        Route("/health", s.health, methods=["GET"]),
        Route("/metrics", _route(s, s.metrics_text), methods=["GET"]),
        Route("/v1/models", _route(s, s.models), methods=["GET"]),
        Route("/v1/completions", _route(s, s.completions), methods=["POST"]),
        Route("/v1/chat/completions", _route(s, s.chat), methods=["POST"]),
        Route("/generate", _route(s, s.generate, lorax=True), methods=["POST"]),
        Route("/generate_stream", _route(s, s.generate_stream, lorax=True), methods=["POST"]),
        Route("/v1/load_lora_adapter", _route(s, s.load_adapter), methods=["POST"]),
        Route("/v1/unload_lora_adapter", _route(s, s.unload_adapter), methods=["POST"]),
        Route("/v1/lora_adapters", _route(s, s.list_adapters), methods=["GET"]),
        Route("/activate_adapters", _route(s, s.activate), methods=["POST"]),
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
