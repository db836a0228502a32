"""A real vocabulary end to end: Llama 3's, as a GGUF (llama.cpp's vocab file) and as a transformers folder.

References: transformers' ``AutoTokenizer`` and ``apply_chat_template`` on a folder laid out as Llama 3's
(the ``tokenizers`` library's BPE, split regex and post-processor; tests/llama_sdist.py), transformers'
modeling code for the greedy tokens, and llama.cpp's token ids through the recorded fixtures of
tests/test_tokenizer_conformance.py. Token ids and rendered strings: no tolerance. Greedy tokens of the
float32 GGUF against transformers: equal (same float32 weights; the logit gaps of these steps are checked
to be far above float32 rounding).
"""

from __future__ import annotations


import pytest
import torch

import qadapt
from llama_sdist import EXTRA_TEXTS, LLAMA3_CHAT, inp_out, llama3_folder_tokenizer, tokenizer_metadata
from qadapt.tokenizer import NoChatTemplate

CHATS = [
    [{"role": "user", "content": "What is LoRA?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi <|eot_id|> there"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "  Quantize me  "}],
]


@pytest.fixture(scope="module")
def llama3(llama_root, tmp_path_factory):
    """A tiny random Llama with Llama 3's 128,256-token vocabulary and tied embeddings (as Llama 3.2 1B):
    a transformers folder (Llama 3's tokenizer layout and chat template) and an F32 GGUF of the same weights
    carrying llama.cpp's Llama 3 vocabulary."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qadapt.models.gguf_export import export_gguf, set_metadata
    from qadapt.layer_maps import get_layer_map

    d = tmp_path_factory.mktemp("llama3")
    cfg = LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=128000, eos_token_id=[128001, 128008, 128009], tie_word_embeddings=True,
                      rope_theta=500000.0)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).float().eval()
    folder = d / "hf"
    hf.save_pretrained(folder)
    llama3_folder_tokenizer(llama_root, folder)
    meta = tokenizer_metadata(llama_root / "models" / "ggml-vocab-llama-bpe.gguf")
    gguf = export_gguf(hf.state_dict(), cfg.to_dict(), get_layer_map("llama"), d / "l3.F32.gguf", "F32",
                       tokenizer=meta, force=True)
    templated = set_metadata(gguf, d / "l3-chat.F32.gguf", {"tokenizer.chat_template": LLAMA3_CHAT})
    q8 = export_gguf(hf.state_dict(), cfg.to_dict(), get_layer_map("llama"), d / "l3.Q8_0.gguf", "Q8_0",
                     tokenizer=meta, force=True)
    return dict(hf=hf, folder=folder, gguf=gguf, templated=templated, q8=q8,
                tok=AutoTokenizer.from_pretrained(folder))


def test_folder_prompt_ids_are_autotokenizer_ids(llama3):
    """A raw prompt from a transformers folder gets what AutoTokenizer gives it: BOS first, specials parsed."""
    m = qadapt.load(llama3["folder"])
    for text in ("Hello world", "Hi<|endoftext|>there", "a<|eot_id|>b", "<|begin_of_text|>x", ""):
        assert m.encode(text) == llama3["tok"](text)["input_ids"], text
    assert m.encode("Hello")[0] == 128000
    assert set(m.tokenizer.eos_ids) >= {128001, 128008, 128009}  # config.json's list of EOS ids


def test_gguf_vocab_tokenizes_as_the_transformers_folder(llama3, llama_root):
    """llama.cpp's rules on its Llama 3 vocab file (qadapt's tokenizer) give Hugging Face's tokenizers' ids."""
    m = qadapt.load(llama3["gguf"])
    texts = [t for t, _ in inp_out(llama_root, "llama-bpe")] + EXTRA_TEXTS
    for text in texts:
        assert m.encode(text) == llama3["tok"](text)["input_ids"], text


def test_special_text_in_a_prompt_generates(llama3):
    """Text that names special tokens becomes those tokens, never an id past the embedding, on both kernels;
    greedy tokens equal transformers' from the same ids."""
    prompt = "Hi<|endoftext|>there<|eot_id|><|start_header_id|>"
    ids = llama3["tok"](prompt)["input_ids"]
    with torch.no_grad():
        ref = llama3["hf"].generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)[0, len(ids):].tolist()
    g = qadapt.load(llama3["gguf"]).generate(prompt, max_new_tokens=6)
    assert g.token_ids[: len(ref)] == ref[: len(g.token_ids)] and g.prompt_tokens == len(ids)
    fast = qadapt.load(llama3["q8"], kernels="q8").generate(prompt, max_new_tokens=6)
    assert fast.prompt_tokens == len(ids) and all(0 <= t < 128256 for t in fast.token_ids)


