"""mistral.rs (its Python package ``mistralrs``, the CPU wheel, 0.9.5) on the bench's GGUF files.

What mistral.rs is given:

- the GGUF itself, ``Which.GGUF(quantized_model_id=<its folder>, quantized_filename=<its name>)``: no
  Hugging Face model id, and ``HF_HUB_OFFLINE=1`` while it loads. The CPU wheel runs on the CPU only (it logs
  ``Layers ...: cpu``); no ``in_situ_quant`` (the GGUF's own quant types), activations F32, and the KV cache
  in mistral.rs's CPU default, F16, the comparison's choice (llama.cpp's default is F16 too; with
  ``MISTRALRS_CPU_KV_F32=1``, left as the caller set it, it is F32: both run, and on the tiny files their
  greedy tokens part from llama.cpp's only at near-ties of the logits).
- a ``tokenizer.json`` (``tokenizer_json=``) written from the GGUF's own vocabulary, because mistral.rs
  cannot convert the bench files' ``gpt2`` / ``pre = "default"`` tokenizer metadata itself ("GGUF BPE
  pre-tokenizer `default` is not supported for standalone conversion"). It is a WordLevel model over
  exactly the GGUF's tokens (mistral.rs checks every id's string against the GGUF) with a whitespace
  pre-tokenizer, so the prompt's token ids, sent as their token strings joined by spaces, come back
  as exactly those ids (its Python API takes text only), and a ByteFallback decoder, so that every
  generated token streams back as its own chunk, its token string.
- a chat template that renders the message text as it is (no BOS, no markup): streaming exists
  only for chat requests, and the prompt is checked to be ``len(prompt)`` tokens.
- threads: ``RAYON_NUM_THREADS`` and ``CANDLE_NUM_THREADS`` set to ``threads`` when the engine is
  made; mistral.rs reads them when its thread pools start, once per process.
- no prefix cache (``prefix_cache_n=0``): the bench repeats one prompt and must prefill it each time.
- a 1-token warm-up request inside :meth:`MistralRsEngine.load` (its first request pays one-time costs).

Timing: one streamed request, greedy (``temperature=0``, ``top_k=1``), ``ignore_eos=True``,
``max_tokens = n + 1`` (the token of the prefill, then ``n`` decode steps). Prefill is the wall time
from sending the request to the first streamed token, decode the wall time from the first to the
last; each step streams exactly one chunk (checked). The response's own ``usage``
(``total_prompt_time_sec``, ``total_completion_time_sec``) is kept in ``last_usage`` but not used:
mistral.rs truncates each step's time to whole milliseconds before summing them.

LoRA: mistral.rs's dynamic LoRA (``Which.GGUF(adapters=[])``, then ``Runner.load_lora_adapter`` on the
PEFT folder; ``adapter=alias`` per request, one adapter per request). It refuses it on GGUF families whose
q/k rows llama.cpp's converter permutes (``llama``); there :meth:`MistralRsEngine.add_adapter` raises
:class:`Unsupported` with mistral.rs's own message, and the base model is loaded without adapters.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ..io import atomic_write
from .engines import Engine, Unsupported

#: renders the one message's text as the prompt, nothing added
RAW_TEMPLATE = "{{ messages[0]['content'] }}"


@contextlib.contextmanager
def offline():
    """``HF_HUB_OFFLINE=1`` while mistral.rs resolves files (restored after: other libraries share the process)."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def gguf_tokens(path: Path) -> list[str]:
    """The GGUF's ``tokenizer.ggml.tokens`` (the header only is read)."""
    import mmap

    from ..formats.gguf import read_header

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        return list(read_header(Path(path), mm, os.path.getsize(path)).metadata["tokenizer.ggml.tokens"])


