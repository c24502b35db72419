"""Issue 16's recipe pieces: block-structured masks, the |w - w0| mask with 1-D tensors always in,
and diff pruning's route (a few dense steps, then the top entries refit from their dense values)
writing a valid delta of exactly its mask."""

from __future__ import annotations

import torch
from support import DATA, differing, snapshot
from test_train import batch_of, swapped_logits, toy_examples

from taskdelta.deltas import dumps, loads, validate
from taskdelta.deltas.data import causal_features, classify_features, load_instructions
from taskdelta.deltas.masks import block_mask, mask_nnz, update_mask
from taskdelta.deltas.recipe import eos_id
from taskdelta.deltas.train import (
    DenseExtract,
    SparseTaskModel,
    TrainConfig,
    split_steps,
    train_dense_extract,
)


def runs(idx: torch.Tensor, cols: int) -> list[int]:
    """Lengths of the runs of consecutive indices within one row."""
    out, length = [], 1
    for a, b in zip(idx[:-1].tolist(), idx[1:].tolist(), strict=True):
        if b == a + 1 and b % cols:
            length += 1
        else:
            out.append(length)
            length = 1
    return out + [length] if idx.numel() else []


def test_block_mask_is_made_of_whole_runs_along_rows_at_the_density():
    gen = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(64, 128, generator=gen), "b": torch.rand(32, 64, generator=gen)}
    mask = block_mask(scores, 0.05, 16)
    total = sum(s.numel() for s in scores.values())
    assert abs(mask_nnz(mask) - 0.05 * total) <= 16
    for n, idx in mask.items():
        cols = scores[n].shape[-1]
        assert torch.equal(idx, idx.sort().values) and idx.unique().numel() == idx.numel()
        assert (idx[::16] % 16 == 0).all()  # every run starts on a block boundary
        assert all(r % 16 == 0 for r in runs(idx, cols))


def test_block_mask_picks_the_block_with_the_largest_sum_and_cuts_runs_at_row_ends():
    s = torch.zeros(3, 20)
    s[1, 16:20] = 5.0  # the short last block of row 1 (cols 16..19) sums highest
    mask = block_mask({"w": s}, 4 / 60, 16)
    assert mask["w"].tolist() == [36, 37, 38, 39]


def test_update_mask_takes_1d_tensors_whole_from_the_same_budget():
    up = {"w": torch.arange(1, 101, dtype=torch.float32).reshape(10, 10), "bias": torch.ones(10)}
    mask = update_mask(up, 30 / 110, always=["bias"])
    assert mask["bias"].tolist() == list(range(10))
    assert mask["w"].tolist() == list(range(80, 100))  # the 20 largest |update| with what is left
    assert mask_nnz(mask) == 30
    # at a budget the 1-D tensors would fill more than half of, they compete: the budget holds
    low = update_mask(up, 12 / 110, always=["bias"])
    assert mask_nnz(low) == 12 and low["bias"].numel() == 0
    assert low["w"].tolist() == list(range(88, 100))


def test_masked_entries_of_1d_tensors_take_their_own_learning_rate(tiny_bert):
    mask = {n: torch.arange(2) for n in ("encoder.layer.0.attention.self.query.weight",
                                         "encoder.layer.0.attention.self.query.bias")}
    model = SparseTaskModel(tiny_bert, "classify", ["neg", "pos"], mask)
    by_lr = {g["lr"]: g["params"] for g in model.param_groups(TrainConfig(lr=5e-3, lr_1d=1e-3, head_lr=2e-3))}
    flat = {tiny_bert.params[n].dim(): v for n, v in zip(model.names, model.values, strict=True)}
    assert [id(p) for p in by_lr[5e-3]] == [id(flat[2])]
    assert [id(p) for p in by_lr[1e-3]] == [id(flat[1])]
    same = model.param_groups(TrainConfig(lr=5e-3, head_lr=2e-3))  # lr_1d unset: one rate for both
    at_lr = sorted(id(p) for g in same if g["lr"] == 5e-3 for p in g["params"])
    assert at_lr == sorted(map(id, model.values))


def test_split_steps():
    assert split_steps(100, 0.25) == (25, 75)
    assert split_steps(2, 0.9) == (1, 1)


