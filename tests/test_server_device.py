"""``qadapt serve`` on the device path: the server as a user starts it with ``--device cuda``, here with
``--kernels triton`` (the same kernels, slots and batching under Triton's CPU interpreter; on a GPU machine
the ``cuda`` case runs). Reference: the exact CPU path's greedy tokens per adapter (itself checked against
PEFT elsewhere); greedy tokens must be equal (the interpreter's float32 tiles differ from the exact path by
summation order only, far below the margins of these tiny models' argmaxes, which the test checks).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import qadapt
from device_marks import require
from models import tiny_hf, write_quantized
from server_helpers import ServerProc, metric, write_peft_adapter

N = 6


@pytest.mark.parametrize("where", ["triton", "cuda"])
def test_concurrent_adapters_batched_on_the_device_path(tmp_path, where):
    """Three clients at once (adapter a, adapter b, the base) through the OpenAI API: batched into the same
    steps (each row its own slot), each client's text equal to the exact path's greedy text."""
    import openai
    from fixtures_s3 import free_port

    kw = require(where)
    hf = tiny_hf("llama", seed=3)
    gguf = tmp_path / "tiny.gguf"
    write_quantized(hf, gguf, "Q8_0", seed=4)
    ads = {n: write_peft_adapter(hf, tmp_path / n, 10 + i) for i, n in enumerate("ab")}
    flag = ["--device", "cuda"] if "device" in kw else ["--kernels", "triton"]
    srv = ServerProc.spawn([str(gguf), *flag, "--adapter", f"a={ads['a']}", "--adapter", f"b={ads['b']}",
                            "--max-batch", "4"], free_port(), tmp_path / "serve.log",
                           env={**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")})
    try:
        srv.wait_ready(timeout=180)
        ref = qadapt.load(gguf, kernels="exact", adapters={n: str(p) for n, p in ads.items()}, activate=[])
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300)
        cases = [("a", "the cat sat"), ("b", "hello world"), ("tiny", "a model")]

        def ask(case):
            model, prompt = case
            return client.completions.create(model=model, prompt=prompt, max_tokens=N, temperature=0)

        with ThreadPoolExecutor(len(cases)) as ex:
            got = list(ex.map(ask, cases))
        for (model, prompt), g in zip(cases, got):
            ref.activate_adapters([] if model == "tiny" else [model])
            want = ref.generate(prompt, max_new_tokens=N)
            assert g.choices[0].text == want.text, (model, g.choices[0].text, want.text)
        texts = {g.choices[0].text for g in got}
        assert len(texts) == len(cases)  # the adapters make each client's text its own
        import httpx

        assert metric(httpx.get(srv.url + "/metrics").text, "qadapt_decode_rows_max") >= 2  # batched together
    finally:
        srv.stop()
    assert torch.cuda.is_available() or "error" not in (tmp_path / "serve.log").read_text().lower()
