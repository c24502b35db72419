"""Synthetic deltas for load tests and benchmarks: random sorted indices, small random increments."""

from __future__ import annotations

import torch

from .base import Base
from .format import DeltaMeta, Provenance, SparseTensor, TaskDelta
from .heads import head_spec


def random_indices(numel: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct sorted flat indices in [0, numel), uniformly at random."""
    k = min(k, numel)
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    if k * 4 > numel:  # dense enough that a permutation is cheap
        return torch.randperm(numel, generator=gen)[:k].sort().values
    picked = torch.unique(torch.randint(0, numel, (int(k * 1.1) + 16,), generator=gen))
    while picked.numel() < k:
        more = torch.randint(0, numel, (k,), generator=gen)
        picked = torch.unique(torch.cat([picked, more]))
    return picked[torch.randperm(picked.numel(), generator=gen)[:k]].sort().values


def random_delta(base: Base, density: float, seed: int = 0, kind: str | None = None,
                 labels: list[str] | None = None, scale: float = 0.01) -> TaskDelta:
    """A delta with round(density * numel) random entries in every base tensor."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    gen = torch.Generator().manual_seed(seed)
    kind = kind or ("generate" if base.is_causal_lm else "embed")
    labels = labels or {"classify": ["negative", "positive"], "regress": ["score"]}.get(kind, [])
    tensors = {}
    for name, p in base.params.items():
        idx = random_indices(p.numel(), round(density * p.numel()), gen)
        if idx.numel():
            val = (torch.randn(idx.numel(), generator=gen) * scale).to(p.dtype)
            tensors[name] = SparseTensor(idx.to(torch.int32 if p.numel() < 2**31 else torch.int64), val)
    heads = {}
    for name, (shape, dtype) in head_spec(base, kind, len(labels)).items():
        heads[name] = (torch.randn(shape, generator=gen) * scale).to(dtype)
    nnz = sum(t.nnz for t in tensors.values())
    meta = DeltaMeta(base_fingerprint=base.fingerprint, base_name=base.name, kind=kind, labels=labels,
                     provenance=Provenance(method="random", density=nnz / base.numel, seed=seed))
    return TaskDelta(meta=meta, tensors=tensors, heads=heads)