def test_dense_then_extract_writes_a_valid_delta_of_its_mask_only(tiny_bert):
    feats = classify_features(tiny_bert.tokenizer, toy_examples(), 32)
    cfg = TrainConfig(max_steps=6, batch_size=4, lr=1e-3, dropout=False)
    trained = train_dense_extract(tiny_bert, "classify", ["neg", "pos"], feats, cfg,
                                  DenseExtract(density=0.02, dense_fraction=0.5, dense_lr=1e-3))
    assert trained.steps == 6
    delta = trained.model.to_delta("dense-extract")
    validate(delta, tiny_bert)
    nnz = delta.nnz
    assert 0 < nnz <= round(0.02 * tiny_bert.numel)
    # 1-D tensors the dense phase moved are in whole (their moved entries)
    assert any(tiny_bert.params[n].dim() == 1 for n in delta.tensors)
    again = loads(dumps(delta))
    assert again.nnz == nnz
    with torch.no_grad():
        want = trained.model(**batch_of(feats)).logits
    torch.testing.assert_close(swapped_logits(tiny_bert, delta, feats), want, rtol=1e-4, atol=1e-5)


def test_dense_then_extract_with_blocks(tiny_bert):
    feats = classify_features(tiny_bert.tokenizer, toy_examples(), 32)
    cfg = TrainConfig(max_steps=4, batch_size=4, dropout=False)
    trained = train_dense_extract(tiny_bert, "classify", ["neg", "pos"], feats, cfg,
                                  DenseExtract(density=0.05, block=8, always_1d=False))
    delta = trained.model.to_delta("dense-extract")
    validate(delta, tiny_bert)
    for n, t in delta.tensors.items():
        cols = tiny_bert.params[n].shape[-1]
        assert all(r % 8 == 0 or cols % 8 for r in runs(t.idx.long(), cols))


def test_cli_train_defaults_to_dense_extract_and_takes_blocks(tiny_bert_dir, tmp_path):
    from test_train import write_toy_tsv
    from typer.testing import CliRunner

    from taskdelta.deltas import load, load_base
    from taskdelta.deltas.cli import app

    data = write_toy_tsv(tmp_path / "toy.tsv")
    b = load_base(tiny_bert_dir, device="cpu")
    for extra, block in (([], None), (["--block", "16"], 16)):
        out = tmp_path / f"toy{block}.safetensors"
        r = CliRunner().invoke(app, ["train", "--base", str(tiny_bert_dir), "--data", str(data),
                                     "--text-col", "sentence", "--label-col", "sentiment",
                                     "--max-steps", "4", "--batch-size", "8", "--val-size", "6",
                                     "-o", str(out), *extra])
        assert r.exit_code == 0, r.output
        delta = load(out)
        validate(delta, b)
        prov = delta.meta.provenance.model_dump()
        assert prov["method"] == "dense-extract" and prov["block"] == block and prov["steps"] == 4
        assert (prov["lr"], prov["lr_1d"]) == (5e-3, 1e-3)  # the sparse phase's default rates
        assert delta.nnz <= round(0.01 * b.numel) + (block or 0)  # whole blocks: up to half a block over


def test_dense_then_extract_on_a_causal_lm_writes_a_generate_delta_that_swaps_in(tiny_llama):
    """The default recipe of `delta train` for generate tasks too: the tied embedding / LM head is
    chosen and stored once, the delta swaps in to the trained logits, the base is left as it was."""
    saved = snapshot(tiny_llama)
    items = load_instructions(DATA / "instructions" / "train.jsonl", tiny_llama.tokenizer)[:4]
    feats = causal_features(tiny_llama.tokenizer, items, 64, eos_id(tiny_llama))
    cfg = TrainConfig(lr=1e-2, max_steps=6, batch_size=4, dropout=False)
    trained = train_dense_extract(tiny_llama, "generate", [], feats, cfg,
                                  DenseExtract(density=0.05, dense_fraction=0.5, dense_lr=1e-2))
    delta = trained.model.to_delta("dense-extract")
    validate(delta, tiny_llama)
    assert delta.meta.kind == "generate" and not delta.heads
    assert "lm_head.weight" not in delta.tensors  # tied to the embedding: stored once
    assert 0 < delta.nnz <= round(0.05 * tiny_llama.numel)
    trained.model.train(False)
    with torch.no_grad():
        want = trained.model(**batch_of(feats)).logits
    torch.testing.assert_close(swapped_logits(tiny_llama, delta, feats), want, rtol=0, atol=1e-5)
    assert not differing(tiny_llama, saved)
