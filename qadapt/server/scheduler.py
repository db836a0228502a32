"""Continuous batching: one engine thread runs every forward; requests join between decode steps.

Each iteration drops cancelled rows, prefills waiting requests into free cache
rows (one forward each), then decodes one token for every running row in a
single forward, each row at its own position with its own adapters (a
heterogeneous-LoRA batch, see :mod:`qadapt.runtime.batch`). The HTTP side never
runs model code: it submits a :class:`GenRequest` and reads the events the engine
pushes through the request's ``emit`` callback (thread-safe, into an asyncio queue).

Shutting down (:meth:`Engine.drain`): new requests are refused (503), waiting ones
fail at once with 503, running rows keep decoding until they finish or the grace
period ends, when they fail with 503 too; every request ends with a Finish or a
Failure, never in silence.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import QadaptError
from ..runtime.batch import BatchStepper
from ..runtime.generate import TextStream
from ..runtime.sampling import Sampler, SamplingParams
from ..tokenizer import IdsOnly
from .registry import AdapterRegistry, Busy, Unavailable

log = logging.getLogger(__name__)
_ids = itertools.count(1)
SHUTTING_DOWN = "the server is shutting down"


# ---------------------------------------------------------------------- events
@dataclass(frozen=True)
class TokenEvent:
    """One generated token, the text it releases (held back while it could start a stop string that is cut),
    the model's log-probability of it and, when asked, the most likely tokens at its position."""

    id: int
    text: str
    logprob: float
    special: bool = False  # an end-of-generation token
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class PromptScores:
    """The prompt's own log-probabilities (TGI's ``decoder_input_details``, OpenAI's ``echo`` with
    ``logprobs``), sent before the first token: none for the first id; ``top``: the most likely at each."""

    ids: list[int]
    logprobs: list[float | None]
    top: list[list[tuple[int, float]]]


@dataclass(frozen=True)
class Finish:
    reason: str  # "length" | "eos" | "stop_sequence" | "cancelled"
    text: str
    token_ids: list[int]  # the tokens whose text is ``text``
    prompt_tokens: int
    seconds: float
    generated: int = 0  # tokens sampled, an end-of-generation token included
    seed: int | None = None  # the sampling seed (drawn when the request gave none); None when greedy

    @property
    def openai_reason(self) -> str:
        return "length" if self.reason == "length" else "stop"


@dataclass(frozen=True)
class Failure:
    status: int
    message: str


@dataclass
class GenRequest:
    prompt_ids: list[int]
    params: SamplingParams
    names: tuple[str, ...]  # public adapter names (for logs and metrics)
    keys: tuple[str, ...]  # the model's adapter keys, held on the registry until the request ends
    emit: Callable[[Any], None]
    score_prompt: int | None = None  # score the prompt, with this many alternatives per position
    mix: str = ""  # the mix's description, when ``names`` are mixed
    held: bool = True  # whether ``keys`` are still held on the registry
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    created: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    @property
    def label(self) -> str:
        return self.mix or "+".join(self.names) or "base"


@dataclass
class _Row:
    req: GenRequest
    slot: int
    pos: int  # where ``last`` is fed next
    last: int = -1
    sampler: Sampler | None = None  # seed, penalties, grammar
    stream: TextStream | None = None  # the text, stop strings and end of generation
    alora: dict[str, int | None] | None = None  # where its aLoRA adapters start (their invocation in the prompt)


