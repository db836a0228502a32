"""The bench's mistral.rs engine (qadapt/bench/mistralrs_engine.py) on tiny random GGUFs."""

import importlib.util
import random

import pytest

pytest.importorskip("mistralrs")

from qadapt.bench.engines import Unsupported  # noqa: E402
from qadapt.bench.mistralrs_engine import MistralRsEngine  # noqa: E402
from qadapt.bench.random_gguf import TINY, write_adapter, write_model  # noqa: E402

N = 12  # greedy steps; on the llama file below the first 13 tokens' top-2 logit margins are all >= 0.3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mistralrs")
    write_model(d / "tiny.Q8_0.gguf", TINY, "Q8_0")
    write_model(d / "tiny-qwen3.Q8_0.gguf", dict(TINY, arch="qwen3"), "Q8_0")
    write_adapter(d / "lora", TINY, 0)
    return d


def prompt():
    rng = random.Random(0)
    return [rng.randrange(2, TINY["vocab"]) for _ in range(64)]


def test_timings_positive_and_greedy_tokens_match_llama_cpp(files):
    e = MistralRsEngine(files / "tiny.Q8_0.gguf", 2)
    e.load()
    with pytest.raises(Unsupported, match="converter-permuted adjacent RoPE order"):
        e.add_adapter("a0", files / "lora", None)  # mistral.rs refuses LoRA on llama GGUFs
    pre, dec = e.prefill_decode(prompt(), N, [])
    assert pre > 0 and dec > 0
    assert len(e.last_tokens) == N + 1 and e.last_usage.prompt_tokens == 64
    ours = e.last_tokens
    assert e.prefill_decode(prompt(), N, [])[0] > 0 and e.last_tokens == ours  # no prefix cache, same tokens
    e.unload()
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed")
    from qadapt.bench.engines import LlamaCppEngine

    c = LlamaCppEngine(files / "tiny.Q8_0.gguf", 2)
    c.load()
    c.llm.eval(prompt())
    toks = [c._logits()]
    for _ in range(N):
        c.llm.eval([toks[-1]])
        toks.append(c._logits())
    c.unload()
    assert ours == toks


def test_lora_on_qwen3_gguf(files):
    e = MistralRsEngine(files / "tiny-qwen3.Q8_0.gguf", 2)
    e.load()
    assert e.lora_refused is None
    e.add_adapter("a0", files / "lora", None)
    e.prefill_decode(prompt(), 4, [])
    base = e.last_tokens
    pre, dec = e.prefill_decode(prompt(), 4, ["a0"])
    lora = e.last_tokens
    assert pre > 0 and dec > 0 and lora != base
    with pytest.raises(Unsupported, match="one LoRA adapter per request"):
        e.prefill_decode(prompt(), 1, ["a0", "a0"])
    e.unload()
    # the same adapter through qadapt: the first two greedy tokens (top-2 margins 0.09, 0.2; later ones are
    # near-ties that mistral.rs's F16 KV cache may flip)
    import torch

    from qadapt.bench.engines import QadaptEngine

    q = QadaptEngine(files / "tiny-qwen3.Q8_0.gguf", "inplace", 2)
    q.load()
    q.add_adapter("a0", files / "lora", None)
    ctx, dec_ = q._ctx(["a0"]), q.m.decoder
    ids = prompt()
    cache = q.m.new_cache(len(ids) + 2)
    with torch.inference_mode():
        t0 = dec_(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0), cache, ctx=ctx, last_only=True)
        t0 = t0.logits[:, -1].argmax(-1)
        t1 = dec_(t0.view(1, 1), torch.tensor([[len(ids)]]), cache, ctx=ctx, last_only=True).logits[:, -1].argmax(-1)
    assert lora[:2] == [int(t0), int(t1)]
