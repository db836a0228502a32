"""llama.cpp's own files, from the llama-cpp-python sdist: vocab-only GGUFs with their test strings and
expected ids, the HF-to-GGUF converter and its gguf-py.

``pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`` fetches the sdist (76 MB, seconds;
nothing is built); the parts the tests read are extracted once into pytest's cache folder. Set
``QADAPT_LLAMA_SDIST`` to an extracted ``vendor/llama.cpp`` folder to use one already on disk.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"
#: parts of vendor/llama.cpp the tests read
_MEMBERS = ("models/ggml-vocab-", "models/templates/", "convert_hf_to_gguf.py", "conversion/", "gguf-py/",
            "src/llama-vocab.cpp")
#: vocab files of tokenizer kinds qadapt refuses (WordPiece, Unigram): each must be refused by name
REFUSED_VOCABS = {"bert-bge": "bert", "nomic-bert-moe": "t5"}
SEP = "\n__ggml_vocab_test__\n"


def sdist_root(cache: Path) -> Path:
    """vendor/llama.cpp of the sdist, downloaded and extracted into ``cache`` on first use."""
    given = os.environ.get("QADAPT_LLAMA_SDIST")
    if given:
        return Path(given)
    root = cache / f"llama-cpp-python-{VERSION}" / "vendor" / "llama.cpp"
    if (root / "convert_hf_to_gguf.py").is_file() and (root / "models" / "templates").is_dir():
        return root
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={VERSION}", "-d", tmp]
        subprocess.run(cmd, check=True, timeout=600)
        (archive,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
        with tarfile.open(archive) as tf:
            members = [m for m in tf.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].startswith(_MEMBERS) and (m.isfile() or m.isdir())]
            for m in members:
                m.name = m.name[len(prefix):]
            try:
                tf.extractall(root, members=members, filter="data")
            except TypeError:  # Python before 3.10.12 / 3.11.4: no extraction filters
                tf.extractall(root, members=members)
    return root


def vocab_names(root: Path) -> list[str]:
    return sorted(p.name[len("ggml-vocab-"):-len(".gguf")] for p in (root / "models").glob("ggml-vocab-*.gguf"))


def inp_out(root: Path, name: str) -> list[tuple[str, list[int]]] | None:
    """llama.cpp's test strings for a vocab and the ids it expects (``test-tokenizer-0``'s reading of the files:
    strings split on the separator, one line of ids each; a repeated string counts once)."""
    inp = root / "models" / f"ggml-vocab-{name}.gguf.inp"
    if not inp.is_file():
        return None
    texts = inp.read_text("utf-8").split(SEP)
    outs = (root / "models" / f"ggml-vocab-{name}.gguf.out").read_text("utf-8").split("\n")
    seen: dict[str, list[int]] = {}
    for text, line in zip(texts, outs):
        seen.setdefault(text, [int(x) for x in line.split()])
    return list(seen.items())


#: strings for the checks beyond the .inp files: special-token text, BOS/EOS edges, digits, white space
EXTRA_TEXTS = [
    "", " ", "Hello world", " Hello", "Hi<|endoftext|>there", "<s>Hello</s>", "<|begin_of_text|>x<|eot_id|>",
    "<|im_start|>user\nhi<|im_end|>", "<unk> <pad> <mask>", "[INST] hi [/INST]", "1234567890", "3.14159 + 2,718",
    "  two  spaces\n\n\ttab\r\n", "l'été, we're I'm they'll", "日本語のテキスト", "🦙🚀 emoji ✅", "a\u00a0b\u3000c\u2028d",
    "x = [i ** 2 for i in range(10)]  # code", "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>",
    "Hello ,world . ' quote ' 's 're", "\u2581lead mark", "<0x41>", "tail space ",
]
_ALPHABET = ["a", "b", "Z", " ", "  ", "\n", "\t", "\r", "'", "'s", "'ll", "'RE", "1", "23", "4567", "12345678", ",",
             ".", "!", "?", "-", "_", "(", ")", "[", "$", "+", "<", ">", "=", "^", "`", "|", "~", "\\", "/", "😀",
             "é", "ß", "日本", "中文", "한국어", "нещо", "ελ", "ע", "ا", "\u00a0", "\u2003", "\u3000", "\u0085",
             "\u200b", "\u0301", "½", "²", "٣", "Ⅳ", "…", "。", "，", "<s>", "</s>", "<|endoftext|>",
             "<|begin_of_text|>", "<|im_start|>", "<unk>", "<|end|>", "<|eot_id|>", "\u2581", "\x00", "\x1f", "<0x41>"]


def fuzz_texts(n: int, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    return ["".join(r.choice(_ALPHABET) for _ in range(r.randint(1, 12))) for _ in range(n)]


def synthetic_pre_vocab(root: Path, pre: str, out: Path) -> Path:
    """llama.cpp's GPT-2 vocabulary with ``tokenizer.ggml.pre`` set to ``pre``: one file per pre-tokenizer name
    (the merges act inside each word, so a different split shows as different ids)."""
    from qadapt.models.gguf_export import set_metadata

    path = out / f"pre-{pre}.gguf"
    if not path.is_file():
        set_metadata(root / "models" / "ggml-vocab-gpt-2.gguf", path, {"tokenizer.ggml.pre": pre})
    return path


#: Llama 3's pre-tokenizer regex, as its tokenizer.json writes it
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
#: Llama 3 Instruct's chat template
LLAMA3_CHAT = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
               "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
               "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
               "{{ content }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def tokenizer_metadata(path: Path) -> dict:
    """The ``tokenizer.ggml.*`` keys of a vocab file (to write into a model's GGUF)."""
    from qadapt.formats.gguf import GGUFFile

    return {k: v for k, v in GGUFFile(path).metadata.items() if k.startswith("tokenizer.")}


def llama3_folder_tokenizer(root: Path, folder: Path, chat_template: str | None = LLAMA3_CHAT) -> Path:
    """A transformers tokenizer folder laid out as Llama 3's (BPE with ignore_merges, its split regex then
    byte-level, BOS added by the post-processor, 256 special tokens), built by the ``tokenizers`` library from
    llama.cpp's Llama 3 vocabulary: the vocabulary is Llama 3's, the tokenizer code is Hugging Face's."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    meta = tokenizer_metadata(root / "models" / "ggml-vocab-llama-bpe.gguf")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    normal = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty != 3}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=normal, merges=merges, ignore_merges=True))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 128000)])
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   chat_template=chat_template)
    fast.save_pretrained(folder)
    return folder
