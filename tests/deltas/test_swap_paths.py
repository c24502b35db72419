"""The two ways the swap writes a delta — the compiled CPU kernel and torch index ops — give the
same bits; the kernel undoes its writes at a bad index wherever it meets one (threads included);
without a compiler the swap falls back to torch ops with a warning; and the flat weight layout
keeps the base's values while making every parameter a view into one buffer."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from support import bits, snapshot, torch_threads

from taskdelta.deltas import (
    PreparedDelta,
    SwapError,
    Swapper,
    _kernel,
    bind_base,
    load_base,
    merge_into,
    prepare,
    random_delta,
)
from taskdelta.deltas.layout import HUGE_PAGE

DTYPES = ["float32", "bfloat16", "float16"]
def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(bits(a[n]), bits(b[n])) for n in a)


@pytest.fixture(scope="module", params=DTYPES)
def base(request, tiny_llama_dir: Path):
    return load_base(tiny_llama_dir, device="cpu", dtype=request.param)


@pytest.fixture(scope="module")
def kernel():
    module = _kernel.load()
    if module is None:
        pytest.skip("the swap kernel cannot be built here (no C++ compiler or ninja)")
    return module


@pytest.mark.parametrize("density", [0.001, 0.05, 0.5])
def test_kernel_and_torch_ops_write_the_same_bits(base, kernel, density):
    """Applied by either path the weights equal the offline merge bitwise (16-bit rounding
    included); after restore they are the base's again."""
    original = snapshot(base)
    delta = random_delta(base, density, seed=11, scale=0.3)
    prepared = prepare(delta, base)
    merged = snapshot(base)
    merge_into(merged, prepared)
    assert not same_bits(merged, original)
    for backend in ("kernel", "torch"):
        sw = Swapper(base, backend=backend)
        assert sw.backend == backend
        sw.apply(prepared)
        assert same_bits(snapshot(base), merged), backend
        sw.restore()
        assert same_bits(snapshot(base), original), backend


def test_a_delta_built_by_hand_is_packed_and_swapped(base, kernel):
    """A PreparedDelta made without prepare() (no plan; int64 indices) swaps the same way."""
    original = snapshot(base)
    prepared = prepare(random_delta(base, 0.02, seed=4), base)
    by_hand = PreparedDelta(name="hand", kind=prepared.kind, labels=(), names=prepared.names,
                            idx=tuple(i.long() for i in prepared.idx), inc=prepared.inc)
    for backend in ("kernel", "torch"):
        sw = Swapper(base, backend=backend)
        with sw.swapped(prepared):
            want = snapshot(base)
        with sw.swapped(by_hand):
            assert same_bits(snapshot(base), want), backend
        assert same_bits(snapshot(base), original), backend


@pytest.mark.parametrize("backend", ["kernel", "torch"])
@pytest.mark.parametrize("fault", ["unsorted", "repeated", "past the end", "negative"])
def test_bad_index_in_a_later_tensor_leaves_nothing_written(base, kernel, backend, fault):
    """A bad index in a later tensor of a delta: the tensors before it were written (by the kernel,
    which then undoes them) or never touched (torch checks first); either way the error names the
    tensor and the weights are the original bits."""
    original = snapshot(base)
    prepared = prepare(random_delta(base, 0.05, seed=2), base)
    k = max(i for i, t in enumerate(prepared.idx) if t.numel() >= 10)  # the last sizeable one
    assert k > 0
    idx = list(prepared.idx)
    bad = idx[k].clone()
    n = base.params[prepared.names[k]].numel()
    at = bad.numel() // 2
    if fault == "unsorted":
        bad[at], bad[at + 1] = bad[at + 1].item(), bad[at].item()
    elif fault == "repeated":
        bad[at + 1] = bad[at]
    elif fault == "past the end":
        bad[-1] = n
    else:
        bad[0] = -1
    idx[k] = bad
    broken = PreparedDelta(name="broken", kind=prepared.kind, labels=(), names=prepared.names,
                           idx=tuple(idx), inc=prepared.inc)
    sw = Swapper(base, backend=backend)
    with pytest.raises(IndexError, match=prepared.names[k].replace(".", r"\.")):
        sw.apply(broken)
    assert sw.active is None
    assert same_bits(snapshot(base), original)


