"""The OpenAI endpoints: ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``.

Every parameter OpenAI documents for these endpoints is honoured or refused by name: ``n`` and
``best_of`` (independent sequences of one prompt; ``best_of`` keeps the ``n`` with the highest mean token
log-probability, as OpenAI defines it), ``echo``, ``logprobs`` / ``top_logprobs`` (the model's own
log-probabilities, before any penalty or constraint), ``logit_bias``, the penalties, ``response_format``,
``tools`` / ``tool_choice`` (see :mod:`.tools`), ``stream_options``. vLLM's extensions (``top_k``,
``repetition_penalty``, ``ignore_eos``, ``include_stop_str_in_output``, ``guided_*``), llama.cpp's ``lora``
list and LoRAX's ``adapter_source`` are accepted too.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..runtime.constrain import Constraint
from . import tools as tooling
from .app import AdapterChoice, Result, Server
from .http import error_body, sse
from .openai_schemas import ChatRequest, CompletionRequest
from .registry import NotFound
from .scheduler import Failure, Finish, PromptScores, TokenEvent

FINGERPRINT = "qadapt"


class OpenAIRoutes:
    def __init__(self, server: Server):
        self.s = server

    # ------------------------------------------------------------------ endpoints
    async def completions(self, request: Request) -> Response:
        s = self.s
        s.admit()
        body = CompletionRequest.parse(await s.body(request))
        prompt = body.prompt_value()
        ids = await asyncio.to_thread(s.encode, prompt)  # a long prompt must not stall the loop
        echo_text = prompt if isinstance(prompt, str) else s.model.tokenizer.decode(ids, skip_special=False)
        return await self._run(request, body, ids, chat=False, echo=echo_text if body.echo else None)

    async def chat(self, request: Request) -> Response:
        s = self.s
        s.admit()
        body = ChatRequest.parse(await s.body(request))
        calling = bool(body.tools) and body.tool_choice != "none"
        template_vars = dict(body.chat_template_kwargs or {})
        if calling:
            template_vars["tools"] = [t.model_dump(exclude_none=True) for t in body.tools]
        messages = tooling.template_messages(body.messages)

        def encode() -> list[int]:
            return s.model.encode_chat(messages, **template_vars)

        return await self._run(request, body, await asyncio.to_thread(encode), chat=True, calling=calling)

    async def models(self, request: Request) -> Response:
        s = self.s
        data = [{"id": s.base_name, "object": "model", "created": s.created, "owned_by": "qadapt",
                 "root": s.model.source, "parent": None, "max_model_len": s.max_seq_len}]
        for a in s.registry.describe():
            data.append({"id": a["name"], "object": "model", "created": a["loaded_at"], "owned_by": "qadapt",
                         "root": a["source"], "parent": s.base_name})
        return JSONResponse({"object": "list", "data": data})

    # ------------------------------------------------------------------ one request
    async def _adapters(self, body) -> AdapterChoice:
        s = self.s
        if not s.is_served(body.model) and body.adapter_source is not None:
            await s.just_in_time(body.model, body.adapter_source)  # LoRAX: model = adapter id, loaded now
        if body.lora is not None:  # llama.cpp: ids index GET /lora-adapters (or are names)
            s.names_for(body.model)
            listed = s.registry.names()
            names, weights = [], []
            for item in body.lora:
                if isinstance(item.id, int):
                    if not 0 <= item.id < len(listed):
                        raise NotFound(f"lora id {item.id} does not exist (GET /lora-adapters lists {len(listed)})")
                    name = listed[item.id]
                else:
                    name = item.id
                if item.scale:
                    names.append(name)
                    weights.append(item.scale)
            return AdapterChoice(tuple(names), tuple(weights)) if names else AdapterChoice()
        if isinstance(body.adapters, dict):
            s.names_for(body.model)
            return AdapterChoice(tuple(body.adapters), tuple(body.adapters.values()))
        return AdapterChoice(s.names_for(body.model, body.adapters))

    def _constraint(self, body, chat: bool) -> Constraint | None:
        if chat and body.tools and body.tool_choice == "required":
            return Constraint("json_schema", tooling.required_schema(body.tools))
        if chat and body.tools and not isinstance(body.tool_choice, (str, type(None))):
            return Constraint("json_schema", tooling.named_schema(body.tools, body.tool_choice.function["name"]))
        rf = body.response_format
        if rf is not None and rf.type == "json_object":
            return Constraint("json_object")
        if rf is not None and rf.type == "json_schema":
            return Constraint("json_schema", rf.json_schema.schema_ or {"type": "object"})
        if body.guided_json is not None:
            return Constraint("json_schema", body.guided_json)
        if body.guided_regex is not None:
            return Constraint("regex", body.guided_regex)
        if body.guided_grammar is not None:
            return Constraint("lark", body.guided_grammar)
        if body.guided_choice is not None:
            return Constraint("choice", body.guided_choice)
        return None

    async def _run(self, request: Request, body, ids: list[int], chat: bool, echo: str | None = None,
                   calling: bool = False) -> Response:
        s = self.s
        adapters = await self._adapters(body)
        grammar = await s.grammar(self._constraint(body, chat))
        top = (body.top_logprobs or 0) if chat else (body.logprobs or 0)
        explicit = "max_tokens" in body.model_fields_set or "max_completion_tokens" in body.model_fields_set
        count = body.count if chat else (body.best_of or body.count)
        base = dict(temperature=1.0 if body.temperature is None else body.temperature, top_p=body.top_p or 1.0,
                    top_k=max(0, body.top_k or 0), typical_p=body.typical_p or 1.0,
                    repetition_penalty=body.repetition_penalty or 1.0,
                    frequency_penalty=body.frequency_penalty or 0.0, presence_penalty=body.presence_penalty or 0.0,
                    logit_bias=body.biases(), stop=body.stops, ignore_eos=bool(body.ignore_eos),
                    keep_stop=bool(body.include_stop_str_in_output), top_logprobs=top, grammar=grammar)
        params = [s.params(len(ids), body.max_tokens, explicit, **base,
                           seed=None if body.seed is None else body.seed + i) for i in range(count)]
        score = top if (echo is not None and body.logprobs is not None) else None
        jobs = await s.submit(ids, params, adapters, score_prompt=score)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": body.model, "system_fingerprint": FINGERPRINT}
        view = _View(s, body, chat, echo, calling)
        if body.stream:
            return StreamingResponse(self._stream(jobs, head, view), media_type="text/event-stream")
        try:
            results = await asyncio.gather(*(j.result(request) for j in jobs))
        finally:
            for j in jobs:
                j.abandon()
        if len(results) > body.count:  # best_of: the n with the highest mean token log-probability
            results = sorted(results, key=lambda r: -r.logprob_sum / max(1, len(r.tokens)))[:body.count]
        choices = [view.choice(i, r) for i, r in enumerate(results)]
        return JSONResponse({**head, "choices": choices, "usage": _usage([r.finish for r in results])})

    async def _stream(self, jobs, head: dict, view: "_View") -> AsyncIterator[str]:
        head = {**head, "object": "chat.completion.chunk" if view.chat else "text_completion"}
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i, job):
            async for ev in job.events():
                await merged.put((i, ev))

        tasks = [asyncio.create_task(pump(i, j)) for i, j in enumerate(jobs)]
        states = [view.stream_state(i) for i in range(len(jobs))]
        finishes: list[Finish] = []
        try:
            for st in states:
                for c in st.opening():
                    yield sse({**head, "choices": [c]})
            open_ = len(jobs)
            while open_:
                i, ev = await merged.get()
                st = states[i]
                if isinstance(ev, Failure):
                    self.s.metrics.http_errors[ev.status] += 1
                    yield sse(error_body(ev.status, ev.message))
                    open_ -= 1
                    continue
                if isinstance(ev, Finish):
                    finishes.append(ev)
                    open_ -= 1
                for c in st.feed(ev):
                    yield sse({**head, "choices": [c]})
            if view.body.include_usage and finishes:
                yield sse({**head, "choices": [], "usage": _usage(finishes)})
            if not view.tgi:  # text-generation's client fails on it (TGI sent none when it was written)
                yield "data: [DONE]\n\n"
        finally:  # also when the client left while this generator waited at a yield
            for t in tasks:
                t.cancel()
            for j in jobs:
                j.abandon()


class _View:
    """How one request's sequences become OpenAI choices (whole, or chunk by chunk)."""

    def __init__(self, server: Server, body, chat: bool, echo: str | None, calling: bool):
        self.s, self.body, self.chat, self.echo, self.calling = server, body, chat, echo, calling
        self.tok = server.model.tokenizer
        self.style = tooling.style_of(server.model.chat_template or self.tok.chat_template) if calling else None
        self.forced = calling and body.tool_choice not in (None, "auto")
        self.want_logprobs = bool(body.logprobs) if chat else body.logprobs is not None
        self.tgi = body.model == "tgi"  # text-generation's client: TGI's delta shapes

    # -------------------------------------------------------------- pieces
    def token_text(self, token: int) -> str:
        return self.tok.token_bytes(token).decode("utf-8", "replace")

    def _chat_logprob(self, t: TokenEvent) -> dict[str, Any]:
        def entry(tok, lp):
            b = self.tok.token_bytes(tok)
            return {"token": b.decode("utf-8", "replace"), "logprob": lp, "bytes": list(b)}

        return {**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}

    def _shown(self, tokens: list[TokenEvent]) -> list[TokenEvent]:
        """The tokens whose text is the completion's (not a closing end-of-generation token)."""
        return [t for t in tokens if not (t.special and not self.body.ignore_eos)]

    def _completion_logprobs(self, tokens: list[TokenEvent], prompt: PromptScores | None, offset: int) -> dict:
        """OpenAI's legacy logprobs; ``text_offset``: where each token's text begins in the returned text,
        counting the characters its preceding bytes make (a character split across tokens counts once)."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        groups = []
        if prompt is not None:
            groups.append((list(zip(prompt.ids, prompt.logprobs, prompt.top)), 0, True))
        groups.append(([(t.id, t.logprob, list(t.top)) for t in tokens], offset, False))
        for pairs, start, is_prompt in groups:
            seen = b""
            for k, (tok, lp, top) in enumerate(pairs):
                out["tokens"].append(self.token_text(tok))
                out["token_logprobs"].append(lp)
                out["top_logprobs"].append(None if (is_prompt and k == 0) else {self.token_text(i): v for i, v in top})
                out["text_offset"].append(start + len(seen.decode("utf-8", "ignore")))
                if not self.tok.is_special(tok):  # special tokens are not in the text
                    seen += self.tok.token_bytes(tok)
            if is_prompt:
                offset = start + len(seen.decode("utf-8", "ignore"))
                groups[-1] = (groups[-1][0], max(offset, groups[-1][1]), False)
        return out

    def _calls(self, fin: Finish) -> tuple[str | None, list[tooling.Call]]:
        """The message content and the tool calls of a finished sequence."""
        if self.forced:
            calls = tooling.forced_calls(fin.text, self.body.tool_choice)
            return (None, calls) if calls else (fin.text, [])
        raw = self.tok.decode(fin.token_ids, skip_special=False)
        content, calls = tooling.parse(raw, self.style)
        if not calls:
            return fin.text, []
        if self.body.parallel_tool_calls is False:
            calls = calls[:1]
        return content, calls

    # -------------------------------------------------------------- whole
    def choice(self, index: int, r: Result) -> dict[str, Any]:
        fin = r.finish
        reason = "length" if fin.reason == "length" else "stop"
        shown = self._shown(r.tokens)
        if not self.chat:
            text = (self.echo or "") + fin.text
            logprobs = self._completion_logprobs(shown, r.prompt, 0) if self.want_logprobs else None
            return {"index": index, "text": text, "finish_reason": reason, "logprobs": logprobs}
        message: dict[str, Any] = {"role": "assistant", "content": fin.text, "tool_calls": None}
        if self.calling:
            content, calls = self._calls(fin)
            if calls:
                message = {"role": "assistant", "content": content,
                           "tool_calls": [c.openai() for c in calls]}
                reason = "tool_calls"
        logprobs = {"content": [self._chat_logprob(t) for t in shown], "refusal": None} if self.want_logprobs else None
        return {"index": index, "message": message, "finish_reason": reason, "logprobs": logprobs}

    # -------------------------------------------------------------- streamed
    def stream_state(self, index: int) -> "_StreamState":
        return _StreamState(self, index)


class _StreamState:
    """One choice of a stream: its deltas, held while they might begin a tool call."""

    def __init__(self, view: _View, index: int):
        self.v, self.i = view, index
        self.held: list[tuple[str, TokenEvent]] = []  # (text, token) kept back while a tool call may be starting
        self.raw = b""  # the output with special tokens, to see a tool-call marker
        self.decided = not view.calling  # True: plain content, streamed as it comes
        self.prompt: PromptScores | None = None
        self.offset = 0

    def opening(self) -> list[dict[str, Any]]:
        if not self.v.chat:
            return []
        return [self._chunk({"role": "assistant", "content": ""}, None)]

    def _chunk(self, delta: dict[str, Any] | None, reason: str | None, logprobs: Any = None,
               text: str | None = None) -> dict[str, Any]:
        if not self.v.chat:
            return {"index": self.i, "text": text or "", "finish_reason": reason, "logprobs": logprobs}
        d = {"role": "assistant", "content": None, "tool_calls": None, **(delta or {})}
        return {"index": self.i, "delta": d, "finish_reason": reason, "logprobs": logprobs}

    def _content(self, pieces: list[tuple[str, TokenEvent]]) -> list[dict[str, Any]]:
        v = self.v
        text = "".join(p for p, _ in pieces)
        toks = v._shown([t for _, t in pieces])
        if not text and not (v.want_logprobs and toks):
            return []
        if not v.chat:
            lp = None
            if v.want_logprobs:
                prompt, self.prompt = self.prompt, None
                if prompt is None and v.echo is not None and not self.offset:
                    self.offset = len(v.echo)
                lp = v._completion_logprobs(toks, prompt, self.offset)
                self.offset = lp["text_offset"][-1] + len(lp["tokens"][-1]) if lp["tokens"] else self.offset
            if v.echo is not None and self._first():
                text = v.echo + text
            return [self._chunk(None, None, lp, text)]
        lp = {"content": [v._chat_logprob(t) for t in toks], "refusal": None} if v.want_logprobs else None
        return [self._chunk({"content": text}, None, lp)]

    _echoed = False

    def _first(self) -> bool:
        first, self._echoed = not self._echoed, True
        return first

    def feed(self, ev: Any) -> list[dict[str, Any]]:
        v = self.v
        if isinstance(ev, PromptScores):
            self.prompt = ev
            return []
        if isinstance(ev, TokenEvent):
            if self.decided:
                return self._content([(ev.text, ev)])
            self.held.append((ev.text, ev))
            if v.forced:
                return []
            self.raw += v.tok.token_bytes(ev.id)
            head = self.raw.decode("utf-8", "ignore").lstrip()
            if head and not any(head.startswith(m) or m.startswith(head) for m in tooling.markers(v.style)):
                self.decided, held, self.held = True, self.held, []
                return self._content(held)
            return []
        fin: Finish = ev
        reason = "length" if fin.reason == "length" else "stop"
        out: list[dict[str, Any]] = []
        if not self.decided:
            content, calls = v._calls(fin)
            if calls:
                return out + self._tool_chunks(content, calls)
            out += self._content(self.held)
            self.held = []
        elif not v.chat and v.echo is not None and self._first():
            out.append(self._chunk(None, None, None, v.echo))
        out.append(self._chunk({} if v.chat else None, reason))
        return out

    def _tool_chunks(self, content: str | None, calls: list[tooling.Call]) -> list[dict[str, Any]]:
        out = []
        if content:
            out.append(self._chunk({"content": content}, None))
        for k, c in enumerate(calls):
            call = c.openai(index=k)
            out.append(self._chunk({"tool_calls": call if self.v.tgi else [call]}, None))
        out.append(self._chunk({}, "tool_calls"))
        return out


def _usage(finishes: list[Finish]) -> dict[str, int]:
    prompt = finishes[0].prompt_tokens if finishes else 0
    n = sum(f.generated for f in finishes)
    return {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}

