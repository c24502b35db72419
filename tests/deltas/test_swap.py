"""The in-place swap on tiny bases (fp32 and bf16): restore is bit-exact after any sequence of
swaps, a swapped-in task computes exactly what an offline merged copy computes, a second apply is
refused without touching the first, and a failure half-way through `apply` leaves the base as it
was."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import bits, differing, snapshot

from taskdelta.deltas import (
    Base,
    PreparedDelta,
    SwapError,
    Swapper,
    TaskDelta,
    load_base,
    merge_into,
    prepare,
    random_delta,
    validate,
)

BASES = [("bert", "float32"), ("bert", "bfloat16"), ("llama", "float32"), ("llama", "bfloat16")]
KINDS = {"bert": ("embed", "classify"), "llama": ("generate", "embed", "classify")}
SENTENCES = ["a gripping , funny film", "dull", "it is neither here nor there , and it knows it"]
def merged_by_hand(original: dict[str, torch.Tensor], delta: TaskDelta) -> dict[str, torch.Tensor]:
    """original + increments at the indices, computed in the base dtype, from the file form."""
    out = {n: t.clone() for n, t in original.items()}
    for name, sp in delta.tensors.items():
        flat = out[name].view(-1)
        idx = sp.idx.long()
        flat[idx] = flat[idx] + sp.val.to(flat.dtype)
    return out


@pytest.fixture(scope="module")
def bases(tiny_bert_dir: Path, tiny_llama_dir: Path) -> dict[tuple[str, str], Base]:
    """Private copies: these tests write into the weights, the session fixtures stay untouched."""
    dirs = {"bert": tiny_bert_dir, "llama": tiny_llama_dir}
    return {(arch, dt): load_base(dirs[arch], device="cpu", dtype=dt) for arch, dt in BASES}


@pytest.fixture(scope="module")
def originals(bases) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    return {key: snapshot(b) for key, b in bases.items()}


def inputs_for(base: Base) -> dict[str, torch.Tensor]:
    enc = base.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    if base.is_causal_lm:
        enc.pop("token_type_ids", None)
    return dict(enc)


@torch.no_grad()
def outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def classifier_by_hand(model: torch.nn.Module, base: Base, delta: TaskDelta) -> torch.nn.Module:
    """The offline fine-tuned classifier: a fresh transformers classifier loaded from the merged
    backbone's weights plus the delta's head (built without deltas.heads)."""
    from transformers import AutoModelForSequenceClassification

    cfg = copy.deepcopy(base.config)
    cfg.num_labels = len(delta.meta.labels)
    clf = AutoModelForSequenceClassification.from_config(cfg, dtype=base.dtype)
    prefix = clf.base_model_prefix
    state = {f"{prefix}.{k}": v for k, v in model.base_model.state_dict().items()}
    state |= {k: v.to(base.dtype) for k, v in delta.heads.items()}
    clf.load_state_dict(state, strict=True)
    return clf.eval()


# --- bit-identity over any sequence -------------------------------------------------------------

_apply = st.tuples(st.just("apply"), st.sampled_from([0.0, 0.001, 0.01, 0.1, 0.5, 1.0]),
                   st.integers(0, 10_000), st.integers(0, 2))
_ops = st.lists(st.one_of(_apply, st.just(("restore",))), min_size=1, max_size=8)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.sampled_from(BASES), ops=_ops)
def test_any_apply_restore_sequence_is_exact(bases, originals, which, ops):
    """At every step the weights are bitwise either the original or original-merged-with-the-active
    delta; a refused second apply changes nothing; the end state is the original to the bit."""
    base, original = bases[which], originals[which]
    sw = Swapper(base)
    expected = original
    for op in ops:
        if op[0] == "restore":
            sw.restore()
            expected = original
        else:
            _, density, seed, k = op
            kinds = KINDS[which[0]]
            delta = random_delta(base, density, seed=seed, kind=kinds[k % len(kinds)])
            validate(delta, base)
            prepared = prepare(delta, base, name=f"t{seed}")
            if sw.active is None:
                sw.apply(prepared)
                expected = merged_by_hand(original, delta)
            else:
                with pytest.raises(SwapError):
                    sw.apply(prepared)
        assert differing(base, expected) == []
    sw.restore()
    assert differing(base, original) == []


# --- outputs equal the offline merged model -----------------------------------------------------


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.sampled_from(BASES), k=st.integers(0, 2), seed=st.integers(0, 10_000),
       density=st.sampled_from([0.01, 0.05, 0.3]))
def test_swapped_outputs_equal_offline_merged_copy(bases, originals, which, k, seed, density):
    """With a delta applied, the served model's outputs (logits / last_hidden_state / classify
    logits) are torch.equal to those of a deep copy merged offline; after restore they are the
    base's again."""
    base = bases[which]
    kind = KINDS[which[0]][k % len(KINDS[which[0]])]
    delta = random_delta(base, density, seed=seed, kind=kind, scale=0.05)
    prepared = prepare(delta, base, name="task")
    inputs = inputs_for(base)
    before = outputs(base.model, inputs)

    merged = copy.deepcopy(base.model)
    merge_into(dict(merged.named_parameters()), prepared)
    assert differing(bind_like(merged, base), merged_by_hand(originals[which], delta)) == []
    reference = classifier_by_hand(merged, base, delta) if kind == "classify" else merged

    sw = Swapper(base)
    with sw.swapped(prepared) as model:
        served = outputs(model, inputs)
    expected = outputs(reference, inputs)
    assert served.dtype == base.dtype
    assert torch.equal(bits(served), bits(expected))
    if kind != "classify":  # the delta really changed something, so equality above means something
        assert not torch.equal(served, before)
    assert torch.equal(bits(outputs(base.model, inputs)), bits(before))


