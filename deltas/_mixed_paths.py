"""The two ways `mixed.py` applies a batch's corrections, one chosen per Mixer at construction.

`KernelPath`: the compiled CPU kernels of `_mixed_kernel` (float32), one call per module and
correction kind for all the batch's tasks, reading each delta's own index and increment runs.
`TorchPath`: torch sparse CSR and index ops, any device (CUDA included), per task a product on its
rows. Both have one method per module kind (`linear`, `embedding`, `norm`), called from the
module's forward hook with the module's input x and output y ([batch, ..., features]); they add
the corrections to y in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NONE = torch.empty(0)  # the kernels' "no vector"


@dataclass(frozen=True, eq=False)
class Plan:
    """One module's corrections in one batch."""

    fixes: list[Any]  # per tile: its LinearFix / EmbeddingFix / NormFix, or None (the torch path)
    sparse: tuple[list, list, list, list]  # idx, val, start row, end row of each ΔW / ΔE
    vectors: tuple[list, list, list, list]  # Δγ, Δβ (or none, Δb), start row, end row
    gamma: bool  # any Δγ: the kernel needs norm(x)
    vocab: int  # ΔE's rows (an Embedding)


@dataclass(frozen=True, eq=False)
class Batch:
    """A mixing context's rows: tiles cover [0, rows) in order, one plan per corrected module."""

    tiles: list[tuple[int, int, Any]]  # (start row, end row, MixedDelta or None)
    rows: int
    counts: torch.Tensor  # [tiles] rows per tile, on the base's device
    plans: dict[str, Plan]


def unit_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's normalised input before its weight: what Δγ multiplies."""
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    h = x.to(torch.float32)  # as LlamaRMSNorm computes it: float32, then cast back
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    return h.to(x.dtype)


class KernelPath:
    """The compiled CPU kernels (float32): one call per correction kind for all the batch's tasks."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel

    def linear(self, batch: Batch, plan: Plan, module: nn.Module, x: torch.Tensor,
               y: torch.Tensor) -> None:
        per_row, y2 = _tokens(y)
        if plan.sparse[0]:
            self.kernel.linear_fix(x.reshape(-1, x.shape[-1]).contiguous(), y2, per_row,
                                   *plan.sparse)
        if plan.vectors[0]:
            self.kernel.rows_fix(y2, NONE, per_row, *plan.vectors)

    def embedding(self, batch: Batch, plan: Plan, module: nn.Module, ids: torch.Tensor,
                  y: torch.Tensor) -> None:
        per_row, y2 = _tokens(y)
        self.kernel.embedding_fix(ids.reshape(-1).long().contiguous(), y2, plan.vocab, per_row,
                                  *plan.sparse)

    def norm(self, batch: Batch, plan: Plan, module: nn.Module, x: torch.Tensor,
             y: torch.Tensor) -> None:
        per_row, y2 = _tokens(y)
        scale = unit_norm(module, x).reshape(y2.shape).contiguous() if plan.gamma else NONE
        self.kernel.rows_fix(y2, scale, per_row, *plan.vectors)


class TorchPath:
    """torch sparse CSR and index ops, any device: per task a product on its rows."""

    def linear(self, batch: Batch, plan: Plan, module: nn.Module, x: torch.Tensor,
               y: torch.Tensor) -> None:
        per_row, y2 = _tokens(y)
        x2 = x.reshape(-1, x.shape[-1])  # [tokens, in]
        for (a, b, _), f in zip(batch.tiles, plan.fixes, strict=True):
            if f is not None and f.weight is not None:  # y[a:b] += x[a:b] @ ΔWᵀ
                rows = slice(a * per_row, b * per_row)
                y2[rows].add_(torch.sparse.mm(f.weight.tensor, x2[rows].t().contiguous()).t())
        _add_per_row(batch, y, [f.bias if f is not None else None for f in plan.fixes])

    def embedding(self, batch: Batch, plan: Plan, module: nn.Module, ids: torch.Tensor,
                  y: torch.Tensor) -> None:
        per_row, y2 = _tokens(y)
        flat = ids.reshape(-1)  # [tokens]
        for (a, b, _), f in zip(batch.tiles, plan.fixes, strict=True):
            if f is not None:
                rows = slice(a * per_row, b * per_row)
                _add_rows(flat[rows].long(), y2[rows], f.weight.csr, f.weight.val)

    def norm(self, batch: Batch, plan: Plan, module: nn.Module, x: torch.Tensor,
             y: torch.Tensor) -> None:
        gammas = [f.weight if f is not None else None for f in plan.fixes]
        if any(g is not None for g in gammas):
            _add_per_row(batch, y, gammas, unit_norm(module, x))
        _add_per_row(batch, y, [f.bias if f is not None else None for f in plan.fixes])


def _tokens(y: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(tokens per batch row, y as [tokens, features]: a view, written in place)."""
    return y[0].numel() // y.shape[-1], y.view(-1, y.shape[-1])


def _add_per_row(batch: Batch, y: torch.Tensor, vectors: list[torch.Tensor | None],
                 scale: torch.Tensor | None = None) -> None:
    """y[rows of tile s] += vectors[s] (times `scale` where given), in one op."""
    if all(v is None for v in vectors):
        return
    size = y.shape[-1]
    zero = y.new_zeros(size)
    stacked = torch.stack([zero if v is None else v for v in vectors])  # [tiles, size]
    rows = torch.repeat_interleave(stacked, batch.counts, dim=0, output_size=batch.rows)
    rows = rows.view(batch.rows, *([1] * (y.dim() - 2)), size)  # broadcast over tokens
    if scale is None:
        y.add_(rows)
    else:
        y.addcmul_(scale, rows)


def _add_rows(ids: torch.Tensor, y: torch.Tensor, csr: tuple[torch.Tensor, torch.Tensor],
              val: torch.Tensor) -> None:
    """y[t] += ΔE[ids[t]] for every token t, vectorised over the tokens' stored entries."""
    crow, col = csr
    starts = crow[ids].long()
    counts = crow[ids + 1].long() - starts
    total = int(counts.sum())
    if total == 0:
        return
    token = torch.repeat_interleave(torch.arange(ids.numel(), device=ids.device), counts,
                                    output_size=total)
    first = torch.cumsum(counts, 0) - counts  # where each token's entries start in the run
    pos = torch.arange(total, device=ids.device) + torch.repeat_interleave(
        starts - first, counts, output_size=total)  # [total] positions in col / val
    y.index_put_((token, col[pos].long()), val[pos], accumulate=True)