@pytest.fixture
def two_threads():
    """Real threads for the kernel's chunks (the suite runs on one: conftest)."""
    with torch_threads(2):
        yield


@pytest.mark.parametrize("where", ["first chunk", "chunk seam", "second chunk", "none"])
def test_kernel_undoes_every_chunk_when_it_runs_on_threads(kernel, where, two_threads):
    """Straight on the kernel with a run long enough for two chunks (two threads): a bad index in
    either chunk, or an order broken exactly at the seam between them, is reported and every
    chunk's writes undone; a sound run is written and restored exactly."""
    gen = torch.Generator().manual_seed(0)
    buf = torch.randn(1_000_000, generator=gen)
    original = buf.clone()
    idx = torch.randperm(400_000, generator=gen)[:300_000].sort().values.to(torch.int32)
    # two tensors of 400,000 entries at offsets 0 and 500,000; entries [0, 100k) and [100k, 300k)
    segs = torch.tensor([[0, 500_000], [400_000, 400_000], [100_000, 300_000]])
    inc = torch.randn(300_000, generator=gen)
    seam = 300_000 // 2  # two chunks split the run here, inside the second tensor
    if where == "first chunk":
        idx[1000] = 400_000
    elif where == "second chunk":
        idx[250_000] = -5
    elif where == "chunk seam":
        idx[seam] = idx[seam - 1]
    kept = torch.empty_like(inc)
    bad = kernel.apply(buf, segs, idx, inc, kept, 2)
    if where == "none":
        assert bad == -1
        assert not torch.equal(buf, original)
        kernel.restore(buf, segs, idx, kept, 2)
    else:
        assert bad == {"first chunk": 1000, "second chunk": 250_000, "chunk seam": seam}[where]
    assert torch.equal(buf.view(torch.int32), original.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("where", ["none", "run starts at the index before it", "order broken in a run",
                                   "run crosses the tensor's end", "run of a tensor is one too long"])
def test_kernel_writes_runs_of_consecutive_indices_as_single_entries(kernel, dtype, where, two_threads):
    """A structured mask (runs of consecutive indices, which the kernel writes as blocks) gives
    the bits of torch's gather-add-scatter; a bad index in or at the edge of a run is reported at
    its own position and every write undone, on one thread or on two (the run is long enough for
    two chunks)."""
    gen = torch.Generator().manual_seed(1)
    numel = (200_000, 150_000)  # two tensors, at offsets 0 and 200,000
    buf = torch.randn(sum(numel), generator=gen).to(dtype)
    original = buf.clone()
    local = []
    for n in numel:  # runs of 40 at random places (not aligned to the kernel's blocks), strays
        starts = torch.randperm(n // 40, generator=gen)[: n // 80] * 40 + torch.randint(0, 7, (1,))
        runs = (starts[:, None] + torch.arange(40)).reshape(-1)
        local.append(torch.cat([runs, torch.randperm(n, generator=gen)[:3000]]).unique())
        local[-1] = local[-1][local[-1] < n]
    idx = torch.cat(local).to(torch.int32)
    ends = [local[0].numel(), idx.numel()]
    segs = torch.tensor([[0, numel[0]], list(numel), ends])
    inc = torch.randn(idx.numel(), generator=gen).to(dtype)
    k = ends[0] + 5000  # inside the second tensor, past the two-thread seam or not
    while idx[k + 39] - idx[k] != 39:  # the start of a run of 40
        k += 1
    expect = {"none": -1, "run starts at the index before it": k, "order broken in a run": k + 20,
              "run crosses the tensor's end": ends[0] - 3, "run of a tensor is one too long": ends[1] - 1}
    if where == "run starts at the index before it":
        idx[k] = idx[k - 1]
    elif where == "order broken in a run":
        idx[k + 20] = idx[k + 19]
    elif where == "run crosses the tensor's end":  # the first tensor: one run, ending at n + 2
        idx[: ends[0]] = torch.arange(numel[0] - ends[0] + 3, numel[0] + 3)
    elif where == "run of a tensor is one too long":
        idx[ends[0]:] = torch.arange(numel[1] - (ends[1] - ends[0]) + 1, numel[1] + 1)
    assert idx.numel() >= 2 * 65_536  # two chunks on two threads (the kernel's grain)
    want = original.clone()
    if where == "none":
        at = idx.long() + torch.tensor([0, numel[0]]).repeat_interleave(
            torch.tensor([ends[0], ends[1] - ends[0]]))
        want[at] = (original[at].float() + inc.float()).to(dtype)
    for threads in (1, 2):
        kept = torch.empty_like(inc)
        bad = kernel.apply(buf, segs, idx, inc, kept, threads)
        assert bad == expect[where], threads
        if bad == -1:
            assert torch.equal(bits(buf), bits(want)), threads
            kernel.restore(buf, segs, idx, kept, threads)
        assert torch.equal(bits(buf), bits(original)), threads


def test_kernel_refuses_a_segment_outside_the_buffer(kernel):
    buf = torch.zeros(100)
    segs = torch.tensor([[90], [20], [1]])  # 90 + 20 > 100
    with pytest.raises(RuntimeError, match="outside the buffer"):
        kernel.apply(buf, segs, torch.tensor([0], dtype=torch.int32), torch.ones(1), torch.empty(1), 1)
    assert torch.equal(buf, torch.zeros(100))


def test_without_a_compiler_the_swap_falls_back_to_torch_ops(tiny_bert, tmp_path, monkeypatch,
                                                             caplog):
    """No kernel can be built (no compiler, fresh cache): a warning is logged once, Swapper()
    uses torch index ops and is still exact; asking for the kernel explicitly is an error. (Not
    where kernels are required: tests/deltas/test_kernel_build.py.)"""
    monkeypatch.delenv("TASKDELTA_REQUIRE_KERNELS", raising=False)
    monkeypatch.setenv("TASKDELTA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    _kernel.reset()
    try:
        with caplog.at_level(logging.WARNING, logger="taskdelta.swap"):
            sw = Swapper(tiny_bert)
            Swapper(tiny_bert)
        warnings = [r for r in caplog.records if "cannot build the swap kernel" in r.getMessage()]
        assert len(warnings) == 1
        assert sw.backend == "torch"
        with pytest.raises(SwapError, match="not available"):
            Swapper(tiny_bert, backend="kernel")
        original = snapshot(tiny_bert)
        prepared = prepare(random_delta(tiny_bert, 0.05, seed=9, scale=0.5), tiny_bert)
        merged = snapshot(tiny_bert)
        merge_into(merged, prepared)
        with sw.swapped(prepared):
            assert same_bits(snapshot(tiny_bert), merged)
        assert same_bits(snapshot(tiny_bert), original)
    finally:
        _kernel.reset()  # the next Swapper loads the real kernel again (cache dir restored)


def test_kernel_can_be_turned_off(tiny_bert, monkeypatch):
    monkeypatch.setenv(_kernel.DISABLE_ENV, "0")
    _kernel.reset()
    try:
        assert Swapper(tiny_bert).backend == "torch"
    finally:
        _kernel.reset()


def test_flat_layout_keeps_values_and_makes_params_views_of_one_buffer(tiny_llama_dir):
    """After loading, every parameter is a view into its dtype's buffer at the recorded offset,
    with the values of the saved weights; binding the model again reuses the buffer."""
    from safetensors.torch import load_file

    base = load_base(tiny_llama_dir, device="cpu")
    saved = load_file(tiny_llama_dir / "model.safetensors")
    layout = base.layout
    (buf,) = layout.buffers.values()
    assert buf.numel() == sum(p.numel() for p in base.params.values())
    for name, p in base.params.items():
        start = layout.offset[name]
        assert p.data_ptr() == buf[start:].data_ptr()
        assert torch.equal(bits(p), bits(saved[name].to(p.dtype)))
    if buf.numel() * buf.element_size() >= 2 * HUGE_PAGE:
        assert buf.data_ptr() % HUGE_PAGE == 0  # aligned for transparent huge pages
    again = bind_base(base.model, base.tokenizer, name="again", path=None, fingerprint="x")
    assert again.layout.buffers[buf.dtype].data_ptr() == buf.data_ptr()
    assert again.layout.offset == layout.offset
    # the tied LM head is the embedding, so it lives in the buffer too
    assert base.model.lm_head.weight.data_ptr() == base.model.model.embed_tokens.weight.data_ptr()
