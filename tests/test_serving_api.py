"""The serving API as LoRAX's, TGI's and OpenAI's own clients use it, against a running ``qadapt serve``.

The clients are the real ones: ``lorax-client`` 0.6.3 and ``text-generation`` 0.7.0 in a venv of their
own (tests/client_venv.py; their responses must validate in the clients' own pydantic models, which the
clients do when they parse), and ``openai``. Every documented parameter of each API is sent and checked
against what it specifies, or checked to be refused by name (``test_every_parameter``).

References, all computed here without qadapt's runtime: transformers' forward on the model the GGUF was
written from (greedy tokens, log-probabilities, top tokens, its ``generate(repetition_penalty=...)``),
PEFT for adapters and adapter mixes (``add_weighted_adapter``), OpenAI's documented penalty formula,
``jsonschema`` and ``re`` for constrained output. Tolerances: log-probabilities 1e-4 absolute (float32
forward of an F32 GGUF, the same maths in another order); token ids exactly, with the reference's smallest
top-two gap checked to be far above that tolerance so that argmax cannot flip.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

for _dep in ("starlette", "uvicorn", "httpx", "openai", "llguidance", "jsonschema"):
    pytest.importorskip(_dep)

import httpx  # noqa: E402
import jsonschema  # noqa: E402

import qadapt  # noqa: E402
from client_venv import make_venv, run_client  # noqa: E402
from models import tiny_hf, write_gguf  # noqa: E402
from server_helpers import ServerProc, write_peft_adapter  # noqa: E402

N = 6
P = "the cat sat on"
EOS = 0
LP_TOL = 1e-4
HERMES = ("{%- if tools %}{{ '<|im_start|>system\\nTools: ' }}{% for t in tools %}{{ t['function']['name'] + ' ' }}"
          "{% endfor %}{{ 'Reply with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.<|im_end|>\\n' }}"
          "{%- endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + (m['content'] or '') + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
PERSON = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                            "maximum": 99}},
          "required": ["ok", "n"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["paris", "rome"]}, "days": {"type": "integer", "minimum": 1,
                                                                                  "maximum": 9}},
    "required": ["city", "days"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {},
                                                                          "additionalProperties": False}}}]


# ---------------------------------------------------------------------------------------------- setup
def eos_reachable(hf, ids: list[int], step: int = 3) -> None:
    """Make greedy decoding of ``ids`` end with EOS at ``step``: EOS's output row becomes the row of the
    token greedy picks there, nudged along that position's hidden state (a model that ends its answers)."""
    with torch.no_grad():
        seq = list(ids)
        for _ in range(step - 1):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
        out = hf.model(torch.tensor([seq]))
        h = out.last_hidden_state[0, -1]
        t = int(hf.lm_head(h).argmax())
        w = hf.lm_head.weight
        w[EOS] = w[t] + 2.0 * h / h.dot(h)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from fixtures_s3 import free_port

    d = tmp_path_factory.mktemp("api")
    hf = tiny_hf("llama", seed=3)
    with torch.no_grad():  # a confident model: random init spreads logits by ~0.05, real ones by several units
        hf.lm_head.weight.mul_(30)
    gguf = d / "tiny.gguf"
    write_gguf(hf, gguf)  # the tokenizer first: EOS_PROMPT's ids come from it
    model = qadapt.load(gguf, activate=[])
    eos_ids = model.encode("hello world")
    eos_reachable(hf, eos_ids)
    write_gguf(hf, gguf)
    root = d / "root"
    folders = {n: write_peft_adapter(hf, root / n, 20 + i) for i, n in enumerate("abc")}
    template = d / "hermes.jinja"
    template.write_text(HERMES)
    proc = ServerProc.spawn([str(gguf), "--adapter", f"a={folders['a']}", "--adapter", f"b={folders['b']}",
                             "--allow-runtime-adapters", "--adapter-root", str(root), "--max-batch", "8",
                             "--chat-template", str(template)], free_port(), d / "server.log", verbose=True)
    try:
        proc.wait_ready()
        model = qadapt.load(gguf, activate=[], chat_template=template)
        yield {"url": proc.url, "hf": hf.eval(), "folders": folders, "model": model, "eos_ids": eos_ids,
               "log": proc.log, "peft": {}}
    finally:
        proc.stop()
    assert "Traceback" not in (d / "server.log").read_text()


