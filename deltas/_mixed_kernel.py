"""The mixed batch's kernels (`csrc/mixed.cpp`, for `mixed.py`) and their torch twin.

    linear_fix(x, y, per_row, idxs, vals, starts, ends)           # y[rows] += x[rows] @ ΔW_sᵀ
    embedding_fix(ids, y, vocab, per_row, idxs, vals, starts, ends) # y[rows] += ΔE_s[ids]
    rows_fix(y, scale, per_row, gammas, betas, starts, ends)      # y[rows] += scale * Δγ_s + Δβ_s

All read a delta as it is kept for the swap (sorted flat indices local to the tensor and the
increments), so mixed batches cost no memory beyond it. One call per module serves every task of
the batch, each on its rows: run s covers batch rows [starts[s], ends[s]) of `per_row` tokens
each, runs in order and not overlapping.

`linear_fix` takes up to 64 of a run's rows a pass: it transposes them into xt [in, rows rounded
up to 8] (8 x 8 register blocks) and walks ΔW's entries once; ΔW [out, in] has row-major sorted
flat indices, so each output column's entries follow one another and their sums stay in
registers (8 rows a vector, two chains), then go to y transposed back in 8 x 8 blocks.
`embedding_fix` adds ΔE's row of each token id (two binary searches a token). `rows_fix` adds
each task's LayerNorm (norm(x) * Δγ + Δβ) or bias rows. float32 only.

Safety: whatever they are given, the kernels and the twin read and write only inside their
buffers. Row ranges, ids and shapes are checked before anything is written; an index out of
place (outside its matrix or row, or not above the one before it: sortedness is never trusted)
is an IndexError naming its position. The twin does the same checks vectorised, with torch
sparse ops, on any device.
"""

from __future__ import annotations

import os
import threading
from types import ModuleType

import torch

from . import _build

DISABLE_ENV = "TASKDELTA_MIXED_KERNEL"  # "0": the torch twin instead
SOURCE = _build.source("mixed")

_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}


def load() -> ModuleType | None:
    """The compiled kernels, built on first use; None (warned once) where they cannot be built,
    unless TASKDELTA_REQUIRE_KERNELS=1 (then `_build.KernelBuildError`)."""
    with _lock:
        if "module" not in _state:
            off = os.environ.get(DISABLE_ENV, "1") == "0"
            _state["module"] = None if off else _build.build("mixed", SOURCE, _flags())
        return _state["module"]


def reset() -> None:
    """Forget the loaded kernels (tests: to exercise the fallback)."""
    with _lock:
        _state.clear()


def pick(want_kernel: bool) -> ModuleType | TorchMixed:
    """The compiled kernels where wanted and built, else the torch twin."""
    module = load() if want_kernel else None
    return module if module is not None else TWIN


def _flags() -> list[str]:
    """AVX2 and FMA where torch found them on this CPU (the build runs where it serves; the flags
    are part of the build's key). 8-row vectors waste less of a pass than AVX-512's 16."""
    capability = torch.backends.cpu.get_cpu_capability()
    return ["-mavx2", "-mfma"] if capability in ("AVX2", "AVX512") else []


