"""The swap on the real default bases (slow): bit-identity over 1,000 apply/restore cycles, and
served outputs equal to an offline merged copy."""

from __future__ import annotations

import copy

import pytest
import torch
from support import bits, differing

from taskdelta.deltas import (
    Base,
    SwapError,
    Swapper,
    dumps,
    loads,
    merge_into,
    prepare,
    random_delta,
    validate,
)

pytestmark = pytest.mark.slow

CYCLES = 1000
DENSITIES = (0.001, 0.002, 0.001, 0.005, 0.002)  # one delta per seed, cycled through
# both defaults in their served dtype (float32), and minilm in bfloat16 too, where a subtracting
# restore would drift fastest (smollm2 in bf16 adds ~30 s for no new code path)
@pytest.mark.parametrize(("name", "dtype"), [("minilm", "float32"), ("minilm", "bfloat16"),
                                             ("smollm2-135m", "float32")])
def test_thousand_cycles_leave_the_base_bit_identical(real_base, name: str, dtype: str):
    """1,000 apply/restore cycles over five random deltas (plus refused second applies) leave
    every parameter bitwise equal to a copy saved before the first swap."""
    base = real_base(name, dtype)
    saved = {n: p.detach().clone() for n, p in base.params.items()}
    deltas = []
    for seed, density in enumerate(DENSITIES):
        delta = loads(dumps(random_delta(base, density, seed=seed)))
        validate(delta, base)
        deltas.append(prepare(delta, base, name=f"seed{seed}"))
    sw = Swapper(base)
    sw.apply(deltas[0])
    changed = differing(base, saved)
    sw.restore()
    # the swap really writes (tiny tensors get no entries at 0.1 %, and a bf16 weight may round
    # an increment away, so not every tensor changes): bit-identity below is not vacuous
    largest = max(base.params, key=lambda n: base.params[n].numel())
    assert largest in changed and len(changed) > len(base.params) // 3
    for i in range(CYCLES):
        sw.apply(deltas[i % len(deltas)])
        if i % 100 == 0:
            with pytest.raises(SwapError):
                sw.apply(deltas[(i + 1) % len(deltas)])
        sw.restore()
    assert differing(base, saved) == []


def _ids(base: Base, texts: list[str]) -> dict[str, torch.Tensor]:
    enc = base.tokenizer(texts, padding=True, return_tensors="pt")
    if base.is_causal_lm:
        enc.pop("token_type_ids", None)
    return dict(enc)


@pytest.mark.parametrize(("name", "kind"), [("minilm", "embed"), ("minilm", "classify"),
                                            ("smollm2-135m", "generate"),
                                            ("smollm2-135m", "classify")])
def test_served_outputs_equal_the_merged_copy(real_base, name: str, kind: str):
    """With a 1 % random delta swapped in, the served outputs are torch.equal to an offline merged
    deep copy's (for classify: the same head on the merged copy's backbone)."""
    base = real_base(name)
    delta = random_delta(base, 0.01, seed=11, kind=kind)
    validate(delta, base)
    prepared = prepare(delta, base, name="task")
    inputs = _ids(base, ["The film was a delight from start to finish.", "Not good."])

    merged = copy.deepcopy(base.model)
    merge_into(dict(merged.named_parameters()), prepared)
    with torch.no_grad():
        before = _out(base.model, inputs)
        sw = Swapper(base)
        with sw.swapped(prepared) as model:
            served = _out(model, inputs)
            if kind == "classify":  # the same head module, pointed at the merged copy
                head = prepared.head
                prefix = head.base_model_prefix
                live = getattr(head, prefix)
                setattr(head, prefix, merged.base_model)
                try:
                    want = _out(head, inputs)
                finally:
                    setattr(head, prefix, live)
            else:
                want = _out(merged, inputs)
        after = _out(base.model, inputs)
    assert torch.equal(bits(served), bits(want))
    assert torch.equal(bits(after), bits(before))
    if kind != "classify":
        assert not torch.equal(served, before)


def _out(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