@pytest.fixture(scope="module")
def clients(request):
    from pathlib import Path

    py = make_venv(Path(request.config.cache.mkdir("client-venv")))
    if isinstance(py, str):
        pytest.skip(py)
    return py


def peft(served, names=(), weights=None, strategy="cat", density=1.0, sign="total"):
    """The reference model: transformers + PEFT with ``names`` active, or their mix (add_weighted_adapter)."""
    key = (tuple(names), weights, strategy, density, sign)
    cache = served["peft"]
    if key in cache:
        return cache[key]
    from peft import PeftModel

    hf = served["hf"]
    if not names:
        cache[key] = hf
        return hf
    pm = PeftModel.from_pretrained(copy.deepcopy(hf), str(served["folders"][names[0]]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(served["folders"][n]), adapter_name=n)
    if weights is None:
        pm.base_model.set_adapter(list(names))
    else:
        pm.add_weighted_adapter(list(names), list(weights), "mix", combination_type=strategy, density=density,
                                majority_sign_method=sign)
        pm.set_adapter("mix")
    cache[key] = pm.eval()
    return cache[key]


def reference(ref, ids, n=N, top=0, process=None, stop_at_eos=True):
    """Greedy decoding by full forwards: tokens, their log-probabilities, top-k ids, prompt logprobs, and the
    smallest top-two logit gap met (``process(logits, generated)``: a logits processor to apply)."""
    seq, toks, lps, tops, gap = list(ids), [], [], [], float("inf")
    with torch.no_grad():
        prompt_lp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), -1)
        prompt = [None] + [float(prompt_lp[i, ids[i + 1]]) for i in range(len(ids) - 1)]
        for _ in range(n):
            logits = ref(torch.tensor([seq])).logits[0, -1].float()
            lp = torch.log_softmax(logits, -1)
            x = process(logits.clone(), toks) if process else logits
            two = torch.topk(x, 2).values
            gap = min(gap, float(two[0] - two[1]))
            t = int(x.argmax())
            toks.append(t)
            lps.append(float(lp[t]))
            tops.append(torch.topk(lp, top).indices.tolist() if top else [])
            seq.append(t)
            if t == EOS and stop_at_eos:
                break
    return {"tokens": toks, "logprobs": lps, "top": tops, "prompt": prompt, "gap": gap}


def text_logprobs(ref: dict) -> list[float]:
    """The reference's log-probabilities of the tokens OpenAI's logprobs list (the end token has no text)."""
    return [lp for t, lp in zip(ref["tokens"], ref["logprobs"]) if t != EOS]


def same_tokens(got: list[int], ref: dict) -> None:
    assert ref["gap"] > 50 * LP_TOL, f"near-tie in the reference ({ref['gap']}): pick another prompt"
    assert got == ref["tokens"]


def post(served, path, body):
    return httpx.post(served["url"] + path, json=body, timeout=120)


def gen(served, **params):
    r = post(served, "/generate", {"inputs": P, "parameters": {"max_new_tokens": N, "details": True, **params}})
    assert r.status_code == 200, r.text
    return r.json()


def ids_of(details) -> list[int]:
    return [t["id"] for t in details["tokens"]]


