"""Captured decode steps (qadapt/runtime/graphs.py): the static step a CUDA graph records, checked on CPU.

Without a GPU there is no graph, but everything a replay depends on runs here: ``DecodeGraphs(model,
capture=False)`` runs the static step (attention over every cache slot under a mask built on the device,
keys written by index, rotary gathered from full tables, inputs and slot indices in static buffers) from the
buffers a replay would read, with the rows of the step that "captured" it, as a replay does. Reference: the
exact CPU path (itself checked against transformers and PEFT elsewhere), 1e-5 of the logit scale (float32
maths in another order; the masked slots add exact zeros). On a machine with CUDA the last test captures real
graphs (tools/gpu_check.py runs it).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from device_marks import cuda, interpreter  # noqa: E402
import qadapt  # noqa: E402
from models import tiny_arch, tiny_hf, write_quantized  # noqa: E402
from server_helpers import write_peft_adapter  # noqa: E402

from qadapt.runtime.graphs import DecodeGraphs  # noqa: E402



@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("graphs")
    hf = tiny_hf("llama", seed=3)
    write_quantized(hf, d / "m.gguf", "Q8_0", seed=4)
    ads = {"a": write_peft_adapter(hf, d / "a", 10), "b": write_peft_adapter(hf, d / "b", 11),
           "c": write_peft_adapter(hf, d / "c", 12, targets=("q_proj",))}  # c touches q only
    return d / "m.gguf", {k: str(v) for k, v in ads.items()}


def _decode(ref, tri, rows_per_step, prompt_len=5, batch=3, positions_skew=True):
    """Prefill then one-token steps on both models; each step's logits compared."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 200, (batch, prompt_len), generator=g)
    pos = torch.arange(prompt_len).expand(batch, prompt_len)
    c1, c2 = ref.new_cache(32, batch), tri.new_cache(32, batch)
    rows0 = rows_per_step[0]
    want, got = ref.step(ids, pos, c1, rows=rows0), tri.step(ids, pos, c2, rows=rows0)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    nxt = want.argmax(-1, keepdim=True)
    at = torch.full((batch, 1), prompt_len)
    if positions_skew:  # rows at different positions (continuous batching): row 0 restarts at 0 on a new prompt
        at[0, 0] = 0
    for i, rows in enumerate(rows_per_step):
        want, got = ref.step(nxt, at, c1, rows=rows), tri.step(nxt, at, c2, rows=rows)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (i, rows)
        nxt, at = want.argmax(-1, keepdim=True), at + 1


@interpreter
def test_static_steps_match_the_eager_path_whatever_the_rows(llama):
    """One "graph" captured on rows naming only adapter c (q only) then replayed for rows naming a and b (every
    projection): every LoRA layer takes its slots in a replay, so their k/v/o deltas apply too. A different
    number of adapters per row is another graph; the rows sit at different positions."""
    path, ads = llama
    ref = qadapt.load(path, kernels="exact", adapters=ads, activate=[])
    tri = qadapt.load(path, kernels="triton", adapters=ads, activate=[])
    tri._graphs = graphs = DecodeGraphs(tri, capture=False)
    steps = [(("c",), (), ("c",)), (("a",), ("b",), ()), (("b",), ("a",), ("c",)),  # one graph: one slot per row
             (("a", "c"), ("b",), ()), (("a", "b"), ("c",), ("a",))]  # two per row: a second graph
    _decode(ref, tri, steps)
    assert len(graphs.graphs) == 2 and graphs.replays == len(steps) - 2 and graphs.off is None
    before = graphs.replays
    _decode(ref, tri, [None, None], positions_skew=False)  # no adapters, a new cache: a third graph
    # and the first two are gone: their cache was dropped when the first decode returned (graphs hold it weakly)
    assert graphs.replays == before + 1 and len(graphs.graphs) == 1


@interpreter
def test_steps_a_graph_cannot_express_run_eagerly(llama, tmp_path):
    """aLoRA, DoRA rows and prompts take the eager path (counted: no replay), and still match."""
    from models import make_adapter

    path, ads = llama
    hf = tiny_hf("llama", seed=3)
    dora = str(make_adapter(hf, tmp_path / "dora", 5, perturb=0.5, use_dora=True))
    ads = {**ads, "d": dora}
    ref = qadapt.load(path, kernels="exact", adapters=ads, activate=[])
    tri = qadapt.load(path, kernels="triton", adapters=ads, activate=[])
    tri._graphs = graphs = DecodeGraphs(tri, capture=False)
    _decode(ref, tri, [(("d",), ("a",), ()), (("a",), (), ("d",))])
    assert graphs.replays == 0 and not graphs.graphs


@interpreter
@pytest.mark.parametrize("arch", ["mistral", "gemma3_text"])
def test_windows_and_local_layers(tmp_path, arch):
    """A sliding window (Mistral: 6) and Gemma 3's local/global layers (their own rotary base) in the static mask,
    decoded past the window."""
    hf = tiny_arch(arch, seed=2)
    write_quantized(hf, tmp_path / "m.gguf", "Q8_0", seed=4)
    ref = qadapt.load(tmp_path / "m.gguf", kernels="exact")
    tri = qadapt.load(tmp_path / "m.gguf", kernels="triton")
    tri._graphs = graphs = DecodeGraphs(tri, capture=False)
    _decode(ref, tri, [None] * 8, batch=2)
    assert graphs.replays == 7


# ------------------------------------------------------------------------------------------ on a GPU
@cuda
def test_cuda_graphs_replay_the_decode_step(llama):
    """Real CUDA graphs: decode steps replayed against the CPU's exact path at the GPU path's float16
    tolerance (tests/test_triton.py: 2e-3 of the logit scale), and against the same GPU model run eagerly."""
    path, ads = llama
    ref = qadapt.load(path, kernels="exact", adapters=ads, activate=[])
    gpu = qadapt.load(path, device="cuda", adapters=ads, activate=[])
    eager = qadapt.load(path, device="cuda", adapters=ads, activate=[])
    eager._graphs = None
    assert gpu._graphs is not None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 200, (3, 5), generator=g)
    pos = torch.arange(5).expand(3, 5)
    caches = [m.new_cache(32, 3) for m in (ref, gpu, eager)]
    rows = (("a",), ("b",), ("c",))
    outs = [m.step(ids, pos, c, rows=rows) for m, c in zip((ref, gpu, eager), caches)]
    nxt, at = outs[0].argmax(-1, keepdim=True), torch.full((3, 1), 5)
    for _ in range(6):
        outs = [m.step(nxt, at, c, rows=rows) for m, c in zip((ref, gpu, eager), caches)]
        assert (outs[1] - outs[0]).abs().max() <= 2e-3 * outs[0].abs().max()
        assert (outs[1] - outs[2]).abs().max() <= 1e-4 * outs[2].abs().max()
        nxt, at = outs[0].argmax(-1, keepdim=True), at + 1
    assert gpu._graphs.off is None and gpu._graphs.replays == 5