class TorchMixed:
    """The kernels' torch twin: the same entry points, sums (up to rounding) and refusals."""

    def linear_fix(self, x: torch.Tensor, y: torch.Tensor, per_row: int, idxs: list[torch.Tensor],
                   vals: list[torch.Tensor], starts: list[int], ends: list[int]) -> None:
        _float2d(x, "x")
        _float2d(y, "y")
        if x.shape[0] != y.shape[0]:
            raise RuntimeError("x [rows, in], y [rows, out]")
        rows = _token_rows(starts, ends, per_row, y.shape[0], len(idxs), len(vals))
        inp, out = x.shape[1], y.shape[1]
        checked = _checked_runs(idxs, vals, out * inp)
        for (a, b), (local, val) in zip(rows, checked, strict=True):
            w = torch.sparse_coo_tensor(torch.stack([local // inp, local % inp]), val, (out, inp),
                                        is_coalesced=True, check_invariants=False)  # checked
            y[a:b] += torch.sparse.mm(w, x[a:b].t()).t()  # [tokens, out]

    def embedding_fix(self, ids: torch.Tensor, y: torch.Tensor, vocab: int, per_row: int,
                      idxs: list[torch.Tensor], vals: list[torch.Tensor], starts: list[int],
                      ends: list[int]) -> None:
        _float2d(y, "y")
        if ids.dtype != torch.int64 or ids.dim() != 1 or ids.numel() != y.shape[0] or vocab < 0:
            raise RuntimeError("ids [rows] int64, y [rows, hidden]")
        rows = _token_rows(starts, ends, per_row, y.shape[0], len(idxs), len(vals))
        hidden = y.shape[1]
        checked = _checked_runs(idxs, vals, vocab * hidden)
        for a, b in rows:
            bad = (ids[a:b] < 0) | (ids[a:b] >= vocab)
            if bool(bad.any()):
                raise IndexError(f"id {int(ids[a:b][bad][0])} out of range")
        for (a, b), (local, val) in zip(rows, checked, strict=True):
            e = torch.sparse_coo_tensor(torch.stack([local // hidden, local % hidden]), val,
                                        (vocab, hidden), is_coalesced=True,
                                        check_invariants=False)  # checked above
            y[a:b] += e.index_select(0, ids[a:b]).to_dense()  # [tokens, hidden]

    def rows_fix(self, y: torch.Tensor, scale: torch.Tensor, per_row: int,
                 gammas: list[torch.Tensor], betas: list[torch.Tensor], starts: list[int],
                 ends: list[int]) -> None:
        _float2d(y, "y")
        rows = _token_rows(starts, ends, per_row, y.shape[0], len(gammas), len(betas))
        for g, b in zip(gammas, betas, strict=True):
            for t in (g, b):
                if t.numel() and (t.dtype != torch.float32 or t.shape != (y.shape[1],)):
                    raise RuntimeError("[size] float32")
            if g.numel() and (scale.dtype != torch.float32 or scale.shape != y.shape):
                raise RuntimeError("scale like y")
        for (a, b), g, beta in zip(rows, gammas, betas, strict=True):
            if g.numel():
                y[a:b] += scale[a:b] * g
            if beta.numel():
                y[a:b] += beta


def _float2d(t: torch.Tensor, what: str) -> None:
    if t.dtype != torch.float32 or t.dim() != 2:
        raise RuntimeError(f"{what} must be a 2-D float32 tensor")


def _token_rows(starts: list[int], ends: list[int], per_row: int, rows: int,
                *counts: int) -> list[tuple[int, int]]:
    """The runs' token rows [per_row * start, per_row * end): inside the batch, in order."""
    if per_row <= 0 or any(c != len(starts) for c in (len(ends), *counts)):
        raise RuntimeError("one range a run")
    out: list[tuple[int, int]] = []
    for s, (a, b) in enumerate(zip(starts, ends, strict=True)):
        if not 0 <= a <= b <= rows // per_row or (out and out[-1][1] > a * per_row):
            raise IndexError(f"rows [{a}, {b}) of run {s} out of range or out of order")
        out.append((a * per_row, b * per_row))
    return out


def _checked_runs(idxs: list[torch.Tensor], vals: list[torch.Tensor],
                  numel: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [_checked_run(i, v, numel, s) for s, (i, v) in enumerate(zip(idxs, vals, strict=True))]


def _checked_run(idx: torch.Tensor, val: torch.Tensor, numel: int,
                 s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64 indices, values) of run s, every index inside [0, numel) and above the one before."""
    if idx.dtype not in (torch.int32, torch.int64) or val.dtype != torch.float32 \
            or idx.dim() != 1 or idx.shape != val.shape:
        raise RuntimeError("idx int32/int64 and float32 val of one length")
    local = idx.long()
    bad = (local < 0) | (local >= numel)
    bad[1:] |= local[1:] <= local[:-1]
    if bool(bad.any()):
        raise IndexError(f"delta index at position {int(torch.nonzero(bad)[0])} of run {s} is out "
                         "of place (outside its matrix or row, or not above the one before it)")
    return local, val


TWIN = TorchMixed()
