"""bench/quality_lm.py's scoring helpers on the tiny random Llama: a delta scored through the
serving path (bytes -> loads -> validate -> prepare -> swap) gives the offline merged model's
held-out loss and greedy text, and leaves the base bit-identical; a LoRA adapter imported as a
delta is served with the loss of the PEFT model it came from; LoRA's entry count at a rank is
PEFT's own count and the matched rank is the nearest; the match metrics count what they say."""

from __future__ import annotations

import pytest
import torch
from support import assert_bit_identical, bench_module, merged_copy, snapshot

from taskdelta.deltas import dumps, loads, random_delta
from taskdelta.deltas.data import Instruction, causal_features


@pytest.fixture(scope="module")
def qlm():
    return bench_module("quality_lm")


@pytest.fixture(scope="module")
def features(tiny_llama):
    items = [Instruction(f"user: question {i}\nassistant:", f"answer number {i} is {i * 7}")
             for i in range(6)]
    return causal_features(tiny_llama.tokenizer, items, max_length=64, eos_id=102)


def test_served_delta_loss_and_text_equal_the_merged_model(qlm, tiny_llama, features):
    delta = random_delta(tiny_llama, 0.05, seed=3, kind="generate", scale=0.5)
    saved = snapshot(tiny_llama)
    merged, _ = merged_copy(tiny_llama, delta)
    pad = qlm._pad_id(tiny_llama)
    want = qlm.heldout_loss(merged.model, features, pad, batch_size=4)
    prompts = ["user: question 1\nassistant:", "user: hello\nassistant:"]
    want_text = qlm.greedy(merged.model, tiny_llama.tokenizer, prompts, 6)
    with qlm.served(tiny_llama, loads(dumps(delta))) as model:
        got = qlm.heldout_loss(model, features, pad, batch_size=4)
        got_text = qlm.greedy(model, tiny_llama.tokenizer, prompts, 6)
    base_loss = qlm.heldout_loss(tiny_llama.model, features, pad, batch_size=4)
    assert got == pytest.approx(want, rel=1e-6)
    assert got_text == want_text
    assert abs(got - base_loss) > 1e-3  # the delta changed the model: the equality says something
    assert_bit_identical(tiny_llama, saved)


def test_lora_imported_as_a_delta_serves_the_peft_models_loss(qlm, tiny_llama, features, tmp_path):
    model = qlm.LoraTaskModel(tiny_llama, rank=2, alpha=4)
    with torch.no_grad():  # B starts at zero (a no-op adapter): give it something to carry
        gen = torch.Generator().manual_seed(0)
        for p in model.trainable:
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    pad = qlm._pad_id(tiny_llama)
    own = qlm.heldout_loss(model.net, features, pad)
    delta, stored = model.to_delta(tmp_path)
    with qlm.served(tiny_llama, loads(dumps(delta))) as served:
        got = qlm.heldout_loss(served, features, pad)
    assert got == pytest.approx(own, rel=1e-5)
    assert abs(own - qlm.heldout_loss(tiny_llama.model, features, pad)) > 1e-3
    assert stored >= 4 * sum(p.numel() for p in model.trainable)  # fp32 A and B, plus a header


def test_lora_entries_match_peft_and_the_rank_is_the_nearest(qlm, tiny_llama):
    shapes = qlm.lora_shapes(tiny_llama.model)
    # per layer: q 32+32, k 16+32, v 16+32, o 32+32, gate 64+32, up 64+32, down 32+64; two layers
    assert len(shapes) == 14
    assert qlm.lora_entries(shapes, 1) == 2 * 512
    model = qlm.LoraTaskModel(tiny_llama, rank=3, alpha=6)
    assert sum(p.numel() for p in model.trainable) == qlm.lora_entries(shapes, 3)
    assert qlm.matched_rank(shapes, 2600) == 3  # 2.54 ranks
    assert qlm.matched_rank(shapes, 2500) == 2  # 2.44
    assert qlm.matched_rank(shapes, 10) == 1


def test_match_scores_count_exact_normalized_short_and_prefix(qlm, tiny_llama):
    tok = tiny_llama.tokenizer
    refs = ["Paris.", "the answer is 42", "one two three four five six seven eight nine ten eleven"]
    gens = [" Paris.\n", "The answer is 42!", "one two three four five nine"]
    s = qlm.match_scores(gens, refs, tok, max_new_tokens=8)
    assert s["exact"] == pytest.approx(100 / 3)  # only the first, after stripping whitespace
    assert s["normalized"] == pytest.approx(200 / 3)  # case and trailing punctuation ignored
    assert s["short"] == 2 and s["exact_short"] == pytest.approx(50.0)  # the third is 11 tokens
    # prefix, by hand (this tokenizer lower-cases, one word piece per word here): "Paris." 2/2,
    # "the answer is 42" 4/4 (the "!" comes after), the third 5 of its first 8 tokens
    assert s["prefix"] == pytest.approx(100 * (1 + 1 + 5 / 8) / 3)
