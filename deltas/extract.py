"""Extract a sparse delta from a full fine-tune: keep the largest |finetuned - base| entries.

Tensors of the fine-tuned model that map to base tensors become sparse entries; modules the base
lacks (a classification head) are stored dense under `head::`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from .base import Base
from .format import HEAD_KINDS, DeltaMeta, Provenance, SparseTensor, TaskDelta

Scope = Literal["global", "per-tensor"]
Progress = Callable[[str], None]


def load_finetuned(folder: str | Path) -> Any:
    """A fine-tuned model folder, in the class its config names (safetensors only)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    arch = (config.architectures or ["AutoModel"])[0]
    cls = getattr(transformers, arch, None) or transformers.AutoModel
    return cls.from_pretrained(folder, dtype=torch.float32, use_safetensors=True).eval()


def infer_kind(model: Any) -> str:
    """A sequence classifier with one output is a regression (as transformers reads num_labels=1)."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "regress" if getattr(model.config, "num_labels", 2) == 1 else "classify"
    if name.endswith("ForCausalLM"):
        return "generate"
    return "embed"


def split_params(base: Base, finetuned: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base name -> fine-tuned tensor, head name -> tensor) for every fine-tuned parameter."""
    ft_prefix = finetuned.base_model_prefix + "."
    base_prefix = "" if base.model.base_model is base.model else base.model.base_model_prefix + "."
    sparse, heads = {}, {}
    for name, p in finetuned.named_parameters():
        rel = name[len(ft_prefix):] if name.startswith(ft_prefix) else None
        target = (base.canonical(base_prefix + rel) if rel is not None else None) or base.canonical(name)
        if target is not None and tuple(base.params[target].shape) == tuple(p.shape):
            if target in sparse:  # e.g. an LM head untied from the base's tied embedding
                raise ValueError(f"fine-tuned tensor {name!r} and another one both map to base "
                                 f"tensor {target!r} (tied in the base); a delta holds only one")
            sparse[target] = p.detach()
        else:
            heads[name] = p.detach()
    return sparse, heads


@torch.no_grad()
def extract(base: Base, finetuned: Any, density: float, scope: Scope = "global",
            kind: str | None = None, labels: list[str] | None = None,
            progress: Progress | None = None) -> TaskDelta:
    """Keep round(density * base entries) largest-magnitude differences (zeros never kept)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    sparse_ft, heads = split_params(base, finetuned)
    diffs = {}
    for name, ft in sparse_ft.items():
        b = base.params[name]
        diffs[name] = (ft.to(device=b.device, dtype=b.dtype) - b).reshape(-1)  # in the base dtype
        if progress:
            progress(name)
    keep = _select(diffs, base, density, scope)
    tensors = {}
    for name in sorted(keep):
        idx = keep[name]
        if idx.numel():
            tensors[name] = SparseTensor(idx.to(torch.int32 if diffs[name].numel() < 2**31
                                                else torch.int64).cpu(),
                                         diffs[name][idx].cpu())
    kind = kind or infer_kind(finetuned)
    if labels is None:
        id2label = getattr(finetuned.config, "id2label", None) or {}
        labels = [str(id2label[i]) for i in sorted(id2label)] if kind in HEAD_KINDS else []
    nnz = sum(t.nnz for t in tensors.values())
    meta = DeltaMeta(base_fingerprint=base.fingerprint, base_name=base.name, kind=kind,
                     labels=labels, provenance=Provenance(method="extract", density=nnz / base.numel,
                                                          target_density=density, scope=scope))
    return TaskDelta(meta=meta, tensors=tensors,
                     heads={n: h.cpu().contiguous() for n, h in heads.items()} if kind in HEAD_KINDS
                     else {})


def _select(diffs: dict[str, torch.Tensor], base: Base, density: float,
            scope: Scope) -> dict[str, torch.Tensor]:
    """Sorted flat indices to keep, per tensor."""
    if scope == "per-tensor":
        return {n: _top(d, round(density * d.numel())) for n, d in diffs.items()}
    k = round(density * base.numel)
    names = list(diffs)
    mags = torch.cat([diffs[n].abs().float() for n in names])  # [sum of numel]
    k = min(k, int((mags > 0).sum()))
    if k == 0:
        return {n: diffs[n].new_empty(0, dtype=torch.int64) for n in names}
    threshold = torch.topk(mags, k, sorted=False).values.min() if k < mags.numel() else mags.min()
    over = mags > threshold
    budget = k - int(over.sum())  # ties at the threshold, taken in order until k
    at = torch.nonzero(mags == threshold).reshape(-1)[:budget]
    chosen = over
    chosen[at] = True
    chosen &= mags > 0
    out, start = {}, 0
    for n in names:
        stop = start + diffs[n].numel()
        out[n] = torch.nonzero(chosen[start:stop]).reshape(-1)
        start = stop
    return out


def _top(d: torch.Tensor, k: int) -> torch.Tensor:
    mags = d.abs()
    k = min(k, int((mags > 0).sum()))
    if k == 0:
        return d.new_empty(0, dtype=torch.int64)
    return torch.topk(mags, k, sorted=False).indices.sort().values