# ---------------------------------------------------------------------------------------------- clients
def test_lorax_client(served, clients):
    out = run_client(clients, served["url"], f'''
        import asyncio
        from lorax import Client, AsyncClient
        from lorax.types import MergedAdapters
        c = Client(URL)
        P = {P!r}
        record("plain", lambda: c.generate(P, max_new_tokens={N}))
        record("details", lambda: c.generate(P, adapter_id="a", max_new_tokens={N}, details=True,
                                             decoder_input_details=True, return_k_alternatives=3))
        record("stream", lambda: list(c.generate_stream(P, adapter_id="a", max_new_tokens={N}, details=True)))
        record("merged", lambda: c.generate(P, max_new_tokens={N}, merged_adapters=MergedAdapters(
            ids=["a", "b"], weights=[0.6, 0.9], merge_strategy="ties", density=0.5, majority_sign_method="total")))
        record("jit", lambda: c.generate(P, adapter_id="c", adapter_source="local", max_new_tokens={N}))
        record("seeded", lambda: [c.generate(P, do_sample=True, seed=11, max_new_tokens={N}) for _ in range(2)])
        record("drawn_seed", lambda: c.generate(P, do_sample=True, max_new_tokens={N}))
        record("best_of", lambda: c.generate(P, do_sample=True, best_of=3, max_new_tokens={N}, details=True))
        record("json", lambda: c.generate(P, max_new_tokens=40, response_format={{"type": "json_object",
                                                                                  "schema": {PERSON!r}}}))
        record("until_context", lambda: c.generate(P, ignore_eos_token=True))
        record("watermark", lambda: c.generate(P, watermark=True))
        record("missing", lambda: c.generate(P, adapter_id="nowhere", adapter_source="local"))
        async def both():
            ac = AsyncClient(URL)
            return [await ac.generate(P, max_new_tokens={N}),
                    [r async for r in ac.generate_stream(P, max_new_tokens={N})]]
        record("async", lambda: asyncio.run(both()))
    ''')
    ids = served["model"].encode(P)
    base = reference(peft(served), ids, top=3)
    plain = out["plain"]["ok"]
    same_tokens(ids_of(plain["details"]), base)
    assert plain["details"]["generated_tokens"] == len(base["tokens"]) and plain["details"]["seed"] is None

    ref_a = reference(peft(served, ("a",)), ids, top=3)
    d = out["details"]["ok"]["details"]
    same_tokens(ids_of(d), ref_a)
    assert [t["id"] for t in d["prefill"]] == ids and d["prefill"][0]["logprob"] is None
    for got, want in zip(d["prefill"][1:], ref_a["prompt"][1:]):
        assert abs(got["logprob"] - want) < LP_TOL
    for tok, lp, top in zip(d["tokens"], ref_a["logprobs"], ref_a["top"]):
        assert abs(tok["logprob"] - lp) < LP_TOL
        assert [a["id"] for a in tok["alternative_tokens"]] == top
    stream = out["stream"]["ok"]
    assert [e["token"]["id"] for e in stream] == ref_a["tokens"]
    assert "".join(e["token"]["text"] for e in stream) == stream[-1]["generated_text"] == out["details"]["ok"][
        "generated_text"]
    assert stream[-1]["details"]["generated_tokens"] == len(ref_a["tokens"])

    mixed = out["merged"]["ok"]["details"]
    same_tokens(ids_of(mixed), reference(peft(served, ("a", "b"), (0.6, 0.9), "ties", 0.5), ids))
    same_tokens(ids_of(out["jit"]["ok"]["details"]), reference(peft(served, ("c",)), ids))

    s1, s2 = out["seeded"]["ok"]
    assert s1["generated_text"] == s2["generated_text"] and s1["details"]["seed"] == 11
    assert out["drawn_seed"]["ok"]["details"]["seed"] is not None  # reported, so it can be repeated
    bo = out["best_of"]["ok"]["details"]
    assert len(bo["best_of_sequences"]) == 2
    best = sum(t["logprob"] for t in bo["tokens"])
    assert all(best >= sum(t["logprob"] for t in s["tokens"]) for s in bo["best_of_sequences"])

    js = out["json"]["ok"]
    jsonschema.validate(json.loads(js["generated_text"]), PERSON)
    assert js["details"]["finish_reason"] == "eos_token"
    full = out["until_context"]["ok"]["details"]
    assert full["generated_tokens"] + full["prompt_tokens"] == 256 and full["finish_reason"] == "length"

    assert out["watermark"]["error"] == "ValidationError" and "watermark" in out["watermark"]["message"]
    assert out["missing"]["error"] == "NotFoundError" and "nowhere" in out["missing"]["message"]
    one, chunks = out["async"]["ok"]
    assert one["generated_text"] == plain["generated_text"] == "".join(c["token"]["text"] for c in chunks)