def write_tokenizer(tokens: list[str], path: Path) -> None:
    """A ``tokenizer.json`` whose ids are the GGUF's: each whitespace-separated word is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    bad = [t for t in tokens if not t or any(c.isspace() for c in t)]
    if bad or len(set(tokens)) != len(tokens):
        raise Unsupported(f"this GGUF's vocabulary cannot be sent to mistral.rs as words (tokens {bad[:3]!r} "
                          "hold whitespace, or tokens repeat)")
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.Sequence([decoders.ByteFallback()])
    tok.save(str(path))


class MistralRsEngine(Engine):
    libraries = ("mistralrs",)

    def __init__(self, path: Path, threads: int, warmup: bool = True):
        super().__init__(threads)
        self.warmup = warmup
        os.environ["RAYON_NUM_THREADS"] = os.environ["CANDLE_NUM_THREADS"] = str(threads)
        self.path = Path(path)
        self.runner = None
        self.lora_refused: str | None = None  # mistral.rs's reason, where it refuses LoRA on this file
        self.last_tokens: list[int] = []  # the last prefill_decode's greedy tokens (n + 1)
        self.last_usage: Any = None
        self.tokens = gguf_tokens(self.path)
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.dir = Path(tempfile.mkdtemp(prefix="qadapt-mistralrs-"))
        write_tokenizer(self.tokens, self.dir / "tokenizer.json")
        atomic_write(self.dir / "raw.jinja", RAW_TEMPLATE.encode())

    def load(self) -> None:
        """The Runner on the GGUF, with an empty dynamic-LoRA runtime where mistral.rs allows one, then
        (``warmup``) one 1-token request.

        Where it refuses LoRA for the architecture it says so before reading any weight; the refusal is
        kept for :meth:`add_adapter` and the model loaded without the runtime. mistral.rs maps the file and
        prepares its weights on their first use: on the 8B files its first request ran seconds longer than
        the next (llama.cpp repacks while loading), so that one-time cost is counted here, in the load."""
        import mistralrs as m

        def runner(adapters):
            which = m.Which.GGUF(quantized_model_id=str(self.path.parent), quantized_filename=self.path.name,
                                 tokenizer_json=str(self.dir / "tokenizer.json"), adapters=adapters)
            return m.Runner(which, max_seqs=1, prefix_cache_n=0, jinja_explicit=str(self.dir / "raw.jinja"))

        with offline():
            try:
                self.runner, self.lora_refused = runner([]), None
            except ValueError as e:
                if "LoRA" not in str(e):
                    raise
                self.lora_refused = f"mistral.rs: {e}"
                self.runner = runner(None)
        if self.warmup:
            self.prefill_decode([2], 1, [])

    def unload(self) -> None:
        self.runner = None
        super().unload()

    def __del__(self):
        shutil.rmtree(getattr(self, "dir", ""), ignore_errors=True)

    def add_adapter(self, name, folder, lora_gguf) -> None:
        """The PEFT folder through ``Runner.load_lora_adapter`` (mistral.rs takes no LoRA GGUF)."""
        if self.lora_refused:
            raise Unsupported(self.lora_refused)
        with offline():
            self.runner.load_lora_adapter(name, str(folder))

    def prefill_decode(self, prompt, n, adapters):
        """Wall seconds to the first streamed token (prefill) and from it to the last (``n`` steps)."""
        import mistralrs as m

        if len(adapters) > 1:
            raise Unsupported("mistral.rs applies one LoRA adapter per request (`adapter=`)")
        text = " ".join(self.tokens[i] for i in prompt)
        req = m.ChatCompletionRequest(messages=[{"role": "user", "content": text}], model="default",
                                      max_tokens=n + 1, temperature=0.0, top_k=1, ignore_eos=True, stream=True,
                                      adapter=adapters[0] if adapters else None)
        toks, usage, first = [], None, None
        t0 = time.perf_counter()
        for chunk in self.runner.send_chat_completion_request(req):
            last = time.perf_counter()
            first = first or last
            toks += [self.ids.get(c.delta.content, -1) for c in chunk.choices]
            usage = chunk.usage or usage
        self.last_tokens, self.last_usage = toks, usage
        if len(toks) != n + 1 or -1 in toks or (usage is not None and usage.prompt_tokens != len(prompt)):
            raise RuntimeError(f"mistral.rs streamed {len(toks)} tokens for {n + 1} (prompt of "
                               f"{usage and usage.prompt_tokens} tokens for {len(prompt)}): the timing split is off")
        return first - t0, last - first

    def switch(self, name):
        """Nothing to switch: mistral.rs picks the adapter per request (``adapter=``)."""
        if self.lora_refused:
            raise Unsupported(self.lora_refused)
        self.active = name
