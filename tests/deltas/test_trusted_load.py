"""What a trusted (stamped) load may skip, and what the stamp binds.

A stamp records that these bytes passed the full check against this base; a load that trusts it
skips only the content checksum and the scan of the increments for NaN / inf / overflow. The
indices' range and order are checked on every load (vectorised), and the stamp names everything
the full check depended on, the serving dtype included."""

from __future__ import annotations

import pytest
import torch

from taskdelta.deltas import DeltaRejected, SparseTensor, TaskDelta, load_base, random_delta, validate
from taskdelta.deltas.validate import stamp


def with_first(delta: TaskDelta, idx=None, val=None) -> TaskDelta:
    """The delta with its first tensor's idx / val edited in place by the given functions."""
    name = next(iter(delta.tensors))
    sp = delta.tensors[name]
    i, v = sp.idx.clone(), sp.val.clone()
    if idx is not None:
        idx(i)
    if val is not None:
        val(v)
    return TaskDelta(meta=delta.meta, tensors=delta.tensors | {name: SparseTensor(i, v)},
                     heads=delta.heads)


def _negative(i: torch.Tensor) -> None:
    i[3] = -1


def _past_the_end(i: torch.Tensor) -> None:
    i[-1] = 2**31 - 1


def _unsorted(i: torch.Tensor) -> None:
    i[5], i[6] = i[6].item(), i[5].item()


def _repeated(i: torch.Tensor) -> None:
    i[7] = i[6]


@pytest.mark.parametrize("edit", [_negative, _past_the_end, _unsorted, _repeated],
                         ids=["negative", "past the end", "unsorted", "repeated"])
def test_a_trusted_load_still_checks_every_index(tiny_bert, edit):
    delta = with_first(random_delta(tiny_bert, 0.01, seed=1), idx=edit)
    with pytest.raises(DeltaRejected, match="index"):
        validate(delta, tiny_bert, contents=False)


def test_a_trusted_load_skips_only_the_value_scan(tiny_bert):
    def nan(v: torch.Tensor) -> None:
        v[0] = float("nan")

    delta = with_first(random_delta(tiny_bert, 0.01, seed=2), val=nan)
    validate(delta, tiny_bert, contents=False)  # not looked at
    with pytest.raises(DeltaRejected, match="non-finite"):
        validate(delta, tiny_bert)


def test_a_float32_stamp_does_not_vouch_for_a_float16_server(tiny_bert, tiny_bert_dir):
    """A float32 delta whose values overflow float16 passes the full check on a float32 base;
    its stamp must not match a float16 base of the same weights, whose full check refuses it."""
    half = load_base(tiny_bert_dir, device="cpu", dtype="float16")
    assert half.fingerprint == tiny_bert.fingerprint  # the same weights: only the dtype differs

    def overflow(v: torch.Tensor) -> None:
        v[0] = 1e5  # float16's largest finite value is 65,504

    delta = with_first(random_delta(tiny_bert, 0.01, seed=3), val=overflow)
    validate(delta, tiny_bert)
    assert stamp(half) != stamp(tiny_bert)
    assert "float16" in stamp(half) and "float32" in stamp(tiny_bert)
    with pytest.raises(DeltaRejected, match="overflows"):
        validate(delta, half)  # what a load without a matching stamp runs