def test_text_generation_client(served, clients):
    out = run_client(clients, served["url"], f'''
        from text_generation import Client
        from text_generation.types import Message, Grammar
        c = Client(URL)
        P = {P!r}
        record("gen", lambda: c.generate(P, max_new_tokens={N}, decoder_input_details=True, top_n_tokens=2))
        record("stream", lambda: list(c.generate_stream(P, max_new_tokens={N}, top_n_tokens=2)))
        record("stop", lambda: c.generate(P, max_new_tokens={N}, stop_sequences=["QQQ"]))
        record("json", lambda: c.generate(P, max_new_tokens=40, grammar=Grammar(type="json", value={PERSON!r})))
        record("regex", lambda: c.generate(P, max_new_tokens=20, grammar=Grammar(type="regex", value="(yes|no)-[0-9]")))
        record("truncate", lambda: c.generate(P, max_new_tokens={N}, truncate=2))
        msgs = [Message(role="user", content="hi")]
        record("chat", lambda: c.chat(messages=msgs, max_tokens={N}, temperature=0.5, seed=3))
        record("chat_stream", lambda: list(c.chat(messages=msgs, max_tokens={N}, temperature=0.5, seed=3, stream=True)))
        record("tool", lambda: c.chat(messages=msgs, max_tokens=40, tools={TOOLS!r}, tool_choice="lookup"))
    ''')
    ids = served["model"].encode(P)
    base = reference(peft(served), ids, top=2)
    g = out["gen"]["ok"]["details"]
    same_tokens(ids_of(g), base)
    assert [[t["id"] for t in step] for step in g["top_tokens"]] == base["top"]
    assert [t["id"] for t in g["prefill"]] == ids
    s = out["stream"]["ok"]
    assert [e["token"]["id"] for e in s] == base["tokens"] and [[t["id"] for t in e["top_tokens"]] for e in s] == base["top"]
    assert out["stop"]["ok"]["details"]["finish_reason"] in ("length", "eos_token")
    jsonschema.validate(json.loads(out["json"]["ok"]["generated_text"]), PERSON)
    assert re.fullmatch(r"(yes|no)-[0-9]", out["regex"]["ok"]["generated_text"])
    t = out["truncate"]["ok"]["details"]
    same_tokens(ids_of(t), reference(peft(served), ids[-2:]))
    chat = out["chat"]["ok"]
    streamed = "".join(ch["choices"][0]["delta"]["content"] or "" for ch in out["chat_stream"]["ok"])
    assert streamed == chat["choices"][0]["message"]["content"]
    call = out["tool"]["ok"]["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "lookup"
    jsonschema.validate(json.loads(call["function"]["arguments"]), TOOLS[0]["function"]["parameters"])


def test_openai_client(served):
    import openai

    c = openai.OpenAI(base_url=served["url"] + "/v1", api_key="none", max_retries=0, timeout=120)
    ids = served["model"].encode(P)
    base = reference(peft(served), ids, top=2)
    r = c.completions.create(model="tiny", prompt=P, max_tokens=N, temperature=0, logprobs=2, echo=True)
    ch = r.choices[0]
    assert ch.text.startswith(P)
    lp = ch.logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(ids) + len(base["tokens"])
    for got, want in zip(lp.token_logprobs[1:], base["prompt"][1:] + base["logprobs"]):
        assert abs(got - want) < LP_TOL
    shown = [(o, t) for o, t in zip(lp.text_offset, lp.tokens) if "\ufffd" not in t and not re.fullmatch("<.+>", t)]
    assert len(shown) > len(ids) and all(ch.text[o:].startswith(t) for o, t in shown)  # (special tokens: no text)

    many = c.completions.create(model="tiny", prompt=P, max_tokens=N, n=3, temperature=1.0, seed=5)
    assert [x.index for x in many.choices] == [0, 1, 2] and len({x.text for x in many.choices}) > 1
    again = c.completions.create(model="tiny", prompt=P, max_tokens=N, n=3, temperature=1.0, seed=5)
    assert [x.text for x in again.choices] == [x.text for x in many.choices]
    assert many.usage.prompt_tokens == len(ids)

    chat = c.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=N,
                                     temperature=0, logprobs=True, top_logprobs=2)
    chat_ids = served["model"].encode_chat([{"role": "user", "content": "hi"}])
    ref_a = reference(peft(served, ("a",)), chat_ids, top=2)
    content = chat.choices[0].logprobs.content
    assert [x.logprob for x in content] == pytest.approx(text_logprobs(ref_a), abs=LP_TOL)
    assert all(len(x.top_logprobs) == 2 for x in content)

    rf = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=40,
                                   temperature=0, response_format={"type": "json_schema", "json_schema": {
                                       "name": "p", "schema": PERSON}})
    jsonschema.validate(json.loads(rf.choices[0].message.content), PERSON)

    req = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "weather?"}], max_tokens=80,
                                    temperature=0, tools=TOOLS, tool_choice="required")
    assert req.choices[0].finish_reason == "tool_calls"
    for call in req.choices[0].message.tool_calls:
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
        jsonschema.validate(json.loads(call.function.arguments), schema)

    chunks = list(c.chat.completions.create(model="b", messages=[{"role": "user", "content": "hi"}], max_tokens=N,
                                            n=2, temperature=0, stream=True, stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    for k in chunks:
        for x in k.choices:
            texts[x.index] += x.delta.content or ""
    whole = c.chat.completions.create(model="b", messages=[{"role": "user", "content": "hi"}], max_tokens=N,
                                      temperature=0)
    assert texts[0] == texts[1] == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 2 * whole.usage.completion_tokens

    # weighted sums: OpenAI `adapters` with weights and llama.cpp's `lora` list are PEFT's exact `cat`
    listed = httpx.get(served["url"] + "/lora-adapters").json()
    a_id = next(x["id"] for x in listed if x["name"] == "a")
    ref_sum = reference(peft(served, ("a", "b"), (0.5, 1.5), "cat"), ids)
    for extra in ({"adapters": {"a": 0.5, "b": 1.5}}, {"lora": [{"id": a_id, "scale": 0.5}, {"id": "b", "scale": 1.5}]}):
        r = post(served, "/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": N, "temperature": 0,
                                             "logprobs": 0, **extra})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(text_logprobs(ref_sum),
                                                                                    abs=LP_TOL)


# ---------------------------------------------------------------------------------------------- every parameter
def openai_penalised(served, freq, pres, bias=None):
    def process(logits, generated):
        counts = torch.zeros_like(logits)
        for t in generated:
            counts[t] += 1
        logits = logits - counts * freq - (counts > 0).float() * pres
        for k, v in (bias or {}).items():
            logits[k] += v
        return logits

    return process


def test_every_parameter(served):
    """Each documented parameter of each endpoint, sent once: its specified effect, or a refusal naming it."""
    ids = served["model"].encode(P)
    base = reference(peft(served), ids)
    greedy_text = served["model"].tokenizer.decode(base["tokens"])

    # ---- LoRAX / TGI /generate
    assert ids_of(gen(served, adapter_id="a")["details"]) == reference(peft(served, ("a",)), ids)["tokens"]
    assert gen(served, return_full_text=True)["generated_text"] == P + greedy_text
    assert "details" not in post(served, "/generate", {"inputs": P, "parameters": {"max_new_tokens": 2}}).json()
    assert gen(served, max_new_tokens=3)["details"]["generated_tokens"] == 3
    for sampler in ({"top_k": 1}, {"top_p": 1e-6}, {"temperature": 1e-4}):
        assert ids_of(gen(served, do_sample=True, seed=1, **sampler)["details"]) == base["tokens"], sampler
    sampled = [ids_of(gen(served, do_sample=True, seed=s)["details"]) for s in (1, 2, 1)]
    assert sampled[0] == sampled[2] != sampled[1] and sampled[0] != base["tokens"]
    typical = {tuple(ids_of(gen(served, do_sample=True, typical_p=1e-4, seed=s)["details"])) for s in (1, 2, 3)}
    assert len(typical) == 1  # a vanishing typical mass keeps one token per step, whatever the seed
    with torch.no_grad():
        rep = served["hf"].generate(torch.tensor([ids]), max_new_tokens=N, do_sample=False, repetition_penalty=1.8,
                                    pad_token_id=EOS, eos_token_id=None)[0, len(ids):].tolist()
    assert ids_of(gen(served, repetition_penalty=1.8)["details"]) == rep
    assert ids_of(gen(served, frequency_penalty=0.9)["details"]) == reference(
        peft(served), ids, process=openai_penalised(served, 0.9, 0.0))["tokens"]
    stop = served["model"].tokenizer.decode(base["tokens"][1:3])
    stopped = gen(served, stop=[stop])
    assert stopped["generated_text"].endswith(stop) and stopped["details"]["finish_reason"] == "stop_sequence"
    trunc = gen(served, truncate=2, decoder_input_details=True)["details"]
    assert trunc["prompt_tokens"] == 2 and ids_of(trunc) == reference(peft(served), ids[-2:])["tokens"]
    eos_ids = served["eos_ids"]
    ended = post(served, "/generate", {"inputs": "hello world", "parameters": {"max_new_tokens": N, "details": True}})
    ended = ended.json()["details"]
    assert ended["finish_reason"] == "eos_token" and ended["tokens"][-1]["special"] and ended["tokens"][-1]["id"] == EOS
    assert ids_of(ended) == reference(peft(served), eos_ids)["tokens"]
    kept = post(served, "/generate", {"inputs": "hello world", "parameters": {
        "max_new_tokens": N, "details": True, "ignore_eos_token": True}}).json()["details"]
    assert kept["finish_reason"] == "length" and kept["generated_tokens"] == N and EOS in ids_of(kept)
    top = gen(served, top_n_tokens=2, return_k_alternatives=2)["details"]
    assert all(len(t["alternative_tokens"]) == 2 for t in top["tokens"]) and len(top["top_tokens"]) == len(top["tokens"])
    for bad, word in [({"watermark": True}, "watermark"), ({"adapter_source": "pbase", "adapter_id": "x"}, "pbase"),
                      ({"frobnicate": 1}, "frobnicate"), ({"best_of": 2}, "best_of"),
                      ({"best_of": 2, "do_sample": True, "seed": 3}, "seed"), ({"typical_p": 0}, "typical_p"),
                      ({"adapter_id": "a", "merged_adapters": {"ids": ["a"], "weights": [1.0]}}, "merged_adapters"),
                      ({"merged_adapters": {"ids": ["a", "b"], "weights": [1.0]}}, "weights"),
                      ({"merged_adapters": {"ids": ["a", "b"], "weights": [1, 1], "merge_strategy": "svd"}},
                       "merge_strategy"),
                      ({"response_format": {"type": "json_object"}, "grammar": {"type": "regex", "value": "a"}},
                       "grammar"),
                      ({"grammar": {"type": "regex", "value": "(unclosed"}}, "regular expression"),
                      ({"stop": ["x"] * 17}, "stop")]:
        r = post(served, "/generate", {"inputs": P, "parameters": {"max_new_tokens": 2, **bad}})
        assert r.status_code == 422 and r.json()["error_type"] == "validation", (bad, r.text)
        assert word in r.json()["error"], (bad, r.text)

    # ---- OpenAI /v1/completions and /v1/chat/completions
    body = {"model": "tiny", "prompt": P, "max_tokens": N, "temperature": 0}

    def comp(**kw):
        r = post(served, "/v1/completions", {**body, **kw})
        assert r.status_code == 200, (kw, r.text)
        return r.json()

    assert comp(logprobs=0)["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(text_logprobs(base),
                                                                                       abs=LP_TOL)
    assert comp(model="a")["choices"][0]["text"] == served["model"].tokenizer.decode(
        reference(peft(served, ("a",)), ids)["tokens"])
    assert comp(adapters=["a", "b"], logprobs=0)["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(
        text_logprobs(reference(peft(served, ("a", "b")), ids)), abs=LP_TOL)
    assert comp(max_tokens=2)["usage"]["completion_tokens"] == 2
    for sampler in ({"top_k": 1}, {"top_p": 1e-6}):
        assert comp(temperature=1.0, seed=4, **sampler)["choices"][0]["text"] == greedy_text
    hot = [comp(temperature=1.5, seed=s)["choices"][0]["text"] for s in (4, 4, 9)]
    assert hot[0] == hot[1] != hot[2]
    assert comp(repetition_penalty=1.8)["choices"][0]["text"] == served["model"].tokenizer.decode(rep)
    pen = reference(peft(served), ids, process=openai_penalised(served, 1.2, 0.8, {5: 3.0}))
    assert comp(frequency_penalty=1.2, presence_penalty=0.8, logit_bias={"5": 3.0}, logprobs=0)["choices"][0][
        "logprobs"]["token_logprobs"] == pytest.approx(text_logprobs(pen), abs=LP_TOL)
    forced = comp(logit_bias={"70": 100})["choices"][0]["text"]
    assert forced == served["model"].tokenizer.decode([70] * N)
    cut = comp(stop=[stop])["choices"][0]
    assert cut["text"] == greedy_text[:greedy_text.index(stop)] and cut["finish_reason"] == "stop"
    assert comp(stop=[stop], include_stop_str_in_output=True)["choices"][0]["text"].endswith(stop)
    eos_first = comp(logit_bias={str(EOS): 100})
    assert eos_first["choices"][0]["text"] == "" and eos_first["usage"]["completion_tokens"] == 1
    assert comp(logit_bias={str(EOS): 100}, ignore_eos=True)["usage"]["completion_tokens"] == N
    assert len(comp(n=2, temperature=1.0, seed=1)["choices"]) == 2
    assert len(comp(n=2, best_of=4, temperature=1.0, seed=1)["choices"]) == 2
    assert comp(echo=True)["choices"][0]["text"] == P + greedy_text
    assert comp(user="someone", metadata=None)["choices"][0]["text"] == greedy_text  # informational only
    assert re.fullmatch("[ab]{3}", comp(guided_regex="[ab]{3}", max_tokens=10)["choices"][0]["text"])
    assert comp(guided_choice=["left", "right"], max_tokens=10)["choices"][0]["text"] in ("left", "right")
    assert comp(guided_grammar='start: "x" "y"+', max_tokens=4)["choices"][0]["text"].startswith("xy")
    jsonschema.validate(json.loads(comp(guided_json=PERSON, max_tokens=40)["choices"][0]["text"]), PERSON)
    obj = comp(response_format={"type": "json_object"}, max_tokens=12)["choices"][0]
    assert obj["text"].startswith("{") and (obj["finish_reason"] == "length" or isinstance(json.loads(obj["text"]), dict))
    sse = httpx.post(served["url"] + "/v1/completions", json={**body, "stream": True, "stream_options": {
        "include_usage": True}}, timeout=60).text
    events = [json.loads(x[6:]) for x in sse.split("\n\n") if x.startswith("data: {")]
    assert "".join(c["text"] for e in events for c in e["choices"]) == greedy_text and events[-1]["usage"]
    for bad, word in [({"suffix": "x"}, "suffix"), ({"store": True}, "store"), ({"logprobs": 21}, "logprobs"),
                      ({"n": 2, "best_of": 1}, "best_of"), ({"frobnicate": 1}, "frobnicate"),
                      ({"adapters": ["a"], "lora": [{"id": 0, "scale": 1}]}, "lora"),
                      ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
                      ({"logit_bias": {"99999": 1}}, "vocabulary"), ({"lora": [{"id": 99, "scale": 1}]}, "lora id"),
                      ({"stream_options": {"x": 1}}, "stream_options")]:
        r = post(served, "/v1/completions", {**body, **bad})
        assert r.status_code in (400, 404), (bad, r.text)
        assert word in r.json()["error"]["message"], (bad, r.text)

    msgs = [{"role": "user", "content": "hi"}]
    chat_ids = served["model"].encode_chat(msgs)

    def chat(**kw):
        r = post(served, "/v1/chat/completions", {"model": "tiny", "messages": msgs, "max_tokens": N,
                                                  "temperature": 0, **kw})
        assert r.status_code == 200, (kw, r.text)
        return r.json()

    assert chat(max_completion_tokens=2, max_tokens=None)["usage"]["completion_tokens"] == 2
    assert chat(tools=TOOLS, tool_choice="none")["usage"]["prompt_tokens"] == len(chat_ids)  # tools not shown
    assert chat(tools=TOOLS)["usage"]["prompt_tokens"] > len(chat_ids)  # rendered by the template
    named = chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "lookup"}}, max_tokens=40)
    call = named["choices"][0]["message"]["tool_calls"]
    assert len(call) == 1 and call[0]["function"]["name"] == "lookup"
    one = chat(tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=80)
    assert len(one["choices"][0]["message"]["tool_calls"]) == 1
    lp = chat(logprobs=True, top_logprobs=3)["choices"][0]["logprobs"]["content"]
    assert all(len(x["top_logprobs"]) == 3 and x["bytes"] for x in lp)
    for bad in ({"tool_choice": "lookup"}, {"tools": TOOLS, "tool_choice": "nothing"}, {"top_logprobs": 2},
                {"functions": [{"name": "x"}]}, {"response_format": {"type": "json_schema"}},
                {"messages": [{"role": "user", "content": "x", "audio": {"id": "1"}}]}):
        r = post(served, "/v1/chat/completions", {"model": "tiny", "messages": msgs, "max_tokens": 2, **bad})
        assert r.status_code == 400, (bad, r.text)
        assert any(w in r.json()["error"]["message"] for w in bad), (bad, r.text)


