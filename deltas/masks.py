"""Which entries a sparse fine-tune may change: masks as sorted flat int64 indices per base tensor.

- `grad`: |gradient| summed over the first N batches, top-k per tensor (SIFT);
- `fisher`: squared gradient summed over N batches, global top-k (FISH mask, Child-Tuning-D; batch
  gradients stand in for per-example ones, which would cost N x batch backward passes);
- `magnitude`: the largest |base weight| per tensor;
- `random`: uniformly random entries per tensor, seeded.

`block_mask` turns any per-entry scores into a block-structured mask: runs of `block` consecutive
entries along a row (the last dimension; a run is cut at the row's end), chosen by their summed
score. The swap takes a faster path for such masks (docs/performance.md).

`update_mask` is the mask of diff pruning's route (`train.train_dense_extract`): the largest
|w - w0| of a short dense fine-tune, over all tensors together, with 1-D tensors (biases and
LayerNorm) optionally always in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .synth import random_indices

MaskKind = Literal["grad", "fisher", "magnitude", "random"]
MASK_KINDS: tuple[str, ...] = ("grad", "fisher", "magnitude", "random")
Mask = dict[str, torch.Tensor]  # base tensor name -> [k] int64 flat indices, strictly increasing


@dataclass(frozen=True)
class GradScores:
    """Per-entry gradient statistics over the scoring batches, one tensor per base tensor."""

    abs_sum: dict[str, torch.Tensor]  # sum of |g|, same shape as the base tensor
    sq_sum: dict[str, torch.Tensor]  # sum of g^2
    batches: int


def accumulate_grads(grads: Iterable[dict[str, torch.Tensor]]) -> GradScores:
    """Sum |g| and g^2 over the dense gradients of several batches (float32)."""
    abs_sum: dict[str, torch.Tensor] = {}
    sq_sum: dict[str, torch.Tensor] = {}
    n = 0
    for g in grads:
        n += 1
        for name, t in g.items():
            t = t.detach().float()
            if name not in abs_sum:
                abs_sum[name], sq_sum[name] = t.abs(), t.square()
            else:
                abs_sum[name] += t.abs()
                sq_sum[name] += t.square()
    return GradScores(abs_sum=abs_sum, sq_sum=sq_sum, batches=n)


def mask_from_scores(kind: str, scores: GradScores, density: float, exclude: Sequence[str] = ()) -> Mask:
    """`density` of all scored entries; tensors whose name contains an `exclude` string get none,
    and their share of the budget goes to the others."""
    chosen = scores.abs_sum if kind == "grad" else scores.sq_sum
    if kind not in ("grad", "fisher"):
        raise ValueError(f"mask {kind!r} is not computed from gradients")
    kept = {n: s for n, s in chosen.items() if not any(part in n for part in exclude)}
    if not kept:
        raise ValueError(f"--exclude {list(exclude)} leaves no tensor to train")
    _check_density(density)
    scale = sum(s.numel() for s in chosen.values()) / sum(s.numel() for s in kept.values())
    density = min(1.0, density * scale)
    return top_per_tensor(kept, density) if kind == "grad" else top_global(kept, density)


def magnitude_mask(params: dict[str, torch.Tensor], density: float) -> Mask:
    return top_per_tensor({n: p.detach().abs() for n, p in params.items()}, density)


def random_mask(params: dict[str, torch.Tensor], density: float, seed: int = 0) -> Mask:
    gen = torch.Generator().manual_seed(seed)
    return {n: random_indices(p.numel(), round(density * p.numel()), gen).to(p.device)
            for n, p in sorted(params.items())}


def top_per_tensor(scores: dict[str, torch.Tensor], density: float) -> Mask:
    """round(density * numel) highest-scoring entries of every tensor; zero scores never chosen."""
    _check_density(density)
    return {n: _top(s.reshape(-1), round(density * s.numel())) for n, s in scores.items()}


def top_global(scores: dict[str, torch.Tensor], density: float) -> Mask:
    """round(density * total entries) highest-scoring entries over all tensors together."""
    _check_density(density)
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).float() for n in names])  # [total entries]
    chosen = _top(flat, round(density * flat.numel()))
    out, start = {}, 0
    for n in names:
        stop = start + scores[n].numel()
        lo, hi = torch.searchsorted(chosen, torch.tensor([start, stop], device=chosen.device))
        out[n] = chosen[lo:hi] - start
        start = stop
    return out


def block_mask(scores: dict[str, torch.Tensor], density: float, block: int,
               scope: str = "global") -> Mask:
    """Runs of `block` entries along the last dimension, the highest summed scores first, about
    round(density * entries) entries in all (`global`) or per tensor (`per-tensor`). A row whose
    length is not a multiple of `block` ends in a shorter run. Blocks scoring 0 are never chosen."""
    _check_density(density)
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    names = sorted(scores)
    sums: dict[str, torch.Tensor] = {}
    for n in names:
        s = scores[n].float()
        s = s.reshape(1, -1) if s.dim() < 2 else s.reshape(-1, s.shape[-1])  # [rows, cols]
        cols = s.shape[1]
        pad = -cols % block
        padded = torch.nn.functional.pad(s, (0, pad))  # [rows, cols + pad]
        sums[n] = padded.reshape(s.shape[0], -1, block).sum(-1).reshape(-1)  # [rows * blocks per row]
    if scope == "per-tensor":
        chosen = {n: _top(sums[n], max(1, round(density * scores[n].numel() / block))) for n in names}
    else:
        flat = torch.cat([sums[n] for n in names])  # [all blocks]
        picked = _top(flat, max(1, round(density * sum(scores[n].numel() for n in names) / block)))
        chosen, start = {}, 0
        for n in names:
            stop = start + sums[n].numel()
            lo, hi = torch.searchsorted(picked, torch.tensor([start, stop], device=picked.device))
            chosen[n], start = picked[lo:hi] - start, stop
    out = {}
    for n in names:
        shape = scores[n].shape
        cols = shape[-1] if len(shape) >= 1 else 1
        per_row = -(-cols // block)
        b = chosen[n].cpu()
        rows, col0 = b // per_row, (b % per_row) * block
        starts = rows * cols + col0  # [chosen blocks]
        idx = (starts[:, None] + torch.arange(block)[None, :]).reshape(-1)  # [blocks * block]
        ok = (col0[:, None] + torch.arange(block)[None, :]).reshape(-1) < cols
        out[n] = idx[ok].to(scores[n].device)  # sorted: blocks are sorted and never overlap
    return out


def update_mask(updates: dict[str, torch.Tensor], density: float, always: Sequence[str] = (),
                block: int | None = None) -> Mask:
    """round(density * entries) largest |update| over all tensors together (zeros never chosen);
    the tensors named in `always` (e.g. biases and norms) are taken whole, out of the same budget,
    while they fill at most half of it (below that density they compete like the rest: a mask
    never exceeds its budget). `block`: runs of that many entries along a row instead of single
    entries."""
    _check_density(density)
    total = sum(u.numel() for u in updates.values())
    whole = {n: torch.nonzero(updates[n].reshape(-1)).reshape(-1) for n in always if n in updates}
    budget, taken = round(density * total), sum(int(i.numel()) for i in whole.values())
    if 2 * taken > budget:
        whole, taken = {}, 0
    rest = {n: u.detach().abs() for n, u in updates.items() if n not in whole}
    budget -= taken
    if budget <= 0 or not rest:
        return whole
    share = min(1.0, budget / sum(u.numel() for u in rest.values()))
    picked = block_mask(rest, share, block) if block else top_global(rest, share)
    return {**picked, **whole}


def _top(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted int64 indices of the k largest positive entries (fewer if fewer are positive)."""
    k = min(k, int((flat > 0).sum()))
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=flat.device)
    return torch.topk(flat, k, sorted=False).indices.sort().values


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")


def mask_nnz(mask: Mask) -> int:
    return sum(int(i.numel()) for i in mask.values())
