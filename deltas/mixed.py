"""Mixed-task batches: one forward of the untouched base serves rows of several tasks.

The swap is exact but serves one task per forward. Here the base weights stay as they are and each
task's delta corrects the outputs of the modules it touches, for that task's rows only (the rows
of one task are contiguous in the batch):

    Linear     y += x @ ΔWᵀ + Δb          (ΔW: the delta's sorted flat indices, read as rows)
    Embedding  y += ΔE[ids]              (ΔE's rows for all the batch's ids at once)
    LayerNorm  y += norm(x) * Δγ + Δβ    (norm: layer_norm without its affine part)

A delta on any other tensor, or a base whose task head cannot run on the shared backbone's
output, makes the task not mixable: it runs through the swap. The outputs equal the merged
model's up to rounding only (x·W + x·ΔW is not x·(W+ΔW) bit for bit).

`Mixer` registers forward hooks on the backbone's modules once; they return at once unless a
`mixing(...)` context is active, so single-task forwards compute exactly what they did. On CPU
the sparse products run in `_mixed_kernel` (one call per module for all tasks, reading the
delta's own index and increment runs: no extra memory); elsewhere, or where it cannot be built,
in torch sparse CSR ops (a CSR kept per delta, counted in its cache entry).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import _mixed_kernel
from .base import Base
from .swap import PreparedDelta

MIXABLE_KINDS = ("classify", "embed")
# encoders whose modules see batch-first inputs and whose classifier runs on the pooled output:
# BertForSequenceClassification is pooler_output -> dropout -> classifier
POOLED_HEADS = {"bert": "BertForSequenceClassification"}


@dataclass(frozen=True, eq=False)
class SparseMatrix:
    """A delta's entries in one weight matrix, as the swap keeps them (views, no copies)."""

    idx: torch.Tensor  # [nnz] int32 (int64 for 2^31+ entries), sorted flat row-major indices
    val: torch.Tensor  # [nnz] increments
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:  # beyond the delta: only the CSR form, where it was built
        csr = self.__dict__.get("csr")
        return csr[0].nbytes + csr[1].nbytes if csr is not None else 0

    @cached_property
    def csr(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(crow [rows + 1], col [nnz]) for the torch path (without the compiled kernel)."""
        rows, cols = self.shape
        local = self.idx.long()
        # the only check torch's unchecked CSR needs (a stamped cold load skips validate's
        # per-entry checks): every entry inside the matrix; then row and column are in range
        if local.numel() and not (int(local.min()) >= 0 and int(local.max()) < rows * cols):
            raise IndexError(f"a delta index lies outside its {rows}x{cols} matrix")
        crow = torch.zeros(rows + 1, dtype=self.idx.dtype, device=self.idx.device)
        crow[1:] = torch.cumsum(torch.bincount(local // cols, minlength=rows), 0)
        return crow, (local % cols).to(self.idx.dtype)

    @cached_property
    def tensor(self) -> torch.Tensor:
        """As a torch sparse CSR tensor."""
        crow, col = self.csr
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(crow, col, self.val, size=self.shape,
                                           check_invariants=False)


@dataclass(frozen=True, eq=False)
class LinearFix:
    weight: SparseMatrix | None  # ΔW [out, in]
    bias: torch.Tensor | None  # Δb [out]


@dataclass(frozen=True, eq=False)
class EmbeddingFix:
    weight: SparseMatrix  # ΔE [vocab, hidden]


@dataclass(frozen=True, eq=False)
class NormFix:
    weight: torch.Tensor | None  # Δγ [hidden]
    bias: torch.Tensor | None  # Δβ [hidden]


Fix = LinearFix | EmbeddingFix | NormFix


@dataclass(frozen=True, eq=False)
class MixedDelta:
    """A delta as output corrections: module name (in the base model) -> its fix."""

    name: str
    fixes: dict[str, Fix]
    nbytes: int  # bytes it holds beyond the PreparedDelta it was built from


class Mixer:
    """Output corrections for several tasks in one forward of a base. One worker thread drives
    `cached`, `build` and `mixing`; `why_not` is meant for one other thread (the event loop)."""

    def __init__(self, base: Base) -> None:
        self.base = base
        self.model_type = getattr(base.config, "model_type", "")
        self._modules: dict[str, nn.Module] = {}
        self._targets = self._find_targets()  # base tensor name -> (module name, "weight"|"bias")
        self._built: weakref.WeakKeyDictionary[PreparedDelta, MixedDelta] = weakref.WeakKeyDictionary()
        self._verdicts: weakref.WeakKeyDictionary[PreparedDelta, str | None] = (
            weakref.WeakKeyDictionary())
        self._segments: list[tuple[int, int, MixedDelta | None]] | None = None
        self._plans: dict[str, _Plan] = {}
        self._rows = 0
        self._counts = torch.zeros(0, dtype=torch.long)
        # built (or loaded) now, at startup, not on the first mixed batch
        self._kernel = _mixed_kernel.load() if self._targets and base.device.type == "cpu" else None
        self._handles = [m.register_forward_hook(_Hook(self, name))
                         for name, m in self._modules.items()]

    def _find_targets(self) -> dict[str, tuple[str, str]]:
        if self.model_type not in POOLED_HEADS:
            return {}
        model, backbone = self.base.model, self.base.backbone
        prefix = next(n for n, m in model.named_modules() if m is backbone)
        prefix = f"{prefix}." if prefix else ""
        targets: dict[str, tuple[str, str]] = {}
        seen: set[str] = set()
        for sub, module in backbone.named_modules():
            if not isinstance(module, nn.Linear | nn.Embedding | nn.LayerNorm):
                continue
            name = prefix + sub
            for attr, _ in module.named_parameters(recurse=False):
                canonical = self.base.canonical(f"{name}.{attr}")
                if canonical is None or (isinstance(module, nn.Embedding) and attr != "weight"):
                    continue
                if canonical in seen:  # a tied tensor used by two modules: leave it to the swap
                    targets.pop(canonical, None)
                    continue
                seen.add(canonical)
                targets[canonical] = (name, attr)
                self._modules[name] = module
        return targets

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- which deltas can be mixed ---------------------------------------------------------------

    def why_not(self, delta: PreparedDelta) -> str | None:
        """None if the delta can run in a mixed batch, else the reason it cannot (remembered while
        the delta lives; call it from one thread)."""
        if delta not in self._verdicts:
            self._verdicts[delta] = self._why_not(delta)
        return self._verdicts[delta]

    def _why_not(self, delta: PreparedDelta) -> str | None:
        if not self._targets:
            return f"mixed batches do not support {self.model_type!r} bases"
        if self.base.dtype != torch.float32:  # torch's sparse CSR products: float32 on CPU
            return f"mixed batches need a float32 base, not {self.base.dtype}"
        if delta.kind not in MIXABLE_KINDS:
            return f"a {delta.kind!r} task cannot be mixed"
        if delta.kind == "classify" and type(delta.head).__name__ != POOLED_HEADS[self.model_type]:
            return f"head {type(delta.head).__name__} cannot run on the shared backbone output"
        for name in delta.names:
            if name not in self._targets:
                return f"tensor {name!r} is not a Linear, Embedding or LayerNorm of the backbone"
        return None

    # -- building the corrections ----------------------------------------------------------------

    def cached(self, delta: PreparedDelta) -> MixedDelta | None:
        return self._built.get(delta)

    @torch.no_grad()
    def build(self, delta: PreparedDelta) -> MixedDelta:
        """The delta's corrections (kept while the delta lives); it must be mixable."""
        why = self._why_not(delta)
        if why is not None:
            raise ValueError(f"delta {delta.name!r} cannot be mixed: {why}")
        parts: dict[str, dict[str, Any]] = {}
        for name, idx, inc in zip(delta.names, delta.idx, delta.inc, strict=True):
            module_name, attr = self._targets[name]
            parts.setdefault(module_name, {})[attr] = self._part(name, idx, inc)
        fixes: dict[str, Fix] = {}
        for module_name, got in parts.items():
            module = self._modules[module_name]
            w, b = got.get("weight"), got.get("bias")
            if isinstance(module, nn.Embedding):
                fixes[module_name] = EmbeddingFix(w)
            elif isinstance(module, nn.Linear):
                fixes[module_name] = LinearFix(w, b)
            else:
                fixes[module_name] = NormFix(w, b)
        if self._kernel is None:
            for p in parts.values():  # the torch path's CSR: built now, counted in the bytes
                for t in p.values():
                    _ = t.csr if isinstance(t, SparseMatrix) else None
        nbytes = sum(t.nbytes for p in parts.values() for t in p.values())
        mixed = MixedDelta(name=delta.name, fixes=fixes, nbytes=nbytes)
        self._built[delta] = mixed
        return mixed

    def _part(self, name: str, idx: torch.Tensor, inc: torch.Tensor) -> SparseMatrix | torch.Tensor:
        param = self.base.params[name]
        if param.dim() == 2:
            return SparseMatrix(idx.contiguous(), inc.contiguous(), tuple(param.shape))
        dense = torch.zeros(param.numel(), dtype=param.dtype, device=param.device)
        dense[idx.long()] = inc
        return dense.view(param.shape)

    # -- running a mixed forward -----------------------------------------------------------------

    @contextmanager
    def mixing(self, segments: list[tuple[int, int, MixedDelta | None]], rows: int) -> Iterator[None]:
        """Inside: forwards of `rows` rows apply each segment's corrections to its rows
        [start, end) (segments in order, not overlapping; a None delta is the base)."""
        tiles: list[tuple[int, int, MixedDelta | None]] = []
        at = 0
        for a, b, m in segments:  # tile [0, rows): the gaps are base rows
            if a > at:
                tiles.append((at, a, None))
            tiles.append((a, b, m))
            at = b
        if at < rows:
            tiles.append((at, rows, None))
        self._segments = tiles
        self._rows = rows
        self._counts = torch.tensor([b - a for a, b, _ in tiles], device=self.base.device)
        self._plans = self._plan(tiles)
        try:
            yield
        finally:
            self._segments = None
            self._plans = {}

    def _plan(self, tiles: list[tuple[int, int, MixedDelta | None]]) -> dict[str, _Plan]:
        """Per module the batch corrects, its fixes and the kernels' arguments, once a batch
        (not once a module call)."""
        names = {n: None for _, _, m in tiles if m is not None for n in m.fixes}  # ordered set
        plans: dict[str, _Plan] = {}
        for name in names:
            fixes = [m.fixes.get(name) if m is not None else None for _, _, m in tiles]
            sparse = [(a, b, f.weight) for (a, b, _), f in zip(tiles, fixes, strict=True)
                      if isinstance(f, LinearFix | EmbeddingFix) and f.weight is not None]
            vectors = [(a, b, *_vectors(f)) for (a, b, _), f in zip(tiles, fixes, strict=True)
                       if isinstance(f, LinearFix | NormFix)
                       and (f.bias is not None or isinstance(f, NormFix) and f.weight is not None)]
            plans[name] = _Plan(
                fixes=fixes,
                sparse=([w.idx for _, _, w in sparse], [w.val for _, _, w in sparse],
                        [a for a, _, _ in sparse], [b for _, b, _ in sparse]),
                vectors=([g for _, _, g, _ in vectors], [b for _, _, _, b in vectors],
                         [a for a, _, _, _ in vectors], [b for _, b, _, _ in vectors]),
                gamma=any(g.numel() for _, _, g, _ in vectors),
                vocab=sparse[0][2].shape[0] if sparse else 0)
        return plans

    def _hook(self, name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> Any:
        if self._segments is None:
            return None
        plan = self._plans.get(name)
        if plan is None:
            return None
        x = args[0]
        if output.shape[0] != self._rows:  # shared across rows ([1, seq] position ids): per row now
            if output.shape[0] != 1:
                raise RuntimeError(f"{name}: {output.shape[0]} output rows in a batch of {self._rows}")
            output = output.expand(self._rows, *output.shape[1:]).contiguous()
            x = x.expand(self._rows, *x.shape[1:])
        if self._kernel is not None and output.dtype == torch.float32:
            self._fix(self._kernel, module, plan, x, output)
        elif isinstance(module, nn.Linear):
            self._linear(x, output, plan.fixes)
        elif isinstance(module, nn.Embedding):
            self._embedding(x, output, plan.fixes)
        else:
            self._norm(module, x, output, plan.fixes)
        return output

    def _fix(self, kernel: Any, module: nn.Module, plan: _Plan, x: torch.Tensor,
             y: torch.Tensor) -> None:
        """The compiled kernels: one call per correction kind for all the batch's tasks."""
        per_row = y[0].numel() // y.shape[-1]  # tokens per batch row
        y2 = y.view(-1, y.shape[-1])  # [tokens, out]
        if isinstance(module, nn.Embedding):
            kernel.embedding_fix(x.reshape(-1).long().contiguous(), y2, plan.vocab, per_row,
                                 *plan.sparse)
            return
        if isinstance(module, nn.Linear) and plan.sparse[0]:
            kernel.linear_fix(x.reshape(-1, x.shape[-1]).contiguous(), y2, per_row, *plan.sparse)
        if plan.vectors[0]:
            scale = _NONE
            if plan.gamma:  # norm(x): layer_norm without its affine part, [tokens, hidden]
                scale = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
                scale = scale.reshape(y2.shape).contiguous()
            kernel.rows_fix(y2, scale, per_row, *plan.vectors)

    # -- the torch path (no compiled kernels) ----------------------------------------------------

    def _linear(self, x: torch.Tensor, y: torch.Tensor, fixes: list) -> None:
        segments = self._segments or []
        per_row = y[0].numel() // y.shape[-1]  # tokens per batch row
        x2 = x.reshape(-1, x.shape[-1])  # [tokens, in]
        y2 = y.view(-1, y.shape[-1])  # [tokens, out]
        for (a, b, _), f in zip(segments, fixes, strict=True):
            if f is not None and f.weight is not None:  # y[a:b] += x[a:b] @ ΔWᵀ
                rows = slice(a * per_row, b * per_row)
                y2[rows].add_(torch.sparse.mm(f.weight.tensor, x2[rows].t().contiguous()).t())
        self._add_per_row(y, [f.bias if f is not None else None for f in fixes])

    def _embedding(self, ids: torch.Tensor, y: torch.Tensor, fixes: list) -> None:
        segments = self._segments or []
        per_row = ids[0].numel()
        flat = ids.reshape(-1)  # [tokens]
        y2 = y.view(-1, y.shape[-1])  # [tokens, hidden]
        for (a, b, _), f in zip(segments, fixes, strict=True):
            if f is not None:
                rows = slice(a * per_row, b * per_row)
                _add_rows(flat[rows].long(), y2[rows], f.weight)

    def _norm(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor, fixes: list) -> None:
        gammas = [f.weight if f is not None else None for f in fixes]
        if any(g is not None for g in gammas):
            normed = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
            self._add_per_row(y, gammas, normed)
        self._add_per_row(y, [f.bias if f is not None else None for f in fixes])

    def _add_per_row(self, y: torch.Tensor, vectors: list[torch.Tensor | None],
                     scale: torch.Tensor | None = None) -> None:
        """y[rows of segment s] += vectors[s] (times `scale` where given), in one op."""
        if all(v is None for v in vectors):
            return
        size = y.shape[-1]
        zero = y.new_zeros(size)
        stacked = torch.stack([zero if v is None else v for v in vectors])  # [segments, size]
        rows = torch.repeat_interleave(stacked, self._counts, dim=0, output_size=self._rows)
        rows = rows.view(self._rows, *([1] * (y.dim() - 2)), size)  # broadcast over tokens
        if scale is None:
            y.add_(rows)
        else:
            y.addcmul_(scale, rows)


_NONE = torch.empty(0)  # the kernels' "no vector"


def _vectors(fix: LinearFix | NormFix) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δγ, Δβ) of a LayerNorm, (none, Δb) of a Linear; _NONE where absent."""
    gamma = fix.weight if isinstance(fix, NormFix) else None
    return (_NONE if gamma is None else gamma, _NONE if fix.bias is None else fix.bias)


@dataclass(frozen=True, eq=False)
class _Plan:
    """One module's corrections in one batch."""

    fixes: list[Fix | None]  # per tile (the torch path)
    sparse: tuple[list, list, list, list]  # idx, val, start row, end row of each ΔW / ΔE
    vectors: tuple[list, list, list, list]  # Δγ, Δβ (or none, Δb), start row, end row
    gamma: bool  # any Δγ: the kernel needs norm(x)
    vocab: int  # ΔE's rows (an Embedding)


def _add_rows(ids: torch.Tensor, y: torch.Tensor, w: SparseMatrix) -> None:
    """y[t] += ΔE[ids[t]] for every token t, vectorised over the tokens' stored entries."""
    crow, col = w.csr
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
    y.index_put_((token, col[pos].long()), w.val[pos], accumulate=True)


class _Hook:
    """A module's forward hook. A deep copy of the module shares it (a copied model is not the
    mixer's base; outside a mixing context the hook does nothing anyway)."""

    def __init__(self, mixer: Mixer, name: str) -> None:
        self.mixer, self.name = mixer, name

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> Any:
        return self.mixer._hook(self.name, module, args, output)

    def __deepcopy__(self, memo: dict) -> _Hook:
        return self


def pooled_logits(head: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """A pooled-output classifier head on its rows of the shared backbone's pooled output."""
    return head.classifier(head.dropout(pooled))  # [rows, labels]
