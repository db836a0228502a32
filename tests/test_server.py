"""``qadapt serve`` as a real subprocess, driven by the official ``openai`` client and httpx.

Reference: qadapt's own Python API, single-sequence and unbatched: ``Model.generate(prompt,
max_new_tokens=N)`` (greedy) with the request's adapters active (its equivalence with PEFT and
transformers is tests/test_lora.py's job). Tolerance: none, token ids and texts must be equal.
The server decodes many rows per forward, each with its own adapters and position; measured on
this model, a mixed four-adapter decode step differs from single-sequence logits by at most
7.8e-7, while the smallest gap between the top two logits over every greedy step compared here
is 2e-4 (250x more), so argmax cannot flip. If a new prompt or seed brings a near-tie, pick
another prompt rather than loosen the check. S3 goes through moto's real HTTP server
(tests/fixtures_s3.py).
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest

for _dep in ("starlette", "uvicorn", "httpx", "openai"):  # the `serve` extra and the test clients
    pytest.importorskip(_dep)

import httpx  # noqa: E402

import qadapt  # noqa: E402

from models import CHATML, chatml_file, tiny_hf, write_quantized  # noqa: E402
from server_helpers import ServerProc, metric, write_peft_adapter  # noqa: E402

pytest_plugins = ["fixtures_s3"]

KEY = "sk-test-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["the cat sat", "hello world", "a model", "lora quant"]
N = 8


@pytest.fixture(scope="module")
def env(tmp_path_factory, moto_server):
    """A tiny Q8_0 llama GGUF, adapters under an adapter root, and two servers (started in parallel)."""
    from fixtures_s3 import TEST_ENV, free_port  # after pytest_plugins registered the module

    d = tmp_path_factory.mktemp("serve")
    hf = tiny_hf("llama", seed=3)
    gguf = d / "tiny.gguf"
    write_quantized(hf, gguf, "Q8_0", seed=4)
    root = d / "root"
    ads = {"a": write_peft_adapter(hf, root / "a", 10),
           "b": write_peft_adapter(hf, root / "b", 11, r=8, alpha=4, targets=("q_proj", "v_proj", "down_proj")),
           "c": write_peft_adapter(hf, root / "c", 12, targets=("q_proj", "o_proj", "up_proj"))}
    write_peft_adapter(hf, root / "big", 13, r=16, targets=("q_proj",))
    outside = write_peft_adapter(hf, d / "outside", 14)
    (root / "escape").symlink_to(outside, target_is_directory=True)
    drop = ("AWS_ENDPOINT_URL_S3", "S3_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION")
    s3_env = {**{k: v for k, v in os.environ.items() if k not in drop}, **TEST_ENV,
              "AWS_ENDPOINT_URL": moto_server.url, "QADAPT_CACHE": str(d / "cache")}
    main = ServerProc.spawn([str(gguf), "--adapter", f"a={ads['a']}", "--adapter", f"b={ads['b']}",
                             "--api-key", KEY, "--allow-runtime-adapters", "--adapter-root", str(root),
                             "--max-batch", "8", "--max-adapters", "4", "--max-rank", "8",
                             "--chat-template", str(chatml_file(d))],
                            free_port(), d / "main.log", env=s3_env, verbose=True)
    small = ServerProc.spawn([str(gguf), "--adapter", f"a={ads['a']}", "--max-batch", "1", "--max-queue", "1",
                              "--served-model-name", "tiny-small"], free_port(), d / "small.log")
    try:
        main.wait_ready()
        small.wait_ready()
        model = qadapt.load(gguf, adapters={n: str(p) for n, p in ads.items()}, activate=[], chat_template=chatml_file(d))
        yield {"main": main, "small": small, "model": model, "ads": ads, "root": root, "outside": outside,
               "moto": moto_server, "dir": d}
    finally:
        main.stop()
        small.stop()


def ref(env, adapters, prompt, n=N):
    """The Python API's greedy generation with exactly ``adapters`` active (cached per module)."""
    cache = env.setdefault("refs", {})
    key = (tuple(adapters), prompt, n)
    if key not in cache:
        m = env["model"]
        m.activate_adapters(list(adapters))
        cache[key] = m.generate(list(prompt) if isinstance(prompt, tuple) else prompt, max_new_tokens=n)
    return cache[key]


