"""A fleet's pieces that need no Ray: the adapter-affinity key of a request (qadapt/server/routing.py) and the
registry's eviction by bytes (what each replica does under --max-adapter-bytes).

The keys are checked against what the single-process server applies for the same body (the adapter
names its routes resolve); the byte budget against the adapters' tensor bytes as safetensors stores
them (float32 factors: what the registry holds)."""

from __future__ import annotations

import json

import pytest

from qadapt.server.routing import key_names, routing_key

B = {"base_names": ["tiny", "tgi"]}


@pytest.mark.parametrize("path,body,key", [
    ("/v1/completions", {"model": "math"}, "math"),
    ("/v1/chat/completions", {"model": "tiny"}, ""),
    ("/v1/completions", {"model": "base"}, ""),
    ("/v1/completions", {"model": "tiny", "adapters": ["b", "a", "b"]}, "a@b"),
    ("/v1/completions", {"model": "tiny", "adapters": {"a": 0.5, "b": 2}}, "a@b@@cat(0.5,2)"),
    ("/v1/completions", {"model": "tiny", "lora": [{"id": 1, "scale": 0.5}, {"id": 0, "scale": 0}]}, "y@@cat(0.5)"),
    ("/v1/completions", {"model": "tiny", "lora": [{"id": 7, "scale": 1}]}, ""),
    ("/generate", {"inputs": "x", "parameters": {"adapter_id": "math"}}, "math"),
    ("/", {"inputs": "x", "parameters": {"adapter_id": "tgi"}}, ""),
    ("/generate_stream", {"inputs": "x", "parameters": {"merged_adapters": {
        "ids": ["a", "b"], "weights": [0.7, 0.3], "merge_strategy": "TIES"}}}, "a@b@@ties(0.7,0.3)"),
    ("/generate", {"inputs": "x"}, ""),
    ("/v1/completions", "not json", ""),
    ("/v1/completions", [1, 2], ""),
    ("/v1/completions", {"model": 5}, ""),
    ("/v1/completions", {"lora": "x"}, ""),
    ("/health", {}, ""),
])
def test_routing_key(path, body, key):
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    assert routing_key(path, raw, listed=["x", "y"], **B) == key


def test_key_names():
    assert key_names("a@b@@ties(0.7,0.3)") == ("a", "b")
    assert key_names("math") == ("math",)
    assert key_names("") == ()


def test_registry_evicts_by_bytes(tmp_path):
    """Three adapters of known size under a budget of two and a half: loading the third evicts the least
    recently used idle one; an adapter in use is never evicted; one bigger than the budget is refused."""
    from safetensors import safe_open

    import qadapt
    from models import tiny_hf, write_gguf
    from server_helpers import write_peft_adapter

    from qadapt.errors import InputError
    from qadapt.server.registry import AdapterRegistry

    hf = tiny_hf("llama", seed=1)
    gguf = write_gguf(hf, tmp_path / "m.gguf")
    folders = {n: write_peft_adapter(hf, tmp_path / n, i) for i, n in enumerate("abc")}
    big = write_peft_adapter(hf, tmp_path / "big", 9, r=32)

    def stored(folder):
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
            return sum(f.get_tensor(k).nbytes for k in f.keys())

    one = stored(folders["a"])
    m = qadapt.load(gguf)
    reg = AdapterRegistry(m, max_bytes=int(2.5 * one))
    for n, f in folders.items():
        reg.remember(n, str(f))
    keys = reg.acquire(("a",))  # a in use
    reg.warm(("b",))
    assert reg.resident_bytes() == 2 * one
    reg.warm(("c",))  # over budget: b (idle) goes, a (in use) stays
    assert {d["name"] for d in reg.describe() if d["resident"]} == {"a", "c"}
    assert reg.resident_bytes() == 2 * one and reg.evictions == 1
    reg.release(keys)
    reg.warm(("b",))  # a is now the least recently used idle one
    assert {d["name"] for d in reg.describe() if d["resident"]} == {"b", "c"}
    reg.remember("big", str(big))
    assert stored(big) > 2.5 * one
    with pytest.raises(InputError, match="big.*--max-adapter-bytes"):
        reg.warm(("big",))
    assert "big@" not in " ".join(m.adapters)


def test_api_key_check():
    """The one key check the server's middleware and the fleet's /fleet share."""
    from qadapt.server.http import key_ok

    assert key_ok({b"authorization": b"Bearer k1"}, b"k1") and key_ok({b"x-api-key": b"k1"}, b"k1")
    assert not key_ok({b"authorization": b"Bearer k2"}, b"k1") and not key_ok({}, b"k1")
