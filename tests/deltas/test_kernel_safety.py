"""No kernel entry point reads or writes outside its buffers, whatever it is given.

Every entry point — the swap's apply (entry-wise and block paths, one chunk and several on
threads) and restore, the mixed batch's linear_fix, embedding_fix and rows_fix — and its torch
twin is called with adversarial inputs: negative, unsorted, repeated and past-the-end indices, a
bad index exactly at a thread-chunk seam of a run longer than two chunks (> 131,072 entries),
runs whose arithmetic overflows, and bad segment / row arguments. Each call must refuse (a
returned position or an exception), leave the guard memory around its buffers untouched, and
leave the weights bit-identical. The buffers are middle slices of larger tensors, so a stray
write lands in the guard; the AddressSanitizer run (the last test) uses exact allocations instead
(TASKDELTA_SAFETY_GUARD=0) so that ASan sees every stray access."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import ROOT, bits, torch_threads

from taskdelta.deltas import _build, _kernel, _mixed_kernel
from taskdelta.deltas.paths import cache_dir

GUARD = int(os.environ.get("TASKDELTA_SAFETY_GUARD", "4096"))  # entries on each side
I64_MAX = 2**63 - 1


class Guarded:
    """A buffer of `n` entries in the middle of a larger tensor, and a copy of everything."""

    def __init__(self, values: torch.Tensor) -> None:
        whole = torch.empty(values.numel() + 2 * GUARD, dtype=values.dtype)
        whole[:GUARD] = -7.0
        whole[GUARD + values.numel():] = 13.0
        self.buf = whole[GUARD: GUARD + values.numel()]
        self.buf.copy_(values.reshape(-1))
        self.whole, self.before = whole, whole.clone()

    def view(self, *shape: int) -> torch.Tensor:
        return self.buf.view(*shape)

    def guard_intact(self) -> bool:
        g = GUARD + self.buf.numel()
        return (torch.equal(bits(self.whole[:GUARD]), bits(self.before[:GUARD]))
                and torch.equal(bits(self.whole[g:]), bits(self.before[g:])))

    def untouched(self) -> bool:
        return torch.equal(bits(self.whole), bits(self.before))


def _ops(module, twin, which: str):
    if which == "torch":
        return twin
    built = module.load()  # TASKDELTA_REQUIRE_KERNELS=1: a failed build raises here
    if built is None:
        pytest.skip("the kernel cannot be built here (set TASKDELTA_REQUIRE_KERNELS=1 to fail)")
    return built


@pytest.fixture(params=["kernel", "torch"])
def swap_ops(request):
    return _ops(_kernel, _kernel.TWIN, request.param)


@pytest.fixture(params=["kernel", "torch"])
def mixed_ops(request):
    return _ops(_mixed_kernel, _mixed_kernel.TWIN, request.param)


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    with torch_threads(request.param):
        yield request.param


# --- the swap: apply and restore -------------------------------------------------------------------

N = 1_000_000  # one tensor of the buffer; a second of 1,000 entries after it
NNZ = 300_000  # two chunks on two threads (the kernel's grain is 65,536): the seam at 150,000
SEAM = NNZ // 2


def swap_case(fault: str, dtype: torch.dtype = torch.float32, blocks: bool = False):
    """(buffer, segs, idx, inc, expected bad position) for one fault in a sound run."""
    gen = torch.Generator().manual_seed(3)
    if blocks:  # runs of 40 consecutive indices: the kernel's block path
        starts = torch.randperm(N // 40 - 1, generator=gen)[: NNZ // 40].sort().values * 40
        idx = (starts[:, None] + torch.arange(40)).reshape(-1)
    else:
        idx = torch.randperm(N, generator=gen)[:NNZ].sort().values
    idx = torch.cat([idx, torch.arange(0, 1000, 7)])  # the second tensor
    wide = fault == "run overflows int64"
    idx = idx.to(torch.int64 if wide else torch.int32)
    segs = torch.tensor([[0, N], [N, 1000], [NNZ, idx.numel()]])
    at = {"negative": 1234, "past the end": 200_001, "unsorted": 77_777, "repeated": 88_888,
          "negative after the seam": SEAM - 1, "repeated at the seam": SEAM,
          "unsorted at the seam": SEAM, "first of a chunk negative": SEAM,
          "far past the end": 5, "run overflows int64": SEAM + 80,
          "second tensor past its end": idx.numel() - 1, "none": -1}[fault]
    if fault in ("negative", "first of a chunk negative"):
        idx[at] = -3
    elif fault == "past the end":
        idx[at] = N
    elif fault == "far past the end":
        idx[at] = 2**31 - 1
    elif fault in ("unsorted", "unsorted at the seam"):
        idx[at] = idx[at - 1] - 1
    elif fault in ("repeated", "repeated at the seam"):
        idx[at] = idx[at - 1]
    elif fault == "negative after the seam":  # the case: a chunk starting after a big
        idx[at] = -400  # negative index trusted it and wrote the negatives after it (near
        idx[at + 1: at + 200] = torch.arange(-399, -399 + 199 * 2, 2, dtype=idx.dtype)  # ASan's redzone)
    elif fault == "run overflows int64":  # j0 + 16 wraps negative: "inside the tensor"
        idx[at: at + 16] = I64_MAX - 15 + torch.arange(16)
        idx[at + 16:] = I64_MAX  # (the rest is bad too; the first bad entry is `at`)
    elif fault == "second tensor past its end":
        idx[at] = 1000
    buf = Guarded(torch.randn(N + 1000, generator=gen).to(dtype))
    inc = torch.randn(idx.numel(), generator=gen).to(dtype)
    return buf, segs, idx.contiguous(), inc, at


FAULTS = ["negative", "past the end", "far past the end", "unsorted", "repeated",
          "negative after the seam", "repeated at the seam", "unsorted at the seam",
          "first of a chunk negative", "second tensor past its end"]


@pytest.mark.parametrize("blocks", [False, True], ids=["random mask", "block mask"])
@pytest.mark.parametrize("fault", FAULTS)
def test_swap_apply_refuses_every_bad_index_and_leaves_every_byte_as_it_was(swap_ops, threads,
                                                                            fault, blocks):
    buf, segs, idx, inc, at = swap_case(fault, blocks=blocks)
    kept = torch.empty_like(inc)
    bad = swap_ops.apply(buf.buf, segs, idx, inc, kept, threads)
    assert bad == at
    assert buf.untouched()


def test_swap_apply_refuses_a_block_whose_index_arithmetic_overflows(swap_ops, threads):
    """int64 indices near 2^63 in a run of consecutive ones: `j0 + 16 <= n` would wrap."""
    buf, segs, idx, inc, at = swap_case("run overflows int64", blocks=True)
    bad = swap_ops.apply(buf.buf, segs, idx, inc, torch.empty_like(inc), threads)
    assert bad == at
    assert buf.untouched()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocks", [False, True], ids=["random mask", "block mask"])
def test_swap_sound_run_is_written_and_restored_exactly_by_kernel_and_twin(swap_ops, threads,
                                                                          dtype, blocks):
    buf, segs, idx, inc, _ = swap_case("none", dtype, blocks)
    kept = torch.empty_like(inc)
    assert swap_ops.apply(buf.buf, segs, idx, inc, kept, threads) == -1
    where = idx.long() + torch.tensor([0, N]).repeat_interleave(torch.tensor([NNZ, idx.numel() - NNZ]))
    want = buf.before[GUARD: GUARD + N + 1000].clone()
    want[where] = want[where] + inc
    assert torch.equal(bits(buf.buf), bits(want)) and buf.guard_intact()
    swap_ops.restore(buf.buf, segs, idx, kept, threads)
    assert buf.untouched()


@pytest.mark.parametrize("fault", ["negative", "far past the end", "past the end", "unsorted"])
def test_swap_restore_skips_indices_edited_out_of_their_tensor(swap_ops, threads, fault):
    """restore() with indices changed since apply writes nothing outside the tensors."""
    buf, segs, idx, inc, _ = swap_case("none")
    kept = torch.empty_like(inc)
    assert swap_ops.apply(buf.buf, segs, idx, inc, kept, threads) == -1
    _, _, edited, _, _ = swap_case(fault)
    swap_ops.restore(buf.buf, segs, edited, kept, threads)
    assert buf.guard_intact()


SEGMENTS = {
    "outside the buffer": [[N], [1001], [1]],
    "offset past the end": [[N + 1001], [0], [1]],
    "negative offset": [[-5], [10], [1]],
    "sum overflows int64": [[2**62], [2**62], [1]],
    "overlapping": [[0, 5], [10, 10], [1, 2]],
    "ends out of order": [[0, 10], [10, 10], [2, 1]],
    "not covering": [[0], [10], [1]],
}


@pytest.mark.parametrize("what", list(SEGMENTS))
def test_swap_refuses_segments_outside_the_buffer_or_overlapping(swap_ops, what):
    buf = Guarded(torch.randn(N + 1000))
    segs = torch.tensor(SEGMENTS[what], dtype=torch.int64)
    idx = torch.tensor([0, 1], dtype=torch.int32)[: int(segs[2, -1]) + (what == "not covering")]
    inc = torch.ones(idx.numel())
    with pytest.raises(RuntimeError):
        swap_ops.apply(buf.buf, segs, idx, inc, torch.empty_like(inc), 1)
    with pytest.raises(RuntimeError):
        swap_ops.restore(buf.buf, segs, idx, torch.ones_like(inc), 1)
    assert buf.untouched()


# --- the mixed batch's kernels --------------------------------------------------------------------

OUT, IN, ROWS, PER_ROW = 24, 16, 6, 2  # y [ROWS * PER_ROW, OUT] = x [.., IN] @ ΔWᵀ


def linear_case(fault: str):
    gen = torch.Generator().manual_seed(5)
    idx = torch.randperm(OUT * IN, generator=gen)[:120].sort().values.to(torch.int32)
    if fault == "negative":
        idx[0] = -1
    elif fault == "past the end":
        idx[-1] = OUT * IN
    elif fault == "far past the end":
        idx[60] = 2**31 - 1
    elif fault == "unsorted":  # an entry of an earlier column among a later one's
        idx[80] = idx[10]
    elif fault == "repeated":
        idx[40] = idx[39]
    x = Guarded(torch.randn(ROWS * PER_ROW * IN, generator=gen))
    y = Guarded(torch.randn(ROWS * PER_ROW * OUT, generator=gen))
    return x, y, idx, torch.randn(idx.numel(), generator=gen)


INDEX_FAULTS = ["negative", "past the end", "far past the end", "unsorted", "repeated"]


@pytest.mark.parametrize("fault", INDEX_FAULTS)
def test_linear_fix_refuses_an_index_out_of_place(mixed_ops, fault):
    x, y, idx, val = linear_case(fault)
    with pytest.raises(IndexError, match="out of place"):
        mixed_ops.linear_fix(x.view(-1, IN), y.view(-1, OUT), PER_ROW, [idx], [val], [1], [5])
    assert x.untouched() and y.guard_intact()


ROW_FAULTS = {  # (per_row, starts, ends)
    "end past the batch": (PER_ROW, [0], [ROWS + 1]),
    "negative start": (PER_ROW, [-1], [2]),
    "start after end": (PER_ROW, [4], [3]),
    "runs overlap": (PER_ROW, [0, 2], [3, 5]),
    "per_row overflows": (2**62, [0], [4]),
    "per_row zero": (0, [0], [2]),
    "more ranges than runs": (PER_ROW, [0, 3], [1, 4]),
}


@pytest.mark.parametrize("fault", list(ROW_FAULTS))
def test_mixed_kernels_refuse_rows_outside_the_batch_before_writing(mixed_ops, fault):
    per_row, starts, ends = ROW_FAULTS[fault]
    x, y, idx, val = linear_case("none")
    runs = 1 if fault == "more ranges than runs" else len(starts)
    with pytest.raises((IndexError, RuntimeError)):
        mixed_ops.linear_fix(x.view(-1, IN), y.view(-1, OUT), per_row, [idx] * runs, [val] * runs,
                             starts, ends)
    ids = Guarded(torch.arange(ROWS * PER_ROW, dtype=torch.int64))
    with pytest.raises((IndexError, RuntimeError)):
        mixed_ops.embedding_fix(ids.buf, y.view(-1, OUT), 100, per_row, [idx] * runs, [val] * runs,
                                starts, ends)
    g = torch.randn(OUT)
    with pytest.raises((IndexError, RuntimeError)):
        mixed_ops.rows_fix(y.view(-1, OUT), torch.randn(ROWS * PER_ROW, OUT), per_row, [g] * runs,
                           [g] * runs, starts, ends)
    assert x.untouched() and y.untouched() and ids.untouched()


def test_mixed_kernels_refuse_inconsistent_shapes(mixed_ops):
    x, y, idx, val = linear_case("none")
    with pytest.raises(RuntimeError):  # x has fewer rows than y
        mixed_ops.linear_fix(x.view(-1, IN)[:-1], y.view(-1, OUT), PER_ROW, [idx], [val], [0], [1])
    with pytest.raises(RuntimeError):  # a gamma of the wrong size
        mixed_ops.rows_fix(y.view(-1, OUT), torch.randn(ROWS * PER_ROW, OUT), PER_ROW,
                           [torch.randn(OUT + 1)], [torch.randn(OUT)], [0], [1])
    with pytest.raises(RuntimeError):  # a scale not shaped like y
        mixed_ops.rows_fix(y.view(-1, OUT), torch.randn(ROWS, OUT), PER_ROW,
                           [torch.randn(OUT)], [torch.empty(0)], [0], [1])
    with pytest.raises(RuntimeError):  # one idx, two vals
        mixed_ops.linear_fix(x.view(-1, IN), y.view(-1, OUT), PER_ROW, [idx], [val, val], [0], [1])
    assert x.untouched() and y.untouched()


VOCAB, HIDDEN = 200, 16


def embedding_case(fault: str):
    """Every token is id 50; ΔE holds row 50 whole (16 entries) and a few other rows."""
    idx = torch.cat([torch.arange(3) * HIDDEN + 1, 50 * HIDDEN + torch.arange(HIDDEN),
                     torch.tensor([120 * HIDDEN + 2])]).to(torch.int32)
    k = 3 + 5  # row 50's sixth entry
    if fault == "unsorted":  # the issue's case: the binary searches still land on row 50's
        idx[k] = 3  # range, and the entry in it belongs to row 0: written 797 floats before y
    elif fault == "unsorted, beyond":
        idx[k] = 50 * HIDDEN + 1000  # belongs far past row 50: written past y's end
    elif fault == "repeated":
        idx[k] = idx[k - 1]
    elif fault == "negative":
        idx[0] = -1
    elif fault == "past the end":
        idx[-1] = VOCAB * HIDDEN
    ids = Guarded(torch.full((4,), 50, dtype=torch.int64))
    y = Guarded(torch.randn(4 * HIDDEN))
    return ids, y, idx, torch.randn(idx.numel())


@pytest.mark.parametrize("fault", ["unsorted", "unsorted, beyond", "repeated"])
def test_embedding_fix_never_trusts_sortedness(mixed_ops, fault):
    ids, y, idx, val = embedding_case(fault)
    with pytest.raises(IndexError, match="out of place"):
        mixed_ops.embedding_fix(ids.buf, y.view(-1, HIDDEN), VOCAB, 1, [idx], [val], [0], [4])
    assert ids.untouched() and y.guard_intact()


@pytest.mark.parametrize("fault", ["negative", "past the end"])
def test_embedding_fix_bounds_every_index(mixed_ops, fault):
    """An index outside ΔE in a row no token asks for: the twin refuses it as it checks the
    whole run; the kernel never reaches it (it reads only the asked rows). Neither writes out."""
    ids, y, idx, val = embedding_case(fault)
    with contextlib.suppress(IndexError):
        mixed_ops.embedding_fix(ids.buf, y.view(-1, HIDDEN), VOCAB, 1, [idx], [val], [0], [4])
    assert ids.untouched() and y.guard_intact()


def test_embedding_fix_refuses_an_id_outside_the_vocabulary_before_writing(mixed_ops):
    ids, y, idx, val = embedding_case("none")
    ids.buf[2] = VOCAB
    ids.before[GUARD + 2] = VOCAB
    with pytest.raises(IndexError, match="out of range"):
        mixed_ops.embedding_fix(ids.buf, y.view(-1, HIDDEN), VOCAB, 1, [idx], [val], [0], [4])
    assert y.untouched() and ids.untouched()


def test_mixed_kernel_and_twin_give_the_same_sums():
    """The twin is the kernel's stand-in: same entry points, same sums up to rounding."""
    kernel = _ops(_mixed_kernel, None, "kernel")
    x, y, idx, val = linear_case("none")
    ids, e, eidx, evals = embedding_case("none")
    outs = []
    for ops in (kernel, _mixed_kernel.TWIN):
        got = y.buf.clone().view(-1, OUT)
        ops.linear_fix(x.view(-1, IN), got, PER_ROW, [idx, idx], [val, -val], [0, 3], [2, 6])
        emb = e.buf.clone().view(-1, HIDDEN)
        ops.embedding_fix(ids.buf, emb, VOCAB, 2, [eidx], [evals], [1], [2])
        rows = got.clone()
        ops.rows_fix(rows, torch.ones_like(rows), PER_ROW, [torch.ones(OUT), torch.empty(0)],
                     [torch.empty(0), torch.ones(OUT)], [0, 4], [1, 6])
        outs.append((got, emb, rows))
    for a, b in zip(*outs, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert not torch.equal(outs[0][0], y.buf.view(-1, OUT))


# --- AddressSanitizer -----------------------------------------------------------------------------


@pytest.mark.slow
def test_the_adversarial_cases_pass_under_address_sanitizer(tmp_path):
    """The kernels built with -fsanitize=address (their own cache folder) run every case above on
    exact allocations (no guard: ASan's redzones are the guard) in a subprocess: it exits 0 and
    ASan reports nothing."""
    # libstdc++ preloaded too: ASan intercepts C++ throws only if it is there when ASan starts
    # (python does not link it), and the kernels refuse by throwing
    preload = [gcc_file("libasan.so"), gcc_file("libstdc++.so")]
    env = os.environ | {
        "TASKDELTA_CACHE_DIR": str(cache_dir() / "asan"),
        _build.CFLAGS_ENV: "-fsanitize=address -fno-omit-frame-pointer",
        _build.REQUIRE_ENV: "1",
        "TASKDELTA_SAFETY_GUARD": "0",
        "LD_PRELOAD": " ".join(preload),
        "ASAN_OPTIONS": "detect_leaks=0",
    }
    # -s: an ASan report goes to stderr, which pytest's capture would lose as ASan exits
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-x", "-p", "no:cacheprovider", "-m",
           "not slow", "-k", "not torch", __file__]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    out = done.stdout + done.stderr
    assert "AddressSanitizer" not in out, out[-4000:]
    assert done.returncode == 0, out[-4000:]
    assert " passed" in out


def gcc_file(name: str) -> str:
    found = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert Path(found).is_file(), f"gcc has no {name}"
    return found
