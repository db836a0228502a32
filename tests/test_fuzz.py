"""Property tests: every parser ends in a result or a QadaptError, never another exception.

Bounded for CI (a few hundred inputs per parser); ``tools/fuzz.py`` runs the same
properties for 10^4+ inputs each (see the README's maintainer section).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from qadapt.errors import QadaptError

from fuzz_targets import TARGETS, run_one, seed_gguf

# the suite's default run is derandomized: every CI run checks the same inputs; tools/fuzz.py (which sets
# QADAPT_FUZZ_EXAMPLES) keeps exploring with fresh random inputs. (One random run once drove the process to
# 24 GB: gguf-py looping over a huge array count past the end of the file; now refused, tests below.)
FAST = settings(max_examples=int(os.environ.get("QADAPT_FUZZ_EXAMPLES", "120")), deadline=None,
                derandomize="QADAPT_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    return seed_gguf(tmp_path_factory.mktemp("fuzz") / "seed.gguf").read_bytes()


mutation = st.tuples(st.integers(0, 6000), st.sampled_from(["byte", "u64", "u32", "truncate"]),
                     st.integers(0, 2**64 - 1))


def mutate(data: bytes, muts) -> bytes:
    b = bytearray(data)
    for pos, kind, val in muts:
        if not b:
            break
        pos = pos % len(b)
        if kind == "byte":
            b[pos] = val & 0xFF
        elif kind == "u64":
            b[pos:pos + 8] = struct.pack("<Q", val)
        elif kind == "u32":
            b[pos:pos + 4] = struct.pack("<I", val & 0xFFFFFFFF)
        else:
            del b[pos:]
    return bytes(b)


@FAST
@given(muts=st.lists(mutation, min_size=1, max_size=4))
@example(muts=[(252, "u32", 0)])  # attention.head_count = 0: a shape expression divided by it (found at 20,000)
def test_gguf_reader_mutations(gguf_bytes, tmp_path, muts):
    """Mutated GGUF files (bytes, huge u32/u64 counts and lengths, truncation): result or QadaptError."""
    p = tmp_path / "m.gguf"
    p.write_bytes(mutate(gguf_bytes, muts))
    assert run_one("gguf", p) is None


@FAST
@given(n=st.integers(0, 2**64 - 1), header=st.binary(max_size=200), tail=st.binary(max_size=64))
def test_safetensors_header(tmp_path, n, header, tail):
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", n) + header + tail)
    assert run_one("safetensors", p) is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=12), c, max_size=6),
    max_leaves=20,
)


def _keyed(keys):
    return st.dictionaries(st.sampled_from(keys) | st.text(max_size=8), json_values, max_size=len(keys) + 2)


ORDERING_KEYS = ["base_model_id", "order", "layers", "preload_adapters"]
ADAPTER_KEYS = ["r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules", "layers_to_transform",
                "layers_pattern", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "bias", "modules_to_save",
                "use_dora", "peft_type", "base_model_name_or_path"]


@FAST
@given(doc=_keyed(ORDERING_KEYS) | json_values)
def test_ordering_json(tmp_path, doc):
    p = tmp_path / "o.json"
    p.write_text(json.dumps(doc))
    assert run_one("ordering", p) is None


@FAST
@given(raw=st.binary(max_size=300))
def test_ordering_raw_bytes(tmp_path, raw):
    p = tmp_path / "o.json"
    p.write_bytes(raw)
    assert run_one("ordering", p) is None


@FAST
@given(doc=_keyed(ADAPTER_KEYS) | json_values)
def test_adapter_config_json(tmp_path, doc):
    d = tmp_path / "adapter"
    d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps(doc))
    assert run_one("adapter_config", d) is None


XLORA_KEYS = ["hidden_size", "adapters", "enable_softmax", "enable_softmax_topk", "softmax_temperature",
              "layerwise_scalings", "top_k_lora", "xlora_depth", "xlora_size", "xlora_dropout_p",
              "scaling_pass_value", "global_scaling_weight", "use_bias", "base_model_id"]
GPTQ_KEYS = ["bits", "group_size", "desc_act", "sym", "checkpoint_format", "pack_dtype", "quant_method",
             "dynamic", "lm_head", "is_marlin_format", "format"]


@pytest.fixture(scope="module")
def xlora_weights(tmp_path_factory) -> bytes:
    """A valid reference-layout classifier (depth 2, hidden 8, 2 adapters) for the fuzzed configs to describe."""
    import torch
    from safetensors.torch import save

    return save({"inner.0.weight": torch.zeros(4, 8), "inner.0.bias": torch.zeros(4),
                 "last.weight": torch.zeros(2, 4), "last.bias": torch.zeros(2)})


@FAST
@given(doc=_keyed(XLORA_KEYS) | json_values)
def test_xlora_config_json(tmp_path, xlora_weights, doc):
    d = tmp_path / "xlora"
    d.mkdir(exist_ok=True)
    (d / "xlora_config.json").write_text(json.dumps(doc))
    (d / "xlora_classifier.safetensors").write_bytes(xlora_weights)
    assert run_one("xlora_config", d) is None


_override = st.sampled_from([2, 3, 4, 8, -1, 0, 128, True, None, "4", 4.5]) | json_values
GPTQ_DOCS = st.fixed_dictionaries({}, optional={
    "bits": _override, "group_size": _override, "desc_act": _override, "sym": _override,
    "dynamic": st.dictionaries(st.sampled_from([".*", "-:.*q_proj", "+:lm_head", "(", "x"]),
                               st.dictionaries(st.sampled_from(["bits", "group_size", "desc_act", "sym", "x"]),
                                               _override, max_size=3) | json_values, max_size=3)})


@FAST
@given(doc=GPTQ_DOCS | _keyed(GPTQ_KEYS) | json_values, where=st.sampled_from(["quantize_config", "config"]))
def test_gptq_config_json(tmp_path, doc, where):
    d = tmp_path / "gptq"
    d.mkdir(exist_ok=True)
    for f in d.iterdir():
        f.unlink()
    if where == "quantize_config":
        (d / "quantize_config.json").write_text(json.dumps(doc))
    else:
        qc = dict(doc, quant_method="gptq") if isinstance(doc, dict) else doc
        (d / "config.json").write_text(json.dumps({"quantization_config": qc}))
    assert run_one("gptq_config", d) is None


def test_huge_element_count_refused_before_allocation(tmp_path):
    """A safetensors header claiming 10^12 elements is refused from the header alone."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}}).encode()
    p = tmp_path / "huge.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(QadaptError, match="offsets"):
        TARGETS["safetensors"](p)


