"""The swap's kernel (`csrc/swap.cpp`) and its torch twin: the same two entry points.

    apply(buf, segs, idx, inc, kept, threads) -> int    # -1, or the first bad entry's position
    restore(buf, segs, idx, kept, threads) -> None

A delta is packed (see `swap.Packed`) per weight buffer as one run of local indices, one run of
increments and a [3, segments] int64 table: each segment is one base tensor, its offset in the
buffer, its size and where its entries end in the run. `apply` keeps the weight at every entry
and writes `weight + increment` (in the weight's dtype, as torch computes it); at a bad index
(outside its tensor, or not above the one before it) it writes nothing, or undoes what it wrote,
and returns the entry's position. `restore` writes the kept values back, skipping an index
outside its tensor. Whatever they are given, neither reads or writes outside its tensors.

The compiled kernel (CPU) fuses gather, check and write in one pass split over torch's threads;
docs/performance.md (section 1) has its measurements and the alternatives tried. The twin uses
torch index ops on any device, checking every index vectorised first; it remembers the checked
positions of a run (while the run's tensors live and are not modified in place), so a delta
swapped again is not checked again. `pick(...)` chooses one of the two, once, for a Swapper.
"""

from __future__ import annotations

import os
import threading
import weakref
from types import ModuleType
from typing import Protocol

import torch

from . import _build

DISABLE_ENV = "TASKDELTA_SWAP_KERNEL"  # "0" turns the kernel off (the torch twin is used)
SOURCE = _build.source("swap")

_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}
_variants: dict[tuple[str, ...], ModuleType | None] = {}


class SwapOps(Protocol):
    def apply(self, buf: torch.Tensor, segs: torch.Tensor, idx: torch.Tensor, inc: torch.Tensor,
              kept: torch.Tensor, threads: int) -> int: ...

    def restore(self, buf: torch.Tensor, segs: torch.Tensor, idx: torch.Tensor, kept: torch.Tensor,
                threads: int) -> None: ...


def load() -> ModuleType | None:
    """The compiled kernel, built on first use; None (warned once) where it cannot be built,
    unless TASKDELTA_REQUIRE_KERNELS=1 (then `_build.KernelBuildError`)."""
    with _lock:
        if "module" not in _state:
            off = os.environ.get(DISABLE_ENV, "1") == "0"
            _state["module"] = None if off else _build.build("swap", SOURCE)
        return _state["module"]


def variant(**defines: int) -> ModuleType | None:
    """The kernel built with other tuning knobs (`variant(TD_AHEAD=16)`): for bench/swap.py to
    time alternatives against the default in one process."""
    flags = tuple(f"-D{k}={v}" for k, v in sorted(defines.items()))
    with _lock:
        if flags not in _variants:
            _variants[flags] = _build.build("swap", SOURCE, flags)
        return _variants[flags]


def reset() -> None:
    """Forget the loaded kernel (tests: to exercise the fallback and the build again)."""
    with _lock:
        _state.clear()
        _variants.clear()


def pick(want_kernel: bool) -> SwapOps:
    """The compiled kernel where wanted and built, else the torch twin."""
    module = load() if want_kernel else None
    return module if module is not None else TWIN  # type: ignore[return-value]


