"""`validate(delta, base)`: every refusal the issue lists names the tensor and the problem, and
sound deltas (every kind each base serves, wider value dtypes, empty deltas) pass."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from taskdelta.deltas import (
    Base,
    DeltaRejected,
    Provenance,
    SparseTensor,
    TaskDelta,
    bind_base,
    dumps,
    load_base,
    loads,
    random_delta,
    validate,
)
from taskdelta.deltas.format import DeltaMeta


def _good(base: Base, kind: str | None = None, seed: int = 0) -> TaskDelta:
    delta = random_delta(base, 0.05, seed=seed, kind=kind)
    validate(delta, base)  # the starting point is sound, so each refusal below is the edit's doing
    return delta


def _with_tensor(delta: TaskDelta, name: str, idx, val) -> TaskDelta:
    idx = idx if isinstance(idx, torch.Tensor) else torch.tensor(idx, dtype=torch.int32)
    val = val if isinstance(val, torch.Tensor) else torch.tensor(val, dtype=torch.float32)
    return dataclasses.replace(delta, tensors={**delta.tensors, name: SparseTensor(idx, val)})


def _with_meta(delta: TaskDelta, **update: object) -> TaskDelta:
    return dataclasses.replace(delta, meta=delta.meta.model_copy(update=update))


def _refused(delta: TaskDelta, base: Base, tensor: str, problem: str) -> DeltaRejected:
    with pytest.raises(DeltaRejected, match=problem) as err:
        validate(delta, base)
    assert err.value.tensor == tensor
    assert repr(tensor) in str(err.value)  # the message itself names the tensor
    return err.value


W = "encoder.layer.0.attention.self.query.weight"  # a tiny_bert tensor, [32, 32]


# --- sound deltas pass -----------------------------------------------------------------------


@pytest.mark.parametrize(("which", "kind"), [("tiny_bert", "embed"), ("tiny_bert", "classify"),
                                             ("tiny_llama", "generate"), ("tiny_llama", "embed"),
                                             ("tiny_llama", "classify")])
def test_sound_deltas_of_every_served_kind_pass_also_after_a_file_round_trip(request, which, kind):
    base = request.getfixturevalue(which)
    delta = random_delta(base, 0.05, seed=2, kind=kind)
    validate(delta, base)
    validate(loads(dumps(delta)), base)


def test_empty_delta_and_empty_tensor_pass(tiny_bert):
    """No tensors at all, or a tensor with zero entries, is a sound (if useless) delta."""
    empty = dataclasses.replace(_good(tiny_bert), tensors={})
    validate(empty, tiny_bert)
    validate(_with_tensor(empty, W, torch.empty(0, dtype=torch.int32), torch.empty(0)), tiny_bert)


def test_wider_values_pass(tiny_bert):
    """float64 increments on a float32 base are allowed (the swap casts them)."""
    validate(_with_tensor(_good(tiny_bert), W, [0, 5],
                          torch.tensor([0.5, -1.0], dtype=torch.float64)), tiny_bert)


# --- metadata --------------------------------------------------------------------------------


def test_wrong_fingerprint(tiny_bert):
    err = _refused(_with_meta(_good(tiny_bert), base_fingerprint="sha256:0000"), tiny_bert,
                   "__metadata__.base_fingerprint", "made for base sha256:0000")
    assert tiny_bert.fingerprint in str(err)


def test_delta_for_another_base_is_refused_on_fingerprint(tiny_bert, tiny_llama):
    _refused(_good(tiny_llama, kind="embed"), tiny_bert, "__metadata__.base_fingerprint",
             "made for base")


def test_kind_the_base_cannot_serve(tiny_bert):
    """A BERT encoder cannot generate."""
    _refused(_with_meta(_good(tiny_bert), kind="generate"), tiny_bert, "__metadata__.kind",
             "task kind 'generate' is not served")


@pytest.mark.parametrize("labels", [[], ["only"]])
def test_classify_needs_two_labels(tiny_bert, labels):
    delta = _with_meta(_good(tiny_bert, kind="classify"), labels=labels)
    _refused(delta, tiny_bert, "__metadata__.labels", "at least 2 labels")


def test_duplicate_labels(tiny_bert):
    delta = _with_meta(_good(tiny_bert, kind="classify"), labels=["a", "a"])
    _refused(delta, tiny_bert, "__metadata__.labels", "not unique")


def test_unsupported_format_version(tiny_bert):
    _refused(_with_meta(_good(tiny_bert), format_version=2), tiny_bert, "__metadata__",
             "format version 2")


# --- names -----------------------------------------------------------------------------------


def test_unknown_tensor(tiny_bert):
    _refused(_with_tensor(_good(tiny_bert), "encoder.layer.7.nope.weight", [0], [1.0]), tiny_bert,
             "encoder.layer.7.nope.weight", "not a tensor of base")


def test_tied_alias_name_is_refused_with_the_canonical_name(tiny_llama):
    """lm_head.weight is the embedding in tiny_llama: a delta must use the one canonical name."""
    delta = _with_tensor(_good(tiny_llama), "lm_head.weight", [0], [1.0])
    _refused(delta, tiny_llama, "lm_head.weight", "is tied to 'model.embed_tokens.weight'")


# --- indices ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("idx", "problem"), [
    ([0, 1024], "index 1024 out of range for a tensor of 1024 entries"),
    ([5, 2**31 - 1], "out of range"),
    ([-1, 3], "negative index -1"),
    ([1, 4, 4, 9], "repeated index 4 at position 2"),
    ([1, 9, 4, 10], "unsorted index 4 at position 2"),
    ([7, 3], "unsorted index 3 at position 1"),
])
def test_bad_indices(tiny_bert, idx, problem):
    delta = _with_tensor(_good(tiny_bert), W, idx, [0.1] * len(idx))
    _refused(delta, tiny_bert, W, problem)


@pytest.mark.parametrize(("dtype", "problem"), [
    (torch.int64, "idx dtype is torch.int64, expected torch.int32"),
    (torch.int16, "idx dtype is torch.int16"),
    (torch.float32, "idx dtype is torch.float32"),
    (torch.uint8, "idx dtype is torch.uint8"),
])
def test_wrong_idx_dtype(tiny_bert, dtype, problem):
    delta = _with_tensor(_good(tiny_bert), W, torch.tensor([1, 2]).to(dtype), [0.1, 0.2])
    _refused(delta, tiny_bert, W, problem)


def test_idx_dtype_follows_the_tensor_size():
    """A tensor of 2^31 entries needs int64 indices; int32 ones are refused there."""
    big = torch.empty(2**31, device="meta")  # shape only: validate never reads the base values
    base = Base(name="fake", path=Path("."), model=None, tokenizer=None, fingerprint="sha256:f",
                params={"big": big})
    meta = DeltaMeta(base_fingerprint="sha256:f", kind="embed",
                     provenance=Provenance(method="test", density=0.0))
    ok = TaskDelta(meta=meta, tensors={"big": SparseTensor(torch.tensor([0, 2**31 - 1]),
                                                           torch.tensor([1.0, 2.0]))})
    validate(ok, base)
    narrow = _with_tensor(ok, "big", torch.tensor([0, 5], dtype=torch.int32), [1.0, 2.0])
    _refused(narrow, base, "big", "expected torch.int64 for a tensor of 2147483648 entries")


def test_idx_and_val_lengths_differ(tiny_bert):
    _refused(_with_tensor(_good(tiny_bert), W, [1, 2, 3], [0.1, 0.2]), tiny_bert, W,
             "idx has 3 entries but val has 2")


def test_two_dimensional_idx(tiny_bert):
    _refused(_with_tensor(_good(tiny_bert), W, torch.tensor([[1, 2]], dtype=torch.int32),
                          torch.tensor([[0.1, 0.2]])), tiny_bert, W, "must be 1-D")


# --- values ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_value(tiny_bert, bad):
    delta = _with_tensor(_good(tiny_bert), W, [1, 2, 3], [0.1, bad, 0.3])
    _refused(delta, tiny_bert, W, "non-finite value .* at position 1")


def test_value_that_overflows_the_base_dtype(tiny_bert):
    """A float64 increment that is finite but becomes inf in float32 would write inf: refused."""
    delta = _with_tensor(_good(tiny_bert), W, [1, 2],
                         torch.tensor([0.1, 1e300], dtype=torch.float64))
    _refused(delta, tiny_bert, W, "overflows torch.float32")


@pytest.mark.parametrize(("dtype", "problem"), [
    (torch.bfloat16, "val dtype is torch.bfloat16; it must be the base dtype torch.float32"),
    (torch.float16, "val dtype is torch.float16"),
    (torch.int32, "val dtype is torch.int32"),
])
def test_val_narrower_than_base(tiny_bert, dtype, problem):
    delta = _with_tensor(_good(tiny_bert), W, [1, 2], torch.tensor([1.0, 2.0]).to(dtype))
    _refused(delta, tiny_bert, W, problem)


def test_val_dtype_rule_on_a_bf16_base(tiny_bert_dir):
    """On bf16 weights: bf16 and fp32 increments pass; fp16 (same width, other format) does not."""
    base = load_base(tiny_bert_dir, device="cpu", dtype="bfloat16")
    good = _good(base)
    for dtype in (torch.bfloat16, torch.float32):
        validate(_with_tensor(good, W, [1, 2], torch.tensor([1.0, 2.0]).to(dtype)), base)
    _refused(_with_tensor(good, W, [1, 2], torch.tensor([1.0, 2.0]).to(torch.float16)), base, W,
             "val dtype is torch.float16; it must be the base dtype torch.bfloat16")


# --- heads -----------------------------------------------------------------------------------


def test_head_with_the_wrong_shape(tiny_bert):
    delta = _good(tiny_bert, kind="classify")
    heads = {**delta.heads, "classifier.weight": torch.zeros(3, 32)}
    _refused(dataclasses.replace(delta, heads=heads), tiny_bert, "head::classifier.weight",
             r"shape \(3, 32\) does not fit the head, expected \(2, 32\)")


def test_head_sized_for_other_labels(tiny_bert):
    """Three labels in the metadata but a two-way classifier: the head does not fit the kind."""
    delta = _with_meta(_good(tiny_bert, kind="classify"), labels=["a", "b", "c"])
    _refused(delta, tiny_bert, "head::classifier.weight", "does not fit the head")


def test_unknown_head_name(tiny_bert):
    delta = _good(tiny_bert, kind="classify")
    heads = {**delta.heads, "pre_classifier.weight": torch.zeros(32, 32)}
    _refused(dataclasses.replace(delta, heads=heads), tiny_bert, "head::pre_classifier.weight",
             "no head tensor of this name")


def test_missing_head_for_classify(tiny_bert):
    delta = _good(tiny_bert, kind="classify")
    heads = {k: v for k, v in delta.heads.items() if k != "classifier.bias"}
    _refused(dataclasses.replace(delta, heads=heads), tiny_bert, "head::",
             r"needs head tensors \['classifier.bias'\]")


@pytest.mark.parametrize(("which", "kind"), [("tiny_bert", "embed"), ("tiny_llama", "generate")])
def test_head_on_a_task_without_one(request, which, kind):
    base = request.getfixturevalue(which)
    delta = dataclasses.replace(_good(base, kind=kind), heads={"classifier.weight": torch.zeros(2)})
    _refused(delta, base, "head::classifier.weight", f"a '{kind}' task has no head tensor")


def test_head_value_and_dtype_checks(tiny_bert):
    delta = _good(tiny_bert, kind="classify")
    nan = delta.heads["classifier.bias"].clone()
    nan[1] = float("nan")
    _refused(dataclasses.replace(delta, heads={**delta.heads, "classifier.bias": nan}), tiny_bert,
             "head::classifier.bias", "non-finite value nan at position 1")
    half = delta.heads["classifier.bias"].to(torch.bfloat16)
    _refused(dataclasses.replace(delta, heads={**delta.heads, "classifier.bias": half}), tiny_bert,
             "head::classifier.bias", "dtype torch.bfloat16; it must be torch.float32")


def test_head_spec_comes_from_the_base_architecture(tiny_llama):
    """A Llama classifier's head is `score.weight` (no bias): BERT's names are refused there."""
    delta = _good(tiny_llama, kind="classify")
    assert set(delta.heads) == {"score.weight"}
    wrong = dataclasses.replace(delta, heads={"classifier.weight": torch.zeros(2, 32),
                                              "classifier.bias": torch.zeros(2)})
    with pytest.raises(DeltaRejected, match="no head tensor of this name") as err:
        validate(wrong, tiny_llama)
    assert err.value.tensor in ("head::classifier.weight", "head::classifier.bias")


def test_validate_works_on_a_model_bound_by_hand(tiny_bert):
    """bind_base over the same model gives the same verdicts (aliases and params come from it)."""
    bound = bind_base(tiny_bert.model, tiny_bert.tokenizer, name="again", path=None,
                      fingerprint=tiny_bert.fingerprint)
    validate(_good(tiny_bert), bound)
    _refused(_with_tensor(_good(tiny_bert), W, [3, 3], [1.0, 1.0]), bound, W, "repeated")
