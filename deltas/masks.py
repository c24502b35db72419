"""Which entries a sparse fine-tune may change: masks as sorted flat int64 indices per base tensor.

- `grad`: |gradient| summed over the first N batches, top-k per tensor (SIFT);
- `fisher`: squared gradient summed over N batches, global top-k (FISH mask, Child-Tuning-D; batch
  gradients stand in for per-example ones, which would cost N x batch backward passes);
- `magnitude`: the largest |base weight| per tensor;
- `random`: uniformly random entries per tensor, seeded.
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