class TorchSwap:
    """The kernel's torch twin (any device): the same entry points, results and refusals."""

    def __init__(self) -> None:
        # id(idx) -> (idx, idx version, segs, segs version, checked positions); weakly held
        self._checked: dict[int, tuple[weakref.ref, int, weakref.ref, int, torch.Tensor]] = {}

    def apply(self, buf: torch.Tensor, segs: torch.Tensor, idx: torch.Tensor, inc: torch.Tensor,
              kept: torch.Tensor, threads: int = 1) -> int:
        _check_args(buf, segs, idx, inc, kept)
        where = self.positions(segs, idx)
        if isinstance(where, int):
            return where
        kept = kept[: idx.numel()]
        torch.index_select(buf, 0, where, out=kept)  # gather_base
        try:
            buf.index_copy_(0, where, kept + inc)  # scatter_task
        except BaseException:
            buf.index_copy_(0, where, kept)
            raise
        return -1

    def restore(self, buf: torch.Tensor, segs: torch.Tensor, idx: torch.Tensor, kept: torch.Tensor,
                threads: int = 1) -> None:
        _check_args(buf, segs, idx, kept, kept)
        where = self.positions(segs, idx)
        if isinstance(where, int):  # edited since apply: the entries inside their tensors only
            local, limit, off = _expand(segs, idx)
            ok = (local >= 0) & (local < limit)
            buf.index_copy_(0, (local + off)[ok], kept[: idx.numel()][ok])
            return
        buf.index_copy_(0, where, kept[: idx.numel()])

    def positions(self, segs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor | int:
        """[nnz] int64 positions in the buffer of a checked run, or the first bad entry."""
        memo = self._checked.get(id(idx))
        if memo is not None and memo[0]() is idx and memo[1] == idx._version \
                and memo[2]() is segs and memo[3] == segs._version:
            return memo[4]
        found = _positions(segs, idx)
        if not isinstance(found, int):
            key = id(idx)
            self._checked[key] = (weakref.ref(idx, lambda _r, k=key: self._checked.pop(k, None)),
                                  idx._version, weakref.ref(segs), segs._version, found)
        return found

    def held_bytes(self, idx: torch.Tensor) -> int:
        """Bytes of the checked positions kept for the run `idx` (counted in a delta's size)."""
        memo = self._checked.get(id(idx))
        return memo[4].nbytes if memo is not None and memo[0]() is idx else 0


def _expand(segs: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(local index, its tensor's size, its tensor's offset), each [nnz] int64 on idx's device."""
    off, numel, end = segs.to(idx.device)
    counts = torch.diff(end, prepend=end.new_zeros(1))
    nnz = idx.numel()
    return (idx.long(), torch.repeat_interleave(numel, counts, output_size=nnz),
            torch.repeat_interleave(off, counts, output_size=nnz))


def _positions(segs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor | int:
    local, limit, off = _expand(segs, idx)
    bad = (local < 0) | (local >= limit)
    if local.numel() > 1:
        step_ok = local[1:] > local[:-1]
        end = segs[2].to(idx.device)
        seams = end[:-1][(end[:-1] > 0) & (end[:-1] < local.numel())] - 1
        step_ok[seams] = True  # a new tensor starts after each seam: its own order
        bad[1:] |= ~step_ok
    if bool(bad.any()):
        return int(torch.nonzero(bad)[0])
    return local + off


def _check_args(buf: torch.Tensor, segs: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor,
                kept: torch.Tensor) -> None:
    """What the kernel's `checked_segments` refuses, with its messages."""
    if buf.dim() != 1 or segs.dtype != torch.int64 or segs.dim() != 2 or segs.shape[0] != 3:
        raise RuntimeError("buffer 1-D, segments int64 [3, count]")
    if idx.dtype not in (torch.int32, torch.int64) or idx.dim() != 1:
        raise RuntimeError("indices must be int32 or int64")
    if vals.dtype != buf.dtype or kept.dtype != buf.dtype:
        raise RuntimeError("values, kept values and buffer must share a dtype")
    if vals.numel() != idx.numel() or kept.numel() < idx.numel():
        raise RuntimeError("indices, values and kept values differ in length")
    before, used = 0, 0
    for s, (off, numel, end) in enumerate(segs.t().tolist()):
        if not (0 <= off <= buf.numel() and 0 <= numel <= buf.numel() - off):
            raise RuntimeError(f"segment {s} lies outside the buffer")
        if off < used:
            raise RuntimeError(f"segment {s} overlaps the one before it")
        if end < before:
            raise RuntimeError("segment ends out of order")
        before, used = end, off + numel
    if before != idx.numel():
        raise RuntimeError("segments do not cover the indices")


TWIN = TorchSwap()
