"""The in-place swap: write a task's delta into the live base weights, then restore them exactly.

`apply` gathers the base values at the delta's indices and keeps them, then writes
`base + increment` (computed in the base dtype) there. `restore` writes the kept values back.
Restoring by writing saved values, never by subtracting, keeps the base bit-identical after any
number of swaps and makes a swapped-in task compute exactly what the offline merged model does.

The base's weights live in one flat buffer per dtype (`layout.py`), and `prepare` packs a delta
per buffer (`Packed`), so one call swaps a whole delta: the compiled kernel on CPU (`_kernel.py`:
gather, check and write fused in one pass), else its torch twin, index ops on global indices
(CUDA, or a CPU where the kernel cannot be built). The Swapper picks one at construction; both
check every index, give the same bits and never write outside a tensor.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Literal

import torch

from . import _kernel
from .base import Base
from .errors import SwapError
from .format import HEAD_KINDS, TaskDelta
from .heads import build_classifier
from .layout import FlatLayout, consolidate

Backend = Literal["auto", "kernel", "torch"]


@dataclass(frozen=True, eq=False)
class Packed:
    """A delta's entries for one weight buffer: what one kernel call (or one index op) writes."""

    dtype: torch.dtype
    names: tuple[str, ...]  # one per segment
    segs: torch.Tensor  # [3, segments] int64, CPU: offset in the buffer, numel, end of its entries
    idx: torch.Tensor  # [nnz] int32 (int64 if a tensor has 2^31+ entries): indices local to a tensor
    inc: torch.Tensor  # [nnz] the buffer's dtype

    @property
    def nnz(self) -> int:
        return self.idx.numel()

    @property
    def nbytes(self) -> int:
        return self.idx.nbytes + self.inc.nbytes + _kernel.TWIN.held_bytes(self.idx)

    def locate(self, k: int) -> tuple[str, int]:
        """The tensor entry k of the run belongs to, and its position within that tensor."""
        ends = self.segs[2].tolist()
        s = bisect.bisect_right(ends, k)
        return self.names[s], k - (ends[s - 1] if s else 0)

    @property
    def global_idx(self) -> torch.Tensor:
        """[nnz] int64 indices into the buffer, as the torch twin checks and keeps them (inside
        its tensor, strictly increasing)."""
        where = _kernel.TWIN.positions(self.segs, self.idx)
        if isinstance(where, int):
            raise _bad_index(self, where)
        return where


@dataclass(frozen=True, eq=False)
class Plan:
    """A delta packed for one base layout."""

    layout: FlatLayout
    parts: tuple[Packed, ...]


@dataclass(frozen=True, eq=False)
class PreparedDelta:
    """A delta decoded once into the swap's working form, on the base's device.

    `idx` and `inc` are per-tensor views into `plan`'s packed runs when `prepare` made it; a
    PreparedDelta built by hand (no plan) is packed by the Swapper on every apply.
    """

    name: str
    kind: str
    labels: tuple[str, ...]
    names: tuple[str, ...]  # base tensor names, one per (idx, inc) pair
    idx: tuple[torch.Tensor, ...]  # [nnz] int32 (int64 for 2^31+ entries), strictly increasing
    inc: tuple[torch.Tensor, ...]  # [nnz] in the base tensor's dtype
    head: torch.nn.Module | None = None  # the task model for classify/regress (shares the backbone)
    plan: Plan | None = field(default=None, repr=False)

    @property
    def nnz(self) -> int:
        return sum(i.numel() for i in self.idx)

    @property
    def nbytes(self) -> int:
        """Bytes held on the device: indices, increments and head parameters."""
        if self.plan is not None:
            own = sum(p.nbytes for p in self.plan.parts)
        else:
            own = sum(i.numel() * i.element_size() for i in self.idx + self.inc)
        if self.head is None:
            return own
        shared = {id(p) for p in self.head.base_model.parameters()}
        return own + sum(p.numel() * p.element_size() for p in self.head.parameters()
                         if id(p) not in shared)


def layout_of(base: Base) -> FlatLayout:
    if base.layout is None:
        base.layout = consolidate(base.params)
    return base.layout