def bind_like(model: torch.nn.Module, base: Base) -> Base:
    """A Base view of a copied model, so the copy's tensors can be compared by base name."""
    from taskdelta.deltas import bind_base

    return bind_base(model, None, name="copy", path=None, fingerprint=base.fingerprint)


def test_tied_embedding_is_swapped_once_and_reaches_the_lm_head(bases, originals):
    """tiny_llama's LM head is its embedding: a delta on the embedding changes the logits exactly
    as the merged copy (whose tie deepcopy keeps) does."""
    base = bases[("llama", "float32")]
    assert base.model.lm_head.weight is base.model.model.embed_tokens.weight
    emb = "model.embed_tokens.weight"
    delta = random_delta(base, 0.05, seed=7, scale=0.5)
    delta = type(delta)(meta=delta.meta, tensors={emb: delta.tensors[emb]})
    prepared = prepare(delta, base)
    merged = copy.deepcopy(base.model)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    merge_into(dict(merged.named_parameters()), prepared)
    inputs = inputs_for(base)
    sw = Swapper(base)
    with sw.swapped(prepared) as model:
        assert torch.equal(model.lm_head.weight, merged.lm_head.weight)
        served = outputs(model, inputs)
    assert torch.equal(served, outputs(merged, inputs))
    assert differing(base, originals[("llama", "float32")]) == []


def test_increments_are_added_in_the_base_dtype(bases, originals):
    """fp32 increments on a bf16 base: the written value is bf16(base + bf16(increment))."""
    key = ("bert", "bfloat16")
    base = bases[key]
    name = "encoder.layer.0.output.dense.weight"
    delta = random_delta(base, 0.2, seed=3)
    sp = delta.tensors[name]
    wide = type(sp)(sp.idx, sp.val.float() + 1e-4)  # not representable in bf16
    delta = type(delta)(meta=delta.meta, tensors={name: wide})
    validate(delta, base)
    sw = Swapper(base)
    sw.apply(prepare(delta, base))
    flat = originals[key][name].view(-1)
    want = flat[sp.idx.long()] + wide.val.to(torch.bfloat16)
    got = base.params[name].view(-1)[sp.idx.long()]
    sw.restore()
    assert torch.equal(bits(got), bits(want))
    assert differing(base, originals[key]) == []


# --- a second apply, failures half-way --------------------------------------------------------


def test_second_apply_is_refused_and_leaves_the_first_intact(bases, originals):
    key = ("llama", "bfloat16")
    base = bases[key]
    first = random_delta(base, 0.05, seed=1)
    second = random_delta(base, 0.05, seed=2)
    sw = Swapper(base)
    sw.apply(prepare(first, base, name="first"))
    applied = snapshot(base)
    assert differing(base, merged_by_hand(originals[key], first)) == []
    with pytest.raises(SwapError, match="'first' is swapped in.*'second'"):
        sw.apply(prepare(second, base, name="second"))
    assert sw.active is not None and sw.active.name == "first"
    assert differing(base, applied) == []
    sw.restore()
    assert sw.active is None
    assert differing(base, originals[key]) == []


