"""Record llama.cpp's tokenization for the tests that run without it (tests/data/llama_cpp_tokenizer.json.gz).

    pip install -e ".[bench]"        # llama-cpp-python 0.3.36, built from source (~7 minutes)
    python tools/tokenizer_fixtures.py [--out tests/data/llama_cpp_tokenizer.json.gz] [--force]

For every vocab-only GGUF in llama.cpp's models/ folder that qadapt reads, and for every pre-tokenizer
name llama.cpp knows (its GPT-2 vocabulary with ``tokenizer.ggml.pre`` set to that name), it asks
llama.cpp's own ``llama_tokenize`` / ``llama_detokenize`` for: the ids of each test string with and
without special tokens added (BOS/EOS) and parsed (``<|eot_id|>`` as one token), and the text of those
ids decoded back. tests/test_tokenizer_conformance.py compares qadapt against these records.
"""

from __future__ import annotations

import argparse
import ctypes
import gzip
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

N_FUZZ = 80  # random strings per vocabulary (seeded)
N_PRE_FUZZ = 60  # per pre-tokenizer name


class LlamaVocab:
    """One vocab-only model in llama.cpp, through llama-cpp-python's low-level bindings."""

    def __init__(self, path: Path):
        import llama_cpp

        self.lib = llama_cpp
        p = llama_cpp.llama_model_default_params()
        p.vocab_only = True
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), p)
        if not self.model:
            raise RuntimeError(f"llama.cpp cannot load {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        b = text.encode("utf-8")
        n = len(b) + 8
        buf = (self.lib.llama_token * n)()
        k = self.lib.llama_tokenize(self.vocab, b, len(b), buf, n, add_special, parse_special)
        if k < 0:
            n = -k
            buf = (self.lib.llama_token * n)()
            k = self.lib.llama_tokenize(self.vocab, b, len(b), buf, n, add_special, parse_special)
        return list(buf[:k])

    def detokenize(self, ids: list[int], special: bool) -> str:
        arr = (self.lib.llama_token * max(1, len(ids)))(*ids)
        n = 64 + 64 * len(ids)
        buf = (ctypes.c_char * n)()
        k = self.lib.llama_detokenize(self.vocab, arr, len(ids), buf, n, False, special)
        return bytes(buf[:k]).decode("utf-8", "surrogateescape")

    def specials(self) -> dict:
        lib, v = self.lib, self.vocab
        n = lib.llama_vocab_n_tokens(v)
        return {"eog": [i for i in range(n) if lib.llama_vocab_is_eog(v, i)], "bos": lib.llama_vocab_bos(v),
                "eos": lib.llama_vocab_eos(v), "add_bos": bool(lib.llama_vocab_get_add_bos(v)),
                "add_eos": bool(lib.llama_vocab_get_add_eos(v))}

    def close(self) -> None:
        self.lib.llama_model_free(self.model)


MODES = [(False, False), (False, True), (True, False), (True, True)]


def record(path: Path, texts: list[str], modes=MODES, decode_texts: list[str] | None = None) -> dict:
    v = LlamaVocab(path)
    try:
        out = {f"{int(a)}{int(p)}": [v.tokenize(t, a, p) for t in texts] for a, p in modes}
        dec = texts if decode_texts is None else decode_texts
        ids = [v.tokenize(t, True, True) for t in dec]
        out["decode"] = [[v.detokenize(i, False), v.detokenize(i, True)] for i in ids]
        out["decode_ids"] = ids
        out["specials"] = v.specials()
    finally:
        v.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "llama_cpp_tokenizer.json.gz")
    ap.add_argument("--force", action="store_true", help="overwrite --out")
    args = ap.parse_args()
    import llama_cpp
    from llama_sdist import EXTRA_TEXTS, REFUSED_VOCABS, VERSION, fuzz_texts, inp_out, sdist_root, \
        synthetic_pre_vocab, vocab_names

    from qadapt.io import atomic_write
    from qadapt.tokenizer.pretokenize import known_names

    if llama_cpp.__version__ != VERSION:
        print(f"warning: llama-cpp-python {llama_cpp.__version__}, the tests read the {VERSION} sdist", file=sys.stderr)
    quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(quiet, None)
    root = sdist_root(ROOT / ".pytest_cache" / "d" / "llama-sdist")  # the tests' cache
    fixture: dict = {"llama_cpp_python": llama_cpp.__version__, "vocabs": {}, "pre": {},
                     "texts": EXTRA_TEXTS + fuzz_texts(N_FUZZ), "pre_texts": EXTRA_TEXTS + fuzz_texts(N_PRE_FUZZ, 1)}
    for name in vocab_names(root):
        if name in REFUSED_VOCABS:
            continue
        cases = inp_out(root, name) or []
        texts = [t for t, _ in cases] + fixture["texts"]
        fixture["vocabs"][name] = record(root / "models" / f"ggml-vocab-{name}.gguf", texts)
        print(f"{name}: {len(texts)} strings", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        for pre in known_names():
            path = synthetic_pre_vocab(root, pre, Path(tmp))
            fixture["pre"][pre] = record(path, fixture["pre_texts"], modes=[(False, False), (True, True)],
                                         decode_texts=EXTRA_TEXTS)
        print(f"{len(fixture['pre'])} pre-tokenizer names", file=sys.stderr)
    data = gzip.compress(json.dumps(fixture, separators=(",", ":")).encode(), mtime=0)
    atomic_write(args.out, data, force=args.force)
    print(f"wrote {args.out} ({len(data) / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