def test_chat_prompts_are_apply_chat_template(llama3):
    """Chat ids equal apply_chat_template(..., add_generation_prompt=True): from the folder's template, and from
    the same template in a GGUF's `tokenizer.chat_template` (rendered strings equal too)."""
    tok = llama3["tok"]
    folder, gguf = qadapt.load(llama3["folder"]), qadapt.load(llama3["templated"])
    for messages in CHATS:
        want = tok.apply_chat_template(messages, add_generation_prompt=True)
        want_ids = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        assert folder.encode_chat(messages) == list(want_ids)
        assert gguf.encode_chat(messages) == list(want_ids)
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert gguf.tokenizer.render_chat(messages) == text


def test_chat_without_a_template_is_refused_unless_given_one(llama3, tmp_path):
    m = qadapt.load(llama3["gguf"])  # llama.cpp's vocab file has no template
    with pytest.raises(NoChatTemplate, match="--chat-template"):
        m.encode_chat(CHATS[0])
    path = tmp_path / "llama3.jinja"
    path.write_text(LLAMA3_CHAT)
    given = qadapt.load(llama3["gguf"], chat_template=path)
    want = llama3["tok"].apply_chat_template(CHATS[1], add_generation_prompt=True)
    assert given.encode_chat(CHATS[1]) == list(want["input_ids"] if hasattr(want, "keys") else want)


def test_cli_chat_uses_the_template(llama3, tmp_path):
    from click.testing import CliRunner

    from qadapt.cli import main

    path = tmp_path / "t.jinja"
    path.write_text(LLAMA3_CHAT)
    r = CliRunner().invoke(main, ["run", str(llama3["gguf"]), "--chat", "-p", "hello", "-n", "2", "--json"])
    assert r.exit_code != 0 and "chat template" in r.output
    r = CliRunner().invoke(main, ["run", str(llama3["gguf"]), "--chat", "--chat-template", str(path), "--system",
                                  "Be brief.", "-p", "hello", "-n", "2", "--json"])
    assert r.exit_code == 0, r.output
    import json

    want = llama3["tok"].apply_chat_template([{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "hello"}], add_generation_prompt=True)
    assert json.loads(r.output.strip().splitlines()[-1])["prompt_tokens"] == len(
        want["input_ids"] if hasattr(want, "keys") else want)


def test_server_sends_transformers_token_counts(llama3, tmp_path):
    """`qadapt serve` on the folder: /v1/completions and /v1/chat/completions feed the model the ids transformers
    gives (BOS included, which the old path left out), read back from the responses' usage."""
    pytest.importorskip("uvicorn")
    import httpx

    from fixtures_s3 import free_port
    from server_helpers import ServerProc

    srv = ServerProc.spawn([str(llama3["folder"])], free_port(), tmp_path / "serve.log")
    try:
        srv.wait_ready()
        prompt = "The capital of France is a city called"
        r = httpx.post(srv.url + "/v1/completions", json={"model": "hf", "prompt": prompt, "max_tokens": 2},
                       timeout=60).json()
        assert r["usage"]["prompt_tokens"] == len(llama3["tok"](prompt)["input_ids"]) == 9  # BOS + 8
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "hf", "messages": CHATS[1], "max_tokens": 2},
                       timeout=60).json()
        want = llama3["tok"].apply_chat_template(CHATS[1], add_generation_prompt=True)
        assert r["usage"]["prompt_tokens"] == len(want["input_ids"] if hasattr(want, "keys") else want)
    finally:
        srv.stop()
