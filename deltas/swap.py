"""The in-place swap: write a task's delta into the live base weights, then restore them exactly.

`apply` gathers the base values at the delta's indices and keeps them, then scatters
`base + increment` (computed in the base dtype) there. `restore` scatters the kept values back.
Restoring by writing saved values, never by subtracting, keeps the base bit-identical after any
number of swaps and makes a swapped-in task compute exactly what the offline merged model does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .base import Base
from .errors import SwapError
from .format import TaskDelta
from .heads import build_classifier


@dataclass(frozen=True, eq=False)
class PreparedDelta:
    """A delta decoded once into the swap's working form, on the base's device."""

    name: str
    kind: str
    labels: tuple[str, ...]
    names: tuple[str, ...]  # base tensor names, one per (idx, inc) pair
    idx: tuple[torch.Tensor, ...]  # [nnz] int64, strictly increasing
    inc: tuple[torch.Tensor, ...]  # [nnz] in the base tensor's dtype
    head: torch.nn.Module | None = None  # the task model for classify (shares the backbone)

    @property
    def nnz(self) -> int:
        return sum(i.numel() for i in self.idx)

    @property
    def nbytes(self) -> int:
        """Bytes held on the device: indices, increments and head parameters."""
        own = sum(i.numel() * i.element_size() for i in self.idx + self.inc)
        if self.head is None:
            return own
        shared = {id(p) for p in self.head.base_model.parameters()}
        return own + sum(p.numel() * p.element_size() for p in self.head.parameters()
                         if id(p) not in shared)


def prepare(delta: TaskDelta, base: Base, name: str = "") -> PreparedDelta:
    """Decode a (validated) delta for `base`: int64 indices, base-dtype increments, built head."""
    names, idx, inc = [], [], []
    for tensor_name, sparse in delta.tensors.items():
        target = base.params[tensor_name]
        names.append(tensor_name)
        idx.append(sparse.idx.to(device=target.device, dtype=torch.int64))
        inc.append(sparse.val.to(device=target.device, dtype=target.dtype))
    head = None
    if delta.meta.kind == "classify":
        head = build_classifier(base, list(delta.meta.labels), delta.heads)
    return PreparedDelta(name=name, kind=delta.meta.kind, labels=tuple(delta.meta.labels),
                         names=tuple(names), idx=tuple(idx), inc=tuple(inc), head=head)


class Swapper:
    """Owns the swapped-in state of one base. Not thread-safe: one engine worker drives it."""

    def __init__(self, base: Base) -> None:
        self.base = base
        self._flat = {n: p.data.view(-1) for n, p in base.params.items()}  # views of live storage
        self._kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._active: PreparedDelta | None = None

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
        kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        try:
            for name, idx, inc in zip(delta.names, delta.idx, delta.inc, strict=True):
                flat = self._flat[name]
                saved = flat.index_select(0, idx)  # gather_base
                kept.append((flat, idx, saved))
                flat.index_copy_(0, idx, saved + inc)  # scatter_task
        except BaseException:
            _write_back(kept)  # a failure half-way leaves the base as it was
            raise
        self._kept = kept
        self._active = delta

    @torch.no_grad()
    def restore(self) -> None:
        _write_back(self._kept)
        self._kept = []
        self._active = None

    @contextmanager
    def swapped(self, delta: PreparedDelta) -> Iterator[torch.nn.Module]:
        self.apply(delta)
        try:
            yield self.task_model
        finally:
            self.restore()


def _write_back(kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    for flat, idx, saved in reversed(kept):
        flat.index_copy_(0, idx, saved)


@torch.no_grad()
def merge_into(params: dict[str, torch.Tensor], delta: PreparedDelta) -> None:
    """Offline merge into a separate copy's tensors (by base name): the reference a swap must match."""
    for name, idx, inc in zip(delta.names, delta.idx, delta.inc, strict=True):
        flat = params[name].data.view(-1)
        flat[idx] = flat[idx] + inc
