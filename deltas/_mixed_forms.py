"""A delta's mixing form (`MixedDelta`: per module, the fix its rows need) and a batch's plans:
per module the batch corrects, the arguments of one correction call for all its tasks (`mixed.py`
builds the forms once a delta and the plans once a batch composition)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from ._mixed_paths import NONE, Plan

Segments = list[tuple[int, int, "MixedDelta | None"]]


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
    bias: torch.Tensor | None  # Δβ [hidden] (a LayerNorm's; an RMSNorm has none)


Fix = LinearFix | EmbeddingFix | NormFix


@dataclass(frozen=True, eq=False)
class MixedDelta:
    """A delta as output corrections: module name (in the base model) -> its fix."""

    name: str
    fixes: dict[str, Fix]
    nbytes: int  # bytes it holds beyond the PreparedDelta it was built from


def cover(segments: Segments, rows: int) -> Segments:
    """The segments and the gaps between them (base rows): in order, covering [0, rows)."""
    tiles: Segments = []
    at = 0
    for a, b, m in segments:
        if not at <= a <= b <= rows:  # the torch path would not notice; the kernels would
            raise ValueError(f"segment [{a}, {b}) out of order or outside {rows} rows")
        if a > at:
            tiles.append((at, a, None))
        tiles.append((a, b, m))
        at = b
    if at < rows:
        tiles.append((at, rows, None))
    return tiles


def merge_neighbours(tiles: Segments) -> Segments:
    """Neighbouring tiles of one delta as one (one kernel pass over its entries for all their
    rows: the -Δ of a swapped-in task on the rows of every other task, say)."""
    out: Segments = []
    for a, b, m in tiles:
        if out and out[-1][2] is m:
            out[-1] = (out[-1][0], b, m)
        else:
            out.append((a, b, m))
    return out


def negate(mixed: MixedDelta) -> MixedDelta:
    """The same corrections with every increment negated (a tied ΔE stays one matrix)."""
    done: dict[int, Any] = {}

    def neg(t: SparseMatrix | torch.Tensor | None) -> Any:
        if t is None:
            return None
        if id(t) not in done:
            if isinstance(t, SparseMatrix):
                m = SparseMatrix(t.idx, -t.val, t.shape)
                if "csr" in t.__dict__:  # the torch path's index form: the same, not rebuilt
                    m.__dict__["csr"] = t.csr
                done[id(t)] = m
            else:
                done[id(t)] = -t
        return done[id(t)]

    fixes: dict[str, Fix] = {}
    for name, f in mixed.fixes.items():
        fixes[name] = (EmbeddingFix(neg(f.weight)) if isinstance(f, EmbeddingFix) else
                       LinearFix(neg(f.weight), neg(f.bias)) if isinstance(f, LinearFix) else
                       NormFix(neg(f.weight), neg(f.bias)))
    return MixedDelta(name=f"-{mixed.name}", fixes=fixes, nbytes=sum(
        t.val.nbytes if isinstance(t, SparseMatrix) else t.nbytes for t in done.values()))


def plan_modules(tiles: Segments) -> dict[str, Plan]:
    """Per module the batch corrects, its fixes and the kernels' arguments, once a batch
    (not once a module call)."""
    names = {n: None for _, _, m in tiles if m is not None for n in m.fixes}  # ordered set
    return {name: _plan(name, tiles) for name in names}


def _plan(name: str, tiles: Segments) -> Plan:
    fixes: list[Fix | None] = []
    idx, val, s_start, s_end = [], [], [], []  # each ΔW / ΔE: its runs and rows
    gammas, betas, v_start, v_end = [], [], [], []  # each Δγ, Δβ (or none, Δb): its rows
    vocab = 0  # ΔE's rows (an Embedding)
    for a, b, m in tiles:  # plain appends: this runs for every module and task of a batch
        f = m.fixes.get(name) if m is not None else None
        fixes.append(f)
        if f is None:
            continue
        w = f.weight
        if isinstance(w, SparseMatrix):  # ΔW of a Linear, ΔE of an Embedding
            vocab = w.shape[0]
            idx.append(w.idx)
            val.append(w.val)
            s_start.append(a)
            s_end.append(b)
        gamma = w if isinstance(f, NormFix) else None
        bias = None if isinstance(f, EmbeddingFix) else f.bias
        if gamma is not None or bias is not None:
            gammas.append(NONE if gamma is None else gamma)
            betas.append(NONE if bias is None else bias)
            v_start.append(a)
            v_end.append(b)
    return Plan(fixes=fixes, sparse=(idx, val, s_start, s_end),
                vectors=(gammas, betas, v_start, v_end),
                gamma=any(g.numel() for g in gammas), vocab=vocab)