def test_router_interop(served):
    """vLLM's load/unload endpoints and lora_requests_info gauge; LoRAX's /info; llama.cpp's /lora-adapters."""
    url = served["url"]
    info = httpx.get(url + "/info").json()
    assert info["max_total_tokens"] == 256 and "a" in info["adapters"] and info["max_best_of"] >= 2
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": "c"})
    assert r.status_code == 200
    assert "late" in [x["name"] for x in httpx.get(url + "/lora-adapters").json()]
    metrics = httpx.get(url + "/metrics").text
    line = next(x for x in metrics.splitlines() if x.startswith("vllm:lora_requests_info{"))
    assert 'running_lora_adapters=""' in line and 'waiting_lora_adapters=""' in line and "max_lora=" in line
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 200
    assert httpx.post(url + "/v1/completions", json={"model": "late", "prompt": P}).status_code == 404


def test_api_token_reaches_the_hub_download(monkeypatch, tmp_path):
    """LoRAX's per-request ``api_token`` is the token the Hub download uses (and is never logged)."""
    from qadapt.server.registry import AdapterRegistry

    seen = {}

    def fake_resolve(source, kind, token=None, **kw):
        seen.update(source=source, kind=kind, token=token)
        raise qadapt.errors.SourceError("stop here")

    monkeypatch.setattr("qadapt.adapters.sources.resolve_adapter", fake_resolve)

    class _Model:
        adapters: dict = {}

    reg = AdapterRegistry(_Model())
    with pytest.raises(qadapt.errors.SourceError):
        reg.ensure("org/private", "org/private", "hub", "hf_secret")
    assert seen == {"source": "org/private", "kind": "hub", "token": "hf_secret"}