def prepare(delta: TaskDelta, base: Base, name: str = "") -> PreparedDelta:
    """Decode a (validated) delta for `base`: packed per weight buffer, increments in the base
    dtype, on the base's device; for classify and regress, the head model built."""
    layout = layout_of(base)
    device = base.device
    sparse = {n: (sp.idx, sp.val.to(layout.dtype[n])) for n, sp in delta.tensors.items()
              if n in layout.dtype}
    sparse |= {n: (sp.idx, sp.val) for n, sp in delta.tensors.items() if n not in layout.dtype}
    plan = Plan(layout, pack(layout, sparse, device))
    if device.type != "cpu":  # the torch twin's positions, checked and kept here, not in the swap
        for part in plan.parts:
            _ = part.global_idx
    names, idx, inc = [], [], []
    for part in plan.parts:
        ends = [0, *part.segs[2].tolist()]
        names += part.names
        idx += [part.idx[a:b] for a, b in zip(ends, ends[1:], strict=False)]
        inc += [part.inc[a:b] for a, b in zip(ends, ends[1:], strict=False)]
    head = None
    if delta.meta.kind in HEAD_KINDS:
        head = build_classifier(base, list(delta.meta.labels), delta.heads)
    return PreparedDelta(name=name, kind=delta.meta.kind, labels=tuple(delta.meta.labels),
                         names=tuple(names), idx=tuple(idx), inc=tuple(inc), head=head, plan=plan)


def pack(layout: FlatLayout, sparse: dict[str, tuple[torch.Tensor, torch.Tensor]],
         device: torch.device | str) -> tuple[Packed, ...]:
    """Concatenate per-tensor (idx, inc) pairs into one run per buffer, tensors in buffer order.

    Checks what the kernel cannot see (a known tensor, lengths, the increment's dtype); the
    indices themselves are checked as they are written."""
    groups: dict[torch.dtype, list[str]] = {}
    for name in sparse:
        if name not in layout.offset:
            raise KeyError(f"{name!r} is not a tensor of this base")
        groups.setdefault(layout.dtype[name], []).append(name)
    parts = []
    for dtype, names in groups.items():
        names.sort(key=layout.offset.__getitem__)
        for n in names:
            i, v = sparse[n]
            if i.dim() != 1 or v.dim() != 1 or i.numel() != v.numel():
                raise SwapError(f"tensor {n!r}: {i.numel()} indices but {v.numel()} increments")
            if i.dtype not in (torch.int32, torch.int64):
                raise SwapError(f"tensor {n!r}: {i.dtype} indices (int32 or int64 only)")
            if v.dtype != dtype:
                raise SwapError(f"tensor {n!r}: {v.dtype} increments on a {dtype} tensor")
        # int32 unless a tensor needs more, or an index arrived as int64 (never narrowed: no wrap)
        wide = any(layout.numel[n] >= 2**31 or sparse[n][0].dtype != torch.int32 for n in names)
        itype = torch.int64 if wide else torch.int32
        counts = [sparse[n][0].numel() for n in names]
        segs = torch.tensor([[layout.offset[n] for n in names], [layout.numel[n] for n in names],
                             list(accumulate(counts))], dtype=torch.int64).reshape(3, len(names))
        idx = torch.cat([sparse[n][0].reshape(-1) for n in names]).to(device=device, dtype=itype)
        inc = torch.cat([sparse[n][1].reshape(-1) for n in names]).to(device)
        parts.append(Packed(dtype=dtype, names=tuple(names), segs=segs, idx=idx, inc=inc))
    return tuple(parts)


def _bad_index(part: Packed, k: int) -> IndexError:
    name, at = part.locate(k)
    value = int(part.idx[k])
    numel = int(part.segs[1][part.names.index(name)])
    why = "out of range" if not 0 <= value < numel else "not above the one before it"
    return IndexError(f"tensor {name!r}: index {value} at position {at} is {why} (the tensor has "
                      f"{numel} entries; indices must be strictly increasing)")