def oai(env):
    import openai

    return openai.OpenAI(base_url=env["main"].url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(env, path, body, server="main", headers=AUTH, **kw):
    return httpx.post(env[server].url + path, json=body, headers=headers, timeout=60, **kw)


def lorax_ids(env, adapter_id, prompt, source=None, n=N):
    params = {"adapter_id": adapter_id, "max_new_tokens": n, "details": True}
    if source:
        params["adapter_source"] = source
    r = post(env, "/generate", {"inputs": prompt, "parameters": params})
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"] if not t["special"]], r.json()


# ------------------------------------------------------------------------------------------- batch step
def test_batch_stepper_matches_single_sequence(env):
    """qadapt.runtime.batch in process: four sequences with four adapter sets in scattered cache rows (the
    gather path) and in consecutive rows (the slice path), decoded in one forward, against each sequence's
    own full forward (Model.logits with its adapters active). Tolerance 1e-5 on logits of magnitude ~1:
    float32 rounding of differently shaped matmuls (measured 7.8e-7)."""
    import torch

    from qadapt.adapters.lora import AdapterContext
    from qadapt.runtime.batch import BatchStepper

    m = env["model"]

    def forward(ids, pos, cache, rows):
        return m.decoder(ids, pos, cache, ctx=AdapterContext(rows=rows), last_only=True).logits[:, -1]

    sets = [(), ("a",), ("b",), ("c", "a")]
    seqs = [m.tokenizer.encode(p) for p in PROMPTS]
    for slots in ([5, 0, 3, 2], [0, 1, 2, 3]):
        st = BatchStepper(forward, m.new_cache(64, 6))
        for slot, ids, names in zip(slots, seqs, sets):
            st.prefill(slot, ids[:-1], names)
        got = st.decode(slots, [s[-1] for s in seqs], [len(s) - 1 for s in seqs], sets)
        for i, (ids, names) in enumerate(zip(seqs, sets)):
            m.activate_adapters(list(names))
            want = m.logits(torch.tensor([ids]))[0, -1]
            torch.testing.assert_close(got[i], want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- OpenAI
def test_completions_match_python_api_per_adapter_and_base(env):
    """Non-streamed and streamed completions for the base (by stem and as `base`), each adapter, and two
    adapters at once (``adapters`` field): same text and token count as Model.generate."""
    client = oai(env)
    cases = [("tiny", None, ()), ("base", None, ()), ("a", None, ("a",)), ("b", None, ("b",)),
             ("tiny", ["a", "b"], ("a", "b"))]
    for i, (model, extra, active) in enumerate(cases):
        prompt = PROMPTS[i % len(PROMPTS)]
        want = ref(env, active, prompt)
        kw = {"extra_body": {"adapters": extra}} if extra else {}
        got = client.completions.create(model=model, prompt=prompt, max_tokens=N, temperature=0, **kw)
        assert got.choices[0].text == want.text, (model, extra)
        assert got.usage.completion_tokens == len(want.token_ids)
        assert got.usage.prompt_tokens == len(env["model"].tokenizer.encode(prompt))
        assert got.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=N, temperature=0, stream=True,
                                           stream_options={"include_usage": True}, **kw)
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
        assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    # the adapters matter: the same prompt gives different text per adapter
    p = PROMPTS[0]
    assert len({tuple(ref(env, act, p).token_ids) for act in [(), ("a",), ("b",), ("c",)]}) == 4


def test_chat_uses_template_and_matches(env):
    """Chat through the server's --chat-template (the tiny GGUF has none), streamed and not, against the Python
    API on the same rendered ids; the server started without a template refuses chat by name (400)."""
    client = oai(env)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello cat"}]
    ids = env["model"].encode_chat(messages)
    assert env["model"].tokenizer.render_chat(messages, CHATML).startswith("<|im_start|>system\nbe brief")
    for model, active in (("b", ("b",)), ("base", ())):
        want = ref(env, active, tuple(ids))
        got = client.chat.completions.create(model=model, messages=messages, max_tokens=N, temperature=0)
        assert got.choices[0].message.content == want.text
        assert got.usage.prompt_tokens == len(ids)
        assert got.choices[0].message.role == "assistant"
        stream = client.chat.completions.create(model=model, messages=messages, max_tokens=N, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == want.text
    seeded = [client.chat.completions.create(model="a", messages=messages, max_tokens=N, temperature=0.9,
                                             seed=7).choices[0].message.content for _ in range(2)]
    assert seeded[0] == seeded[1]  # a seed makes sampling reproducible
    r = post(env, "/v1/chat/completions", {"model": "a", "messages": messages}, server="small", headers={})
    assert r.status_code == 400 and "chat template" in r.text and "--chat-template" in r.text


def test_models_endpoint(env):
    ids = {m.id for m in oai(env).models.list()}
    assert {"tiny", "a", "b"} <= ids


# ------------------------------------------------------------------------------------------- LoRAX
def test_lorax_generate_local_and_s3_just_in_time(env):
    """`/generate` with adapter_id + adapter_source: local (inside --adapter-root) and s3 (moto over HTTP)
    are fetched on first use; token ids equal the Python API's; `/generate_stream` too."""
    prompt = PROMPTS[1]
    ids, body = lorax_ids(env, "c", prompt, "local")
    want = ref(env, ("c",), prompt)
    assert ids == want.token_ids and body["generated_text"] == want.text
    assert body["details"]["finish_reason"] in ("length", "eos_token")

    s3 = env["moto"].client()
    s3.create_bucket(Bucket="loras")
    for f in env["ads"]["a"].iterdir():
        s3.put_object(Bucket="loras", Key=f"team/a/{f.name}", Body=f.read_bytes())
    ids, body = lorax_ids(env, "s3://loras/team/a", prompt, "s3")
    assert ids == ref(env, ("a",), prompt).token_ids

    events = []
    with httpx.stream("POST", env["main"].url + "/generate_stream", headers=AUTH, timeout=60,
                      json={"inputs": prompt, "parameters": {"adapter_id": "c", "max_new_tokens": N}}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    assert [e["token"]["id"] for e in events if not e["token"]["special"]] == want.token_ids
    assert events[-1]["generated_text"] == want.text and all(e["generated_text"] is None for e in events[:-1])
    assert "".join(e["token"]["text"] for e in events) == want.text
    r = post(env, "/generate", {"inputs": prompt, "parameters": {"adapter_id": "s3://loras/team/missing",
                                                                 "adapter_source": "s3"}})
    assert r.status_code == 404 and "s3://loras/team/missing" in r.json()["error"]


# ------------------------------------------------------------------------------------------- batching
def test_concurrent_mixed_adapters_are_batched_and_isolated(env):
    """16 concurrent requests over four adapter sets: each gets its own adapter's text, and the engine
    decoded several rows per forward (metrics)."""
    r = post(env, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": "c", "load_inplace": True})
    assert r.status_code == 200, r.text
    jobs = [(["a", "b", "c", "base"][i % 4], PROMPTS[i % 3]) for i in range(16)]
    want = {(m, p): ref(env, () if m == "base" else (m,), p).text for m, p in set(jobs)}
    before = httpx.get(env["main"].url + "/metrics", headers=AUTH).text

    async def go():
        async with httpx.AsyncClient(base_url=env["main"].url, headers=AUTH, timeout=120) as c:
            rs = await asyncio.gather(*[c.post("/v1/completions", json={"model": m, "prompt": p, "max_tokens": N,
                                                                        "temperature": 0}) for m, p in jobs])
        return [r.json()["choices"][0]["text"] for r in rs]

    got = asyncio.run(go())
    assert got == [want[j] for j in jobs]
    after = httpx.get(env["main"].url + "/metrics", headers=AUTH).text
    assert metric(after, "qadapt_decode_rows_max") > 1
    steps = metric(after, "qadapt_decode_steps_total") - metric(before, "qadapt_decode_steps_total")
    rows = metric(after, "qadapt_decode_rows_total") - metric(before, "qadapt_decode_rows_total")
    assert rows / steps > 1.5  # the 16 requests shared forwards


def test_request_keeps_its_adapter_version(env):
    """A stream started on `v` (weights of a) finishes with a's text although `v` is replaced by b's
    weights and then unloaded meanwhile; the old version leaves the model once the stream ends."""
    n = 64
    prompt = PROMPTS[2]
    want_a, want_b = ref(env, ("a",), prompt, n), ref(env, ("b",), prompt, 12)
    assert len(want_a.token_ids) == n  # no early EOS: the stream is long enough to overlap the swaps
    r = post(env, "/v1/load_lora_adapter", {"lora_name": "v", "lora_path": "a"})
    assert r.status_code == 200, r.text
    old = r.json()["version"]
    url = env["main"].url
    with httpx.stream("POST", url + "/v1/completions", headers=AUTH, timeout=60,
                      json={"model": "v", "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        r2 = post(env, "/v1/load_lora_adapter", {"lora_name": "v", "lora_path": str(env["ads"]["b"]),
                                                  "load_inplace": True})
        assert r2.status_code == 200, r2.text
        held = httpx.get(url + "/v1/lora_adapters", headers=AUTH).json()["retired_in_use"]
        assert post(env, "/v1/completions", {"model": "v", "prompt": prompt, "max_tokens": 12,
                                             "temperature": 0}).json()["choices"][0]["text"] == want_b.text
        assert post(env, "/v1/unload_lora_adapter", {"lora_name": "v"}).status_code == 200
        rest = [line for line in lines if line.startswith("data:")]
    chunks = [json.loads(x[5:]) for x in [first, *rest] if x.strip() != "data: [DONE]"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want_a.text
    assert held == [old]  # the replaced version stayed loaded for the running stream
    retired = httpx.get(url + "/v1/lora_adapters", headers=AUTH).json()["retired_in_use"]
    assert retired == []  # and left the model when the stream ended
    r = post(env, "/v1/completions", {"model": "v", "prompt": prompt, "max_tokens": 2})
    assert r.status_code == 404 and "`v`" in r.json()["error"]["message"]
    listing = httpx.get(url + "/v1/lora_adapters", headers=AUTH).json()
    assert "v" not in [a["name"] for a in listing["adapters"]]


def test_client_disconnect_cancels_the_row(env):
    url = env["main"].url
    before = metric(httpx.get(url + "/metrics", headers=AUTH).text, "qadapt_requests_total",
                    'adapter="a",finish="cancelled"')
    with httpx.stream("POST", url + "/v1/completions", headers=AUTH, timeout=60,
                      json={"model": "a", "prompt": PROMPTS[2], "max_tokens": 64, "temperature": 0,
                            "stream": True}) as r:
        next(r.iter_lines())
    for _ in range(50):
        text = httpx.get(url + "/metrics", headers=AUTH).text
        if metric(text, "qadapt_requests_total", 'adapter="a",finish="cancelled"') > before:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert metric(text, "qadapt_requests_total", 'adapter="a",finish="cancelled"') > before
    assert metric(text, "qadapt_running_requests") == 0


# ------------------------------------------------------------------------------------------- management
def test_load_unload_activate_and_limits(env):
    url = env["main"].url
    r = post(env, "/v1/load_lora_adapter", {"lora_name": "c2", "lora_path": "c"})
    assert r.status_code == 200, r.text
    assert post(env, "/v1/load_lora_adapter", {"lora_name": "c2", "lora_path": "c"}).status_code == 400  # exists
    names = [a["name"] for a in httpx.get(url + "/v1/lora_adapters", headers=AUTH).json()["adapters"]]
    assert "c2" in names
    prompt = PROMPTS[0]
    # the default set: requests naming the base's stem get it, `base` stays bare
    r = post(env, "/activate_adapters", {"adapter_names": ["c2"]})
    assert r.status_code == 200 and r.json()["adapter_names"] == ["c2"]

    def text(model):
        body = {"model": model, "prompt": prompt, "max_tokens": N, "temperature": 0}
        return post(env, "/v1/completions", body).json()["choices"][0]["text"]

    assert text("tiny") == ref(env, ("c",), prompt).text
    assert text("base") == ref(env, (), prompt).text
    assert post(env, "/activate_adapters", {"adapter_names": ["nope"]}).status_code == 404
    assert post(env, "/v1/unload_lora_adapter", {"lora_name": "c2"}).status_code == 200
    assert text("tiny") == ref(env, (), prompt).text  # unloading dropped it from the default set
    assert post(env, "/v1/unload_lora_adapter", {"lora_name": "c2"}).status_code == 404
    # rank limit, read before loading
    r = post(env, "/v1/load_lora_adapter", {"lora_name": "big", "lora_path": "big"})
    assert r.status_code == 400 and "rank 16" in r.json()["error"]["message"]
    # LRU: more adapters than --max-adapters 4; the evicted ones come back on use
    for i in range(4):
        assert post(env, "/v1/load_lora_adapter", {"lora_name": f"x{i}", "lora_path": "c"}).status_code == 200
    listing = httpx.get(url + "/v1/lora_adapters", headers=AUTH).json()["adapters"]
    assert sum(a["resident"] for a in listing) <= 4
    assert not next(a for a in listing if a["name"] == "a")["resident"]
    assert metric(httpx.get(url + "/metrics", headers=AUTH).text, "qadapt_adapter_evictions_total") > 0
    assert text("a") == ref(env, ("a",), prompt).text  # reloaded from its folder
    for i in range(4):
        post(env, "/v1/unload_lora_adapter", {"lora_name": f"x{i}"})


def test_path_confinement(env):
    """Local adapters loaded at run time stay inside --adapter-root: `..`, absolute paths outside and
    symlinks pointing out are refused (403), by the management API and by LoRAX's /generate."""
    outside = str(env["outside"])
    for path in ("../outside", outside, "escape", "a/../../outside"):
        r = post(env, "/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": path, "adapter_source": "local"})
        assert r.status_code == 403, (path, r.text)
        r = post(env, "/generate", {"inputs": "hi", "parameters": {"adapter_id": path, "adapter_source": "local"}})
        assert r.status_code == 403, (path, r.text)
    r = post(env, "/v1/load_lora_adapter", {"lora_name": "inside", "lora_path": str(env["root"] / "b")})
    assert r.status_code == 200, r.text  # an absolute path inside the root is fine
    assert post(env, "/v1/unload_lora_adapter", {"lora_name": "inside"}).status_code == 200


# ------------------------------------------------------------------------------------------- errors
def test_error_codes_and_still_healthy(env):
    url = env["main"].url
    comp = {"model": "a", "prompt": "hi", "max_tokens": 4}
    # 401: no key, wrong key; x-api-key works too; /health is open
    assert httpx.post(url + "/v1/completions", json=comp).status_code == 401
    assert httpx.post(url + "/v1/completions", json=comp, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.post(url + "/v1/completions", json=comp, headers={"x-api-key": KEY}).status_code == 200
    assert httpx.get(url + "/health").status_code == 200
    # 400s
    r = httpx.post(url + "/v1/completions", content=b"{not json", headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    for bad, field in [({"max_tokens": "5"}, "max_tokens"), ({"max_tokens": -1}, "max_tokens"),
                       ({"temperature": "hot"}, "temperature"), ({"prompt": 3}, "prompt"),
                       ({"stream": "yes"}, "stream"),
                       ({"n": 0}, "n"), ({"suffix": "x"}, "suffix"), ({"frobnicate": 1}, "frobnicate"),
                       ({"logit_bias": [1.0]}, "logit_bias"), ({"logit_bias": {"5": 300}}, "logit_bias"),
                       ({"top_logprobs": 2}, "top_logprobs")]:
        r = post(env, "/v1/completions", {**comp, **bad})
        assert r.status_code == 400 and field in r.json()["error"]["message"], (bad, r.text)
    r = post(env, "/v1/completions", {**comp, "max_tokens": 100000})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    r = post(env, "/v1/completions", {**comp, "prompt": "the cat sat " * 200})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    r = post(env, "/v1/chat/completions", {"model": "a", "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400
    r = post(env, "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 0}})
    assert r.status_code == 422 and "max_new_tokens" in r.json()["error"]  # LoRAX: validation is 422
    assert r.json()["error_type"] == "validation"
    assert post(env, "/v1/completions", [1, 2]).status_code == 400
    # 404s name what is missing
    r = post(env, "/v1/completions", {**comp, "model": "ghost-model"})
    assert r.status_code == 404 and "ghost-model" in r.json()["error"]["message"]
    r = post(env, "/v1/completions", {**comp, "model": "tiny", "adapters": ["ghost-adapter"]})
    assert r.status_code == 404 and "ghost-adapter" in r.json()["error"]["message"]
    assert httpx.get(url + "/v1/nothing", headers=AUTH).status_code == 404
    with pytest.raises(Exception, match="ghost"):
        oai(env).completions.create(model="ghost", prompt="hi", max_tokens=2)

    small = env["small"].url
    # 403: runtime management is off on the small server; JIT ids are unknown there (404)
    for path, body in [("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "a"}),
                       ("/v1/unload_lora_adapter", {"lora_name": "a"}), ("/activate_adapters", {"adapter_names": []})]:
        assert httpx.post(small + path, json=body).status_code == 403
    assert httpx.get(small + "/v1/lora_adapters").status_code == 403
    r = httpx.post(small + "/generate", json={"inputs": "hi", "parameters": {"adapter_id": "org/x"}})
    assert r.status_code == 404 and "allow-runtime-adapters" in r.json()["error"]

    # 429: one row, one queue place
    async def flood():
        async with httpx.AsyncClient(base_url=small, timeout=120) as c:
            return await asyncio.gather(*[c.post("/v1/completions", json={
                "model": "a", "prompt": "the cat", "max_tokens": 32, "temperature": 0}) for _ in range(6)])

    responses = asyncio.run(flood())
    codes = [r.status_code for r in responses]
    assert 429 in codes and 200 in codes, codes
    assert "queue" in next(r for r in responses if r.status_code == 429).json()["error"]["message"]

    for server in (url, small):
        assert httpx.get(server + "/health").status_code == 200
    ok = post(env, "/v1/completions", {"model": "b", "prompt": PROMPTS[0], "max_tokens": N, "temperature": 0})
    assert ok.json()["choices"][0]["text"] == ref(env, ("b",), PROMPTS[0]).text
    assert "Traceback" not in env["main"].log.read_text() and "Traceback" not in env["small"].log.read_text()
    assert os.path.exists(env["dir"] / "main.log")