def _count_offset(data: bytes, key: str) -> int:
    """Offset of the u64 element count of metadata array `key` (after the key, its value type and item type)."""
    k = key.encode()
    at = data.index(struct.pack("<Q", len(k)) + k) + 8 + len(k)
    assert struct.unpack_from("<II", data, at)[0] == 9  # GGUF value type 9: array
    return at + 8


def _refused(data: bytes, tmp_path: Path, offset: int, value: int, match: str) -> None:
    """The GGUF with the u64 at offset set to value is refused by a QadaptError matching match."""
    b = bytearray(data)
    struct.pack_into("<Q", b, offset, value)
    p = tmp_path / "patched.gguf"
    p.write_bytes(bytes(b))
    with pytest.raises(QadaptError, match=match):
        TARGETS["gguf"](p)


@pytest.mark.parametrize("key", ["tokenizer.ggml.scores", "tokenizer.ggml.tokens"])
def test_gguf_array_count_past_the_end_is_refused(gguf_bytes, tmp_path, key):
    """A metadata array claiming 2^60 items in a small file (floats, and strings) is refused from the header,
    naming the key: gguf-py reads past the end as empty arrays and would loop over every claimed item
    (found by tools/fuzz.py: the process grew ~120 MB/s until the OOM killer)."""
    _refused(gguf_bytes, tmp_path, _count_offset(gguf_bytes, key), 1 << 60,
             rf"metadata `{key}`: an array of {1 << 60} items .* past the end of the file")


def test_gguf_string_length_past_the_end_is_refused(gguf_bytes, tmp_path):
    """One vocabulary string claiming more bytes than the file holds: refused, naming the item."""
    first = _count_offset(gguf_bytes, "tokenizer.ggml.tokens") + 8  # tokens[0]'s length
    second = first + 8 + struct.unpack_from("<Q", gguf_bytes, first)[0]
    _refused(gguf_bytes, tmp_path, second, 1 << 40, r"metadata `tokenizer.ggml.tokens`: the value\[1\]")


def test_gguf_tensor_count_past_the_end_is_refused(gguf_bytes, tmp_path):
    _refused(gguf_bytes, tmp_path, 8, 1 << 50, rf"tensor infos: {1 << 50} tensor infos needs")  # the tensor count


def test_gguf_deeply_nested_arrays_are_refused(tmp_path):
    """Arrays of arrays 100,000 deep (1.2 MB): a FormatError naming the key, not a RecursionError."""
    key = b"general.deep"
    body = struct.pack("<Q", len(key)) + key + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 100_000
    p = tmp_path / "deep.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + body + struct.pack("<IQ", 4, 0))
    with pytest.raises(QadaptError, match="metadata `general.deep`: .* nests arrays more than 8 deep"):
        TARGETS["gguf"](p)