def test_alora_through_the_server(served, tmp_path):
    """An aLoRA adapter loaded at run time: the server finds its invocation in each prompt and applies it from
    there through the generated tokens (reference: PEFT, which finds the same invocation in the input)."""
    import shutil

    inv = served["model"].encode(" cat sat", add_special=False)
    folder = shutil.copytree(served["folders"]["c"], served["folders"]["c"].parent / "alora")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(alora_invocation_tokens=inv, task_type="CAUSAL_LM")
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    r = post(served, "/v1/load_lora_adapter", {"lora_name": "act", "lora_path": "alora"})
    assert r.status_code == 200, r.text
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(served["hf"]), str(folder)).eval()
    for prompt in ("hello world the cat sat on", "the cat sat on a mat hello"):
        ids = served["model"].encode(prompt)
        got = ids_of(post(served, "/generate", {"inputs": prompt, "parameters": {
            "adapter_id": "act", "max_new_tokens": N, "details": True}}).json()["details"])
        same_tokens(got, reference(pm, ids))
    plain = post(served, "/generate", {"inputs": "hello world", "parameters": {"adapter_id": "act",
                                                                               "max_new_tokens": N, "details": True}})
    assert ids_of(plain.json()["details"]) == reference(peft(served), served["model"].encode("hello world"))["tokens"]