class Swapper:
    """Owns the swapped-in state of one base. Not thread-safe: one engine worker drives it.

    backend: "kernel" (the compiled CPU loop; an error if it cannot be built), "torch" (its torch
    twin, index ops; any device), or "auto": the kernel on CPU where it builds, else the twin.
    The two have the same entry points (`_kernel.SwapOps`): picked here, once.
    """

    def __init__(self, base: Base, backend: Backend = "auto") -> None:
        self.base = base
        self.layout = layout_of(base)
        self._buffers = dict(self.layout.buffers)
        self._ops = self._pick_ops(backend)
        self.backend = "torch" if self._ops is _kernel.TWIN else "kernel"
        self._applied: list[tuple[Packed, torch.Tensor]] = []  # (part, kept values) in apply order
        self._spare: dict[torch.dtype, torch.Tensor] = {}  # the kernel's kept values, reused
        self._active: PreparedDelta | None = None

    def _pick_ops(self, backend: Backend) -> _kernel.SwapOps:
        on_cpu = all(b.device.type == "cpu" for b in self.layout.buffers.values())
        ops = _kernel.pick(want_kernel=backend != "torch" and on_cpu)
        if backend == "kernel" and ops is _kernel.TWIN:
            raise SwapError("the swap kernel is not available (CPU only; see the log for why)")
        return ops

    @property
    def active(self) -> PreparedDelta | None:
        return self._active

    @property
    def task_model(self) -> torch.nn.Module:
        """The module to run now: the task's head model if it has one, else the base model."""
        if self._active is not None and self._active.head is not None:
            return self._active.head
        return self.base.model

    @torch.no_grad()
    def apply(self, delta: PreparedDelta) -> None:
        if self._active is not None:
            raise SwapError(f"task {self._active.name!r} is swapped in; restore() before applying "
                            f"{delta.name!r}")
        parts = self._parts(delta)
        done: list[tuple[Packed, torch.Tensor]] = []
        try:
            for part in parts:
                done.append((part, self._swap_in(part)))  # all of the part written, or none of it
        except BaseException:
            self._write_back(done)  # a failure half-way leaves the base as it was
            raise
        self._applied = done
        self._active = delta

    @torch.no_grad()
    def restore(self) -> None:
        self._write_back(self._applied)
        self._applied = []
        self._active = None

    @contextmanager
    def swapped(self, delta: PreparedDelta) -> Iterator[torch.nn.Module]:
        self.apply(delta)
        try:
            yield self.task_model
        finally:
            self.restore()

    def _parts(self, delta: PreparedDelta) -> tuple[Packed, ...]:
        if delta.plan is not None and delta.plan.layout is self.layout:
            return delta.plan.parts
        if len(set(delta.names)) != len(delta.names):
            raise SwapError(f"delta {delta.name!r} names a tensor twice")
        sparse = dict(zip(delta.names, zip(delta.idx, delta.inc, strict=True), strict=True))
        return pack(self.layout, sparse, self.base.device)

    def _swap_in(self, part: Packed) -> torch.Tensor:
        """Keep and write one part; returns the kept values. On error nothing of it is written."""
        buf = self._buffers[part.dtype]
        kept = self._kept_buffer(part)
        bad = self._ops.apply(buf, part.segs, part.idx, part.inc, kept, torch.get_num_threads())
        if bad >= 0:  # nothing is left written
            raise _bad_index(part, bad)
        return kept

    def _write_back(self, done: list[tuple[Packed, torch.Tensor]]) -> None:
        for part, kept in reversed(done):
            # (an index edited out of its tensor since apply is skipped)
            self._ops.restore(self._buffers[part.dtype], part.segs, part.idx, kept,
                              torch.get_num_threads())

    def _kept_buffer(self, part: Packed) -> torch.Tensor:
        spare = self._spare.get(part.dtype)
        if spare is None or spare.numel() < part.nnz:
            spare = torch.empty(part.nnz, dtype=part.dtype, device=part.inc.device)
            self._spare[part.dtype] = spare
        return spare[: part.nnz]


@torch.no_grad()
def merge_into(params: dict[str, torch.Tensor], delta: PreparedDelta) -> None:
    """Offline merge into a separate copy's tensors (by base name): the reference a swap must match."""
    for name, idx, inc in zip(delta.names, delta.idx, delta.inc, strict=True):
        flat = params[name].data.view(-1)
        idx = idx.long()
        flat[idx] = flat[idx] + inc
