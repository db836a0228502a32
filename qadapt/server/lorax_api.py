"""LoRAX's and TGI's generation API: ``POST /`` (what both clients call), ``/generate``,
``/generate_stream`` and ``GET /info``.

LoRAX's semantics throughout: validation errors are 422 with ``error_type: validation``; ``max_new_tokens``
null means up to the context; stop sequences stay in ``generated_text``; ``details.generated_tokens``
counts the end-of-sequence token; ``details.seed`` is the seed used (drawn when sampling without one);
``best_of`` returns the sequence with the highest total log-probability and the others in
``best_of_sequences``; ``decoder_input_details`` scores the prompt; ``return_k_alternatives`` (LoRAX) and
``top_n_tokens`` (TGI) report the most likely tokens at each step; ``truncate`` keeps the prompt's last
tokens; ``merged_adapters`` mixes adapters per request (:mod:`qadapt.adapters.mix`); ``response_format``
(LoRAX) and ``grammar`` (TGI) constrain the output (:mod:`qadapt.runtime.constrain`).
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .. import __version__
from ..runtime.constrain import Constraint
from .app import AdapterChoice, Result, Server
from .http import error_body, sse
from .lorax_schemas import MAX_BEST_OF, MAX_STOP_SEQUENCES, GenerateRequest, Parameters
from .scheduler import Failure, Finish, TokenEvent

REASONS = {"length": "length", "eos": "eos_token", "stop_sequence": "stop_sequence", "cancelled": "length"}


class LoraxRoutes:
    def __init__(self, server: Server):
        self.s = server

    # ------------------------------------------------------------------ endpoints
    async def compat(self, request: Request) -> Response:
        """``POST /``: a one-element list, or server-sent events when ``stream`` is true (TGI's compat route)."""
        body, jobs = await self._start(request)
        if body.stream:
            return StreamingResponse(self._stream(jobs[0], body), media_type="text/event-stream")
        return JSONResponse([await self._whole(request, body, jobs)])

    async def generate(self, request: Request) -> Response:
        body, jobs = await self._start(request)
        if body.stream:
            return StreamingResponse(self._stream(jobs[0], body), media_type="text/event-stream")
        return JSONResponse(await self._whole(request, body, jobs))

    async def generate_stream(self, request: Request) -> Response:
        body, jobs = await self._start(request, stream=True)
        return StreamingResponse(self._stream(jobs[0], body), media_type="text/event-stream")

    async def info(self, request: Request) -> Response:
        s = self.s
        m = s.model
        return JSONResponse({
            "model_id": s.base_name, "model_sha": None, "model_dtype": m.base_format_quant or "float32",
            "model_device_type": "cpu", "model_pipeline_tag": "text-generation",
            "quantize": m.base_format_quant, "max_concurrent_requests": s.engine.max_queue + s.engine.stepper.rows,
            "max_best_of": MAX_BEST_OF, "max_stop_sequences": MAX_STOP_SEQUENCES,
            "max_input_length": s.max_seq_len - 1, "max_total_tokens": s.max_seq_len,
            "max_batch_total_tokens": s.max_seq_len * s.engine.stepper.rows, "max_batch_size": s.engine.stepper.rows,
            "waiting_served_ratio": 0.0, "max_waiting_tokens": 0, "validation_workers": 1,
            "max_client_batch_size": 1, "router": "qadapt", "version": __version__, "sha": None,
            "docker_label": None, "request_logger_url": None, "eager_prefill": True,
            "adapters": s.registry.names(), "runtime_adapters": s.allow_runtime, "chat_template": m.chat_template
            is not None})

    # ------------------------------------------------------------------ one request
    async def _adapters(self, p: Parameters) -> AdapterChoice:
        s = self.s
        if p.merged_adapters is not None:
            m = p.merged_adapters
            for adapter_id in m.ids:
                await s.just_in_time(adapter_id, p.adapter_source, p.api_token)
            return AdapterChoice(tuple(m.ids), tuple(m.weights), m.merge_strategy or "linear", m.density,
                                 m.majority_sign_method or "total", p.seed or 0)
        if not p.adapter_id:
            return AdapterChoice(s.registry.default)
        await s.just_in_time(p.adapter_id, p.adapter_source, p.api_token)
        return AdapterChoice(s.names_for(p.adapter_id))

    @staticmethod
    def _constraint(p: Parameters) -> Constraint | None:
        rf = p.response_format
        if rf is not None and rf.type == "json_object":
            return Constraint("json_schema", rf.schema_) if rf.schema_ else Constraint("json_object")
        if p.grammar is not None:
            return Constraint("json_schema" if p.grammar.type == "json" else "regex", p.grammar.value)
        return None

    async def _start(self, request: Request, stream: bool = False):
        s = self.s
        s.admit()
        body = GenerateRequest.parse(await s.body(request))
        if stream:
            body.stream = True
        p = body.parameters
        adapters = await self._adapters(p)
        ids = await asyncio.to_thread(s.encode, body.inputs)
        if p.truncate and len(ids) > p.truncate:
            ids = ids[-p.truncate:]  # TGI keeps the prompt's end
        grammar = await s.grammar(self._constraint(p))
        k = p.return_k_alternatives or p.top_n_tokens or 0
        base = dict(temperature=p.temperature_value(), top_p=p.top_p or 1.0, top_k=p.top_k or 0,
                    typical_p=p.typical_p or 1.0, repetition_penalty=p.repetition_penalty or 1.0,
                    frequency_penalty=p.frequency_penalty or 0.0, stop=tuple(p.stop), ignore_eos=p.ignore_eos_token,
                    keep_stop=True, top_logprobs=k, grammar=grammar, seed=p.seed)
        params = [s.params(len(ids), p.max_new_tokens, p.max_new_tokens is not None, **base)
                  for _ in range(p.best_of or 1)]
        score = k if (p.decoder_input_details and not body.stream) else None
        return body, await s.submit(ids, params, adapters, score_prompt=score)

    async def _whole(self, request: Request, body: GenerateRequest, jobs) -> dict[str, Any]:
        try:
            results = await asyncio.gather(*(j.result(request) for j in jobs))
        finally:
            for j in jobs:
                j.abandon()
        best = max(results, key=lambda r: r.logprob_sum)
        out: dict[str, Any] = {"generated_text": self._full(body, best.finish.text)}
        p = body.parameters
        if p.details or p.decoder_input_details:
            details = self._details(body, best)
            if len(results) > 1:
                details["best_of_sequences"] = [
                    {k: v for k, v in self._details(body, r).items() if k != "best_of_sequences"}
                    | {"generated_text": self._full(body, r.finish.text)} for r in results if r is not best]
            out["details"] = details
        return out

    # ------------------------------------------------------------------ shapes
    @staticmethod
    def _full(body: GenerateRequest, text: str) -> str:
        return body.inputs + text if body.parameters.return_full_text else text

    def _token(self, body: GenerateRequest, t: TokenEvent) -> dict[str, Any]:
        out = {"id": t.id, "text": t.text, "logprob": t.logprob, "special": t.special}
        if body.parameters.return_k_alternatives:
            out["alternative_tokens"] = [{"id": i, "text": self._text(i), "logprob": lp} for i, lp in t.top]
        return out

    def _top(self, t: TokenEvent) -> list[dict[str, Any]]:
        tok = self.s.model.tokenizer
        return [{"id": i, "text": self._text(i), "logprob": lp, "special": tok.is_special(i)} for i, lp in t.top]

    def _text(self, token: int) -> str:
        return self.s.model.tokenizer.token_bytes(token).decode("utf-8", "replace")

    def _end(self, fin: Finish) -> dict[str, Any]:
        return {"finish_reason": REASONS[fin.reason], "prompt_tokens": fin.prompt_tokens,
                "generated_tokens": fin.generated, "seed": fin.seed}

    def _details(self, body: GenerateRequest, r: Result) -> dict[str, Any]:
        p = body.parameters
        prefill = []
        if r.prompt is not None:
            prefill = [{"id": i, "text": self._text(i), "logprob": lp} for i, lp in zip(r.prompt.ids, r.prompt.logprobs)]
        out = {**self._end(r.finish), "prefill": prefill, "tokens": [self._token(body, t) for t in r.tokens]}
        if p.top_n_tokens:
            out["top_tokens"] = [self._top(t) for t in r.tokens]
        return out

    async def _stream(self, job, body: GenerateRequest) -> AsyncIterator[str]:
        held: TokenEvent | None = None

        def event(t: TokenEvent, fin: Finish | None = None) -> str:
            ev: dict[str, Any] = {"token": self._token(body, t), "generated_text": None, "details": None}
            if body.parameters.top_n_tokens:
                ev["top_tokens"] = self._top(t)
            if fin is not None:
                ev["generated_text"] = self._full(body, fin.text)
                ev["details"] = self._end(fin) if body.parameters.details else None
            return sse(ev)

        try:
            async for ev in job.events():
                if isinstance(ev, TokenEvent):
                    if held is not None:
                        yield event(held)
                    held = ev
                elif isinstance(ev, Finish):
                    if held is not None:
                        yield event(held, ev)
                elif isinstance(ev, Failure):
                    self.s.metrics.http_errors[ev.status] += 1
                    yield sse(error_body(ev.status, ev.message, lorax=True))
        finally:
            job.abandon()