def _half_way(base: Base, second: tuple[str, torch.Tensor, torch.Tensor]) -> PreparedDelta:
    """A delta whose first tensor is sound (and really changes the weights) and whose second is
    broken, built by hand so that no validation stands in the way."""
    first = "encoder.layer.0.attention.self.query.weight"
    return PreparedDelta(name="broken", kind="embed", labels=(), names=(first, second[0]),
                         idx=(torch.arange(0, 1024, 3), second[1]),
                         inc=(torch.full((342,), 0.5, dtype=base.dtype), second[2]))


@pytest.mark.parametrize(("case", "error"), [
    ("index out of range", IndexError),
    ("negative index", IndexError),
    ("increment of the wrong length", RuntimeError),
    ("increment of the wrong dtype", RuntimeError),
    ("unknown tensor", KeyError),
])
def test_failure_half_way_through_apply_restores_the_base(bases, originals, case, error):
    key = ("bert", "float32")
    base = bases[key]
    w = "encoder.layer.1.output.dense.weight"  # [32, 64]
    n = base.params[w].numel()
    one = torch.ones(2, dtype=base.dtype)
    second = {
        "index out of range": (w, torch.tensor([0, n]), one),
        "negative index": (w, torch.tensor([-1, 3]), one),
        "increment of the wrong length": (w, torch.tensor([0, 1, 2]), one),
        "increment of the wrong dtype": (w, torch.tensor([0, 1]), one.double()),
        "unknown tensor": ("encoder.layer.9.nope", torch.tensor([0, 1]), one),
    }[case]
    sw = Swapper(base)
    with pytest.raises(error):
        sw.apply(_half_way(base, second))
    assert sw.active is None and sw.task_model is base.model
    assert differing(base, originals[key]) == []
    # the swapper is still usable, and a sound delta goes in and out exactly
    good = random_delta(base, 0.05, seed=5)
    sw.apply(prepare(good, base))
    assert differing(base, merged_by_hand(originals[key], good)) == []
    sw.restore()
    assert differing(base, originals[key]) == []


def test_the_half_way_delta_did_write_before_failing(bases, originals):
    """Control for the test above: the same sound first tensor alone does change the weights, so
    'unchanged after the failure' is the write-back's doing."""
    key = ("bert", "float32")
    base = bases[key]
    broken = _half_way(base, ("encoder.layer.1.output.dense.weight", torch.tensor([0]),
                              torch.ones(1, dtype=base.dtype)))
    sw = Swapper(base)
    sw.apply(broken)  # its second tensor is sound here
    assert "encoder.layer.0.attention.self.query.weight" in differing(base, originals[key])
    sw.restore()
    assert differing(base, originals[key]) == []


def test_exception_inside_swapped_block_restores(bases, originals):
    key = ("llama", "float32")
    base = bases[key]
    sw = Swapper(base)
    with pytest.raises(ZeroDivisionError), sw.swapped(prepare(random_delta(base, 0.1), base)):
        assert differing(base, originals[key]) != []
        _ = 1 / 0
    assert sw.active is None
    assert differing(base, originals[key]) == []


def test_restore_without_apply_is_a_no_op(bases, originals):
    key = ("bert", "bfloat16")
    sw = Swapper(bases[key])
    sw.restore()
    sw.restore()
    assert differing(bases[key], originals[key]) == []


def test_classify_task_model_shares_the_live_backbone(bases):
    """The classify head runs on the base's own (swapped) weights: no copy of the backbone."""
    base = bases[("bert", "float32")]
    prepared = prepare(random_delta(base, 0.01, kind="classify"), base)
    sw = Swapper(base)
    with sw.swapped(prepared) as model:
        assert model is prepared.head
        live = {p.data_ptr() for p in base.params.values()}
        backbone = {p.data_ptr() for p in model.base_model.parameters()}
        assert live == backbone
    assert sw.task_model is base.model