# ---------------------------------------------------------------------- metrics
class Metrics:
    """Counters and gauges for ``/metrics`` (Prometheus text format), updated from any thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()  # (adapter, finish) -> n
        self.http_errors: collections.Counter = collections.Counter()  # status -> n
        self.prompt_tokens = self.generated_tokens = 0
        self.decode_steps = self.decode_rows = self.decode_rows_max = self.prefills = 0
        self._recent: collections.deque = collections.deque()  # (time, tokens) of the last window

    WINDOW = 10.0  # seconds of decode steps kept for tokens_per_second

    def step(self, rows: int, tokens: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.decode_steps += 1
            self.decode_rows += rows
            self.decode_rows_max = max(self.decode_rows_max, rows)
            self._recent.append((now, tokens))
            self._prune(now)  # here, not only when /metrics is read: unscraped, the deque grew forever

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._prune(now)
            return sum(n for _, n in self._recent) / self.WINDOW

    def _prune(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self.WINDOW:
            self._recent.popleft()

    def render(self, extra: list[tuple[str, str, str, float]] = (),
               labelled: list[tuple[str, str, str, dict[str, str], float]] = ()) -> str:
        """The text exposition format; ``extra``: (name, type, help, value) of samples kept elsewhere;
        ``labelled``: the same with one labelled sample each."""
        out: list[str] = []

        def metric(name, kind, help_, samples):
            out.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
            for labels, value in samples:
                lab = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                out.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")

        tps = self.tokens_per_second()
        with self._lock:
            metric("qadapt_requests_total", "counter", "Generation requests finished, by adapter and finish reason.",
                   [({"adapter": a, "finish": f}, n) for (a, f), n in sorted(self.requests.items())])
            metric("qadapt_http_errors_total", "counter", "Error responses, by HTTP status.",
                   [({"status": str(s)}, n) for s, n in sorted(self.http_errors.items())])
            metric("qadapt_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [({}, self.prompt_tokens)])
            metric("qadapt_generated_tokens_total", "counter", "Tokens generated.", [({}, self.generated_tokens)])
            metric("qadapt_prefills_total", "counter", "Prefill forwards (one per admitted request).",
                   [({}, self.prefills)])
            metric("qadapt_decode_steps_total", "counter", "Batched decode forwards.", [({}, self.decode_steps)])
            metric("qadapt_decode_rows_total", "counter", "Rows decoded, summed over decode steps.",
                   [({}, self.decode_rows)])
            metric("qadapt_decode_rows_max", "gauge", "Most rows decoded together in one step.",
                   [({}, self.decode_rows_max)])
        metric("qadapt_tokens_per_second", "gauge", "Generated tokens per second over the last 10 s.",
               [({}, round(tps, 3))])
        for name, kind, help_, value in extra:
            metric(name, kind, help_, [({}, value)])
        for name, kind, help_, labels, value in labelled:
            metric(name, kind, help_, [(labels, value)])
        return "\n".join(out) + "\n"


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# ---------------------------------------------------------------------- engine
class Engine:
    def __init__(self, model: Any, registry: AdapterRegistry, *, max_batch: int, max_queue: int, max_seq_len: int,
                 metrics: Metrics | None = None):
        self.model = model
        self.registry = registry
        self.max_queue = max_queue
        self.max_seq_len = max_seq_len
        self.metrics = metrics or Metrics()
        self.tokenizer = model.tokenizer or IdsOnly(model.config.eos_token_ids)
        self._eos = frozenset(self.tokenizer.eos_ids)
        self.stepper = BatchStepper(self._forward, model.new_cache(max_seq_len, max_batch))
        self._rows: list[_Row | None] = [None] * max_batch
        self._pending: collections.deque[GenRequest] = collections.deque()
        self._cv = threading.Condition()
        self._stop = False
        self._drain_deadline: float | None = None  # set by drain(): no new work, running rows until then
        self._thread = threading.Thread(target=self._loop, name="qadapt-engine", daemon=True)

    # ------------------------------------------------------------ public (any thread)
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the loop; whatever still runs or waits fails with 503 (call :meth:`drain` first to be gentle)."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=10)

    def drain(self, grace: float) -> None:
        """Begin shutting down: refuse new requests, fail waiting ones now, let running rows finish for
        ``grace`` seconds, then fail the rest (503). Idempotent: a second call never extends the deadline."""
        with self._cv:
            deadline = time.monotonic() + max(0.0, grace)
            if self._drain_deadline is None or deadline < self._drain_deadline:
                self._drain_deadline = deadline
            self._cv.notify_all()
        log.info("draining: %d running, %d waiting; running rows get %.1f s to finish", self.running, self.queued,
                 grace)

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    def submit(self, req: GenRequest) -> None:
        """Queue a request (its keys already held); Busy when the queue is full, Unavailable when draining."""
        with self._cv:
            if self._drain_deadline is not None or self._stop:
                raise Unavailable(f"{SHUTTING_DOWN}; not taking new requests")
            if len(self._pending) >= self.max_queue:
                raise Busy(f"the request queue is full ({self.max_queue} waiting, --max-queue); retry later")
            self._pending.append(req)
            self._cv.notify()

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self._rows)

    def adapter_load(self) -> tuple[list[str], list[str]]:
        """Public names of the adapters running rows and waiting requests use (vLLM's lora_requests_info)."""
        with self._cv:
            waiting = {n for r in self._pending for n in r.names}
        running = {n for r in list(self._rows) if r is not None for n in r.req.names}
        return sorted(running), sorted(waiting)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------ the loop (engine thread)
    def _forward(self, ids, positions, cache, rows):
        return self.model.step(ids, positions, cache, rows, alora=self._alora(cache))

    def _score(self, ids, positions, cache, rows, top):
        return self.model.score_step(ids, positions, cache, rows, top, alora=self._alora(cache))

    def _alora(self, cache) -> tuple | None:
        """Per row of this forward (the cache view's slots), where its aLoRA adapters start; None: none have."""
        got = tuple(self._rows[slot].alora if self._rows[slot] is not None else None for slot in cache.rows)
        return got if any(got) else None

    def _loop(self) -> None:
        while not self._stop:
            try:
                self._iteration()
            except Exception:  # a bug: fail the running requests, keep serving
                log.exception("engine step failed; failing the running requests")
                for row in [r for r in self._rows if r is not None]:
                    self._fail(row.req, 500, "internal error while generating (see the server log)", row.slot)
        for row in [r for r in self._rows if r is not None]:
            self._fail(row.req, 503, f"{SHUTTING_DOWN}; generation stopped", row.slot)
        self._fail_pending()

    def _fail_pending(self) -> None:
        while True:
            with self._cv:
                if not self._pending:
                    return
                req = self._pending.popleft()
            self._fail(req, 503, f"{SHUTTING_DOWN}; the request was still waiting")

    def _iteration(self) -> None:
        for row in self._rows:
            if row is not None and row.req.cancelled:
                self._finish(row, "cancelled")
        if self._drain_deadline is not None:
            self._fail_pending()
            if time.monotonic() >= self._drain_deadline:
                for row in [r for r in self._rows if r is not None]:
                    self._fail(row.req, 503, f"{SHUTTING_DOWN}; generation stopped at the end of the grace "
                                             "period", row.slot)
        else:
            self._admit()
        active = [r for r in self._rows if r is not None]
        if not active:
            with self._cv:
                if not self._pending and not self._stop:
                    self._cv.wait(timeout=0.5)
            return
        logits = self.stepper.decode([r.slot for r in active], [r.last for r in active],
                                     [r.pos for r in active], [r.req.keys for r in active])
        self.metrics.step(len(active), len(active))
        for row, lg in zip(active, logits):
            row.pos += 1
            self._advance(row, lg)

    def _admit(self) -> None:
        """Prefill waiting requests into free rows, one forward each."""
        while True:
            free = next((i for i, r in enumerate(self._rows) if r is None), None)
            with self._cv:
                if free is None or not self._pending:
                    return
                req = self._pending.popleft()
            if req.cancelled:
                self._release(req)
                continue
            try:
                row, logits = self._prefill(req, free)
            except QadaptError as e:
                self._fail(req, 400, str(e), free)
                continue
            except Exception:
                log.exception("prefill of %s failed", req.id)
                self._fail(req, 500, "internal error while reading the prompt (see the server log)", free)
                continue
            if logits is not None:
                self._advance(row, logits)

    def _prefill(self, req: GenRequest, slot: int) -> tuple[_Row, torch.Tensor | None]:
        n = len(req.prompt_ids)
        if not n or n >= self.max_seq_len:
            raise QadaptError(f"prompt of {n} tokens does not fit the context of {self.max_seq_len}")
        row = _Row(req, slot, pos=n)
        row.alora = self.model.alora_starts(req.keys, req.prompt_ids) or None
        row.sampler = Sampler(req.params, req.prompt_ids, self.tokenizer.eos_ids)
        row.stream = TextStream(self.tokenizer, req.prompt_ids, req.params)
        self._rows[slot] = row
        self.metrics.prefills += 1
        self.metrics.prompt_tokens += n
        logits = None
        if req.score_prompt is not None:
            logits, (lp, tv, ti) = self.stepper.prefill_scored(slot, req.prompt_ids, req.keys, req.score_prompt,
                                                               self._score)
            top = [list(zip(i.tolist(), v.tolist())) for v, i in zip(tv, ti)]
            req.emit(PromptScores(list(req.prompt_ids), [None, *lp.tolist()], [[], *top]))
        if req.params.max_new_tokens == 0:
            self._finish(row, "length")
            return row, None
        if logits is None:
            logits = self.stepper.prefill(slot, req.prompt_ids, req.keys)
        return row, logits

    def _advance(self, row: _Row, logits: torch.Tensor) -> None:
        """Sample the row's next token, emit it with its released text, finish the row when it is done."""
        choice = row.sampler.next(logits)
        tok = choice.token
        self.metrics.generated_tokens += 1
        text = row.stream.push(tok)
        event = functools.partial(TokenEvent, tok, logprob=choice.logprob, special=tok in self._eos,
                                  top=tuple(choice.top))
        if row.stream.reason is not None:  # the end-of-generation token, or a stop string
            row.req.emit(event(text))
            return self._finish(row, row.stream.reason)
        if row.sampler.grammar_done:  # the grammar is complete: nothing but the end can follow
            row.req.emit(event(text + row.stream.close("eos")))
            return self._finish(row, "eos")
        if row.stream.generated >= row.req.params.max_new_tokens or row.pos >= self.max_seq_len:
            row.req.emit(event(text + row.stream.close()))
            return self._finish(row, "length")
        row.req.emit(event(text))
        row.last = tok

    # ------------------------------------------------------------ endings
    def _finish(self, row: _Row, reason: str) -> None:
        req = row.req
        self._rows[row.slot] = None
        secs = time.monotonic() - req.created
        self._release(req)
        with self.metrics._lock:
            self.metrics.requests[(req.label, reason)] += 1
        log.info("request %s adapter=%s prompt_tokens=%d completion_tokens=%d time=%.3fs finish=%s", req.id,
                 req.label, len(req.prompt_ids), len(row.stream.tokens), secs, reason)
        req.emit(Finish(reason, row.stream.text, list(row.stream.tokens), len(req.prompt_ids), secs,
                        row.stream.generated, row.sampler.seed))

    def _fail(self, req: GenRequest, status: int, message: str, slot: int | None = None) -> None:
        if slot is not None and self._rows[slot] is not None and self._rows[slot].req is req:
            self._rows[slot] = None
        self._release(req)
        with self.metrics._lock:
            self.metrics.requests[(req.label, "error")] += 1
        log.warning("request %s adapter=%s failed (%d): %s", req.id, req.label, status, message)
        req.emit(Failure(status, message))

    def _release(self, req: GenRequest) -> None:
        if req.held:
            req.held = False
            self.registry.release(req.keys)
