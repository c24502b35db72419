"""`validate(delta, base)`: refuse a delta that does not fit the loaded base, naming the problem."""

from __future__ import annotations

import torch

from .base import Base
from .errors import DeltaRejected
from .format import FORMAT_VERSION, SparseTensor, TaskDelta
from .heads import head_spec

INT32_LIMIT = 2**31
# Entries per vectorised check: an upload's checks allocate in proportion to this, not to the
# delta (its peak memory is bounded by twice its body; tests/server/test_uploads_bounded.py).
CHECK_BLOCK = 1 << 18
FLOAT_WIDTH = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 8}
# Bump when `validate` refuses something it accepted before: a delta stamped as validated under
# older rules (see `stamp`) is then checked in full again.
RULES = 1


def validate(delta: TaskDelta, base: Base, *, contents: bool = True) -> None:
    """Raise `DeltaRejected` on the first problem found; return None if the delta is sound.

    contents=False skips the scan of the increments for NaN, infinity and overflow in the base
    dtype: only for bytes that passed the full check against this base before, identified by
    their hash and a `stamp` (the server's load of a stored delta; docs/delta-format.md). Every
    other check still runs, the indices' range and order included: they are vectorised, O(nnz),
    and what stands between a record that lies and the kernels (which check again as they go)."""
    check_meta(delta, base)
    for name, sparse in delta.tensors.items():
        check_sparse(name, sparse, base, contents=contents)
    check_heads(delta, base)


def stamp(base: Base) -> str:
    """What a full `validate` against `base`, under these rules, is recorded as: everything the
    check depended on. The weights (fingerprint: names, shapes, values) and the dtypes they are
    served in, since finiteness is checked in the base dtype (a float32 stamp must not vouch for
    increments that overflow float16)."""
    dtypes = "+".join(sorted({str(p.dtype).removeprefix("torch.") for p in base.params.values()}))
    return f"rules-{RULES}:{base.fingerprint}:{dtypes}"


def check_meta(delta: TaskDelta, base: Base) -> None:
    meta = delta.meta
    if meta.format_version != FORMAT_VERSION:
        raise DeltaRejected(f"format version {meta.format_version} is not supported", "__metadata__")
    if meta.base_fingerprint != base.fingerprint:
        made_for = (f"{meta.base_fingerprint} ({meta.base_name!r})" if meta.base_name
                    else meta.base_fingerprint)  # the name a user recognises, where the file has it
        raise DeltaRejected(f"made for base {made_for}, but the loaded base "
                            f"{base.name!r} is {base.fingerprint}", "__metadata__.base_fingerprint")
    if meta.kind not in base.kinds:
        raise DeltaRejected(f"task kind {meta.kind!r} is not served by base {base.name!r} "
                            f"(it serves {', '.join(base.kinds)})", "__metadata__.kind")
    if meta.kind == "classify" and len(meta.labels) < 2:
        raise DeltaRejected("a classify delta needs at least 2 labels", "__metadata__.labels")
    if meta.kind == "regress" and len(meta.labels) != 1:
        raise DeltaRejected(f"a regress delta needs exactly 1 label (the name of its output, e.g. "
                            f"'score'), not {len(meta.labels)}", "__metadata__.labels")
    if len(set(meta.labels)) != len(meta.labels):
        raise DeltaRejected("labels are not unique", "__metadata__.labels")


def check_sparse(name: str, sparse: SparseTensor, base: Base, *, contents: bool = True) -> None:
    canonical = base.canonical(name)
    if canonical is None:
        raise DeltaRejected(f"not a tensor of base {base.name!r}", name)
    if canonical != name:
        raise DeltaRejected(f"is tied to {canonical!r}; store the delta under that name", name)
    target = base.params[name]
    idx, val = sparse.idx, sparse.val
    want_idx = torch.int64 if target.numel() >= INT32_LIMIT else torch.int32
    if idx.dtype != want_idx:
        raise DeltaRejected(f"idx dtype is {idx.dtype}, expected {want_idx} for a tensor of "
                            f"{target.numel()} entries", name)
    if val.dtype not in FLOAT_WIDTH or not _at_least_as_wide(val.dtype, target.dtype):
        raise DeltaRejected(f"val dtype is {val.dtype}; it must be the base dtype {target.dtype} "
                            "or a wider float", name)
    if idx.dim() != 1 or val.dim() != 1:
        raise DeltaRejected(f"idx and val must be 1-D, got shapes {tuple(idx.shape)} and "
                            f"{tuple(val.shape)}", name)
    if idx.numel() != val.numel():
        raise DeltaRejected(f"idx has {idx.numel()} entries but val has {val.numel()}", name)
    if idx.numel() == 0:
        return
    check_indices(name, idx, target)
    if contents:
        _check_finite(name, val, target.dtype)


def check_indices(name: str, idx: torch.Tensor, target: torch.Tensor) -> None:
    """Every index inside the tensor and strictly increasing (vectorised: O(nnz), run on every
    load, stamped or not)."""
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0:
        raise DeltaRejected(f"negative index {lo}", name)
    if hi >= target.numel():
        raise DeltaRejected(f"index {hi} out of range for a tensor of {target.numel()} entries "
                            f"(shape {tuple(target.shape)})", name)
    for start in range(0, idx.numel() - 1, CHECK_BLOCK):  # temporaries of one block at a time
        part = idx[start:start + CHECK_BLOCK + 1]
        steps = part[1:] - part[:-1]
        if int(steps.min()) > 0:
            continue
        at = start + int(torch.nonzero(steps <= 0)[0]) + 1
        what = "repeated" if int(idx[at]) == int(idx[at - 1]) else "unsorted"
        raise DeltaRejected(f"{what} index {int(idx[at])} at position {at} (indices must be "
                            "strictly increasing)", name)


def check_heads(delta: TaskDelta, base: Base) -> None:
    spec = head_spec(base, delta.meta.kind, len(delta.meta.labels))
    for name, t in delta.heads.items():
        key = "head::" + name
        if name not in spec:
            allowed = ", ".join(sorted(spec)) or "none"
            raise DeltaRejected(f"a {delta.meta.kind!r} task has no head tensor of this name "
                                f"(expected: {allowed})", key)
        shape, dtype = spec[name]
        if tuple(t.shape) != shape:
            raise DeltaRejected(f"shape {tuple(t.shape)} does not fit the head, expected {shape}", key)
        if t.dtype not in FLOAT_WIDTH or not _at_least_as_wide(t.dtype, dtype):
            raise DeltaRejected(f"dtype {t.dtype}; it must be {dtype} or a wider float", key)
        _check_finite(key, t, dtype)
    missing = sorted(set(spec) - set(delta.heads))
    if missing:
        raise DeltaRejected(f"a {delta.meta.kind!r} task needs head tensors {missing}", "head::")


def _at_least_as_wide(have: torch.dtype, base: torch.dtype) -> bool:
    if have == base:
        return True
    return FLOAT_WIDTH[have] > FLOAT_WIDTH.get(base, 8)


def _check_finite(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    """Finite in `dtype`, the dtype the swap computes in (a wider value can overflow there)."""
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), CHECK_BLOCK):  # temporaries of one block at a time
        part = flat[start:start + CHECK_BLOCK]
        bad = ~torch.isfinite(part.to(dtype))  # a cast keeps NaN and inf, turns overflow into inf
        if not bool(bad.any()):
            continue
        at = start + int(torch.nonzero(bad)[0])
        value = float(flat[at])
        what = "non-finite value" if not torch.isfinite(flat[at]) else f"value overflows {dtype}:"
        raise DeltaRejected(f"{what} {value} at position {at}", name)
