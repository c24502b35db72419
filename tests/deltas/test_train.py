"""Sparse fine-tuning (issue 5): only the masked entries train, the written delta is the trained
model, masks pick what they claim, causal-LM mode learns the response only, refit keeps the mask,
the CLI writes what the server accepts, and the server scores a trained delta like offline."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch
from support import DATA, differing, snapshot
from typer.testing import CliRunner

from taskdelta.deltas import Swapper, dumps, extract, load, load_base, loads, prepare, validate
from taskdelta.deltas.cli import app
from taskdelta.deltas.data import (
    IGNORE,
    Example,
    Instruction,
    carve,
    causal_features,
    chat_prompt,
    classify_features,
    load_classify,
    load_instructions,
    read_tsv,
    subsample,
)
from taskdelta.deltas.masks import (
    accumulate_grads,
    magnitude_mask,
    mask_from_scores,
    random_mask,
    top_global,
    top_per_tensor,
)
from taskdelta.deltas.recipe import eos_id
from taskdelta.deltas.train import (
    SparseTaskModel,
    TrainConfig,
    evaluate,
    fit,
    gradient_scores,
    init_head,
    probe_head,
    refit,
    task_tensors,
    train_full,
    train_sparse,
)

POS = ["a gripping , funny and moving film", "wonderful acting", "a joy to watch", "brilliant and warm",
       "the best film this year", "smart , touching and funny"]
NEG = ["dull and lifeless", "a tedious mess", "the worst film this year", "boring , boring , boring",
       "painfully unfunny", "a waste of time"]


def toy_examples() -> list[Example]:
    return [Example(t, 1) for t in POS] + [Example(t, 0) for t in NEG]


def swapped_logits(base, delta, features) -> torch.Tensor:
    """Logits of the delta applied in place by the Swapper (the serving path), from its file bytes."""
    delta = loads(dumps(delta))
    validate(delta, base)
    prepared = prepare(delta, base)
    sw = Swapper(base)
    with torch.no_grad(), sw.swapped(prepared) as model:
        return model(**batch_of(features)).logits


def batch_of(features) -> dict[str, torch.Tensor]:
    from taskdelta.deltas.data import collate

    batch = collate(features, pad_id=0)
    batch.pop("labels")
    return batch


# ---- data ---------------------------------------------------------------------------------------

def test_tsv_is_split_on_tabs_only_and_quotes_do_not_merge_rows(tmp_path: Path):
    f = tmp_path / "t.tsv"
    f.write_text('sentence\tlabel\n"an opening quote\t1\nplain\t0\nclosing" quote\t10\nx\t2\n')
    rows = read_tsv(f)
    assert [r["sentence"] for r in rows] == ['"an opening quote', "plain", 'closing" quote', "x"]
    data = load_classify(f, "sentence", "label")
    assert data.labels == ["0", "1", "2", "10"]  # numbers in numeric order, not string order
    assert [e.label for e in data.examples] == [1, 0, 3, 2]
    with pytest.raises(ValueError, match="no column 'text'"):
        load_classify(f, "text", "label")
    with pytest.raises(ValueError, match="not among"):
        load_classify(f, "sentence", "label", labels=["0", "1"])


def test_carve_is_seeded_disjoint_and_complete():
    items = list(range(100))
    train, val = carve(items, 20, seed=3)
    assert len(val) == 20 and sorted(train + val) == items
    assert carve(items, 20, seed=3) == (train, val)
    assert carve(items, 20, seed=4)[1] != val
    assert subsample(train, 10, seed=0) == subsample(train, 10, seed=0)
    assert len(set(subsample(train, 10, seed=0))) == 10


def test_pair_task_reads_both_columns():
    data = load_classify(DATA / "rte" / "train.tsv", "sentence1", "label", pair_col="sentence2")
    assert data.labels == ["entailment", "not_entailment"]
    first = data.examples[0]
    assert first.text == ("No Weapons of Mass Destruction Found in Iraq Yet.",
                          "Weapons of Mass Destruction Found in Iraq.")
    assert data.labels[first.label] == "not_entailment"


# ---- masks --------------------------------------------------------------------------------------

def test_per_tensor_and_global_top_k_pick_the_largest_scores():
    a = torch.tensor([0.0, 5.0, 1.0, 3.0, 2.0, 0.5, 4.0, 0.1, 0.2, 0.3])
    b = torch.tensor([[9.0, 0.0], [8.0, 0.0]])
    per = top_per_tensor({"a": a, "b": b}, 0.3)
    assert per["a"].tolist() == [1, 3, 6] and per["b"].tolist() == [0]  # round(0.3 * 4) = 1
    glob = top_global({"a": a, "b": b}, 0.25)  # round(0.25 * 14) = 4: 9, 8, 5, 4
    assert glob["a"].tolist() == [1, 6] and glob["b"].tolist() == [0, 2]
    assert top_global({"a": torch.zeros(4)}, 0.5)["a"].numel() == 0  # zero scores are never chosen


def test_grad_and_fisher_masks_differ_as_defined():
    g1 = {"w": torch.tensor([3.0, 0.0, 0.0, 1.0]), "v": torch.tensor([0.0, 1.0])}
    g2 = {"w": torch.tensor([-3.0, 2.5, 0.0, 1.0]), "v": torch.tensor([0.0, -1.0])}
    scores = accumulate_grads([g1, g2])
    assert scores.batches == 2
    assert torch.equal(scores.abs_sum["w"], torch.tensor([6.0, 2.5, 0.0, 2.0]))
    assert torch.equal(scores.sq_sum["w"], torch.tensor([18.0, 6.25, 0.0, 2.0]))
    grad = mask_from_scores("grad", scores, 0.5)  # per tensor: 2 of w, 1 of v
    assert grad["w"].tolist() == [0, 1] and grad["v"].tolist() == [1]
    fisher = mask_from_scores("fisher", scores, 0.5)  # global 3 of 6: 18, 6.25, 2 (w) vs 2 (v) tie
    assert fisher["w"].tolist()[:2] == [0, 1] and sum(t.numel() for t in fisher.values()) == 3


def test_excluded_tensors_get_no_entries_and_their_budget_moves_to_the_others():
    g = {"emb.word": torch.arange(1.0, 101.0), "layer.w": torch.arange(1.0, 101.0)}
    scores = accumulate_grads([g])
    for kind in ("grad", "fisher"):
        mask = mask_from_scores(kind, scores, 0.1, exclude=["emb."])
        assert set(mask) == {"layer.w"}
        assert mask["layer.w"].tolist() == list(range(80, 100))  # all 20 entries of the budget
    with pytest.raises(ValueError, match="leaves no tensor"):
        mask_from_scores("grad", scores, 0.1, exclude=["emb.", "layer."])


def test_magnitude_and_random_masks(tiny_bert):
    params = task_tensors(tiny_bert, "classify")
    mag = magnitude_mask(params, 0.1)
    name = "encoder.layer.0.attention.self.query.weight"
    w = params[name].reshape(-1).abs()
    assert w[mag[name]].min() >= w[~torch.isin(torch.arange(w.numel()), mag[name])].max()
    r1, r2, r3 = (random_mask(params, 0.1, seed=s) for s in (1, 1, 2))
    assert all(torch.equal(r1[n], r2[n]) for n in r1)
    assert any(not torch.equal(r1[n], r3[n]) for n in r1)
    for n, idx in r1.items():
        assert idx.numel() == round(0.1 * params[n].numel())
        assert bool((idx[1:] > idx[:-1]).all())


# ---- training touches the mask only; the delta is the trained model ------------------------------

def test_only_masked_entries_have_gradients_and_optimizer_state(tiny_bert):
    saved = snapshot(tiny_bert)
    feats = classify_features(tiny_bert.tokenizer, toy_examples(), 32)
    mask = random_mask(task_tensors(tiny_bert, "classify"), 0.05, seed=0)
    model = SparseTaskModel(tiny_bert, "classify", ["neg", "pos"], mask)
    out = model(**batch_of(feats))
    torch.nn.functional.cross_entropy(out.logits, torch.tensor([e.label for e in toy_examples()])).backward()
    assert all(p.grad is None and not p.requires_grad for p in tiny_bert.params.values())
    assert [v.grad.shape for v in model.values] == [i.shape for i in model.idx]
    for v in model.values:
        v.grad = None
    for p in model.head.values():
        p.grad = None

    cfg = TrainConfig(lr=1e-2, head_lr=1e-2, max_steps=4, batch_size=4, weight_decay=0.5)
    trained = fit(model, feats, cfg)
    state_numel = sum(s["exp_avg"].numel() for s in trained.optimizer.state.values())
    head_numel = sum(p.numel() for p in model.head.values())
    assert state_numel == sum(i.numel() for i in mask.values()) + head_numel
    assert all(p.dim() == 1 for p in model.values)
    assert not differing(tiny_bert, saved)  # training never wrote a base weight (weight decay included)
    assert all(bool(v.detach().abs().sum() > 0) for v in model.values)


def test_written_delta_is_exactly_the_mask_and_reproduces_the_trained_logits(tiny_bert):
    saved = snapshot(tiny_bert)
    feats = classify_features(tiny_bert.tokenizer, toy_examples(), 32)
    cfg = TrainConfig(lr=5e-3, max_steps=6, batch_size=4, weight_decay=0.01)
    scores = gradient_scores(tiny_bert, "classify", ["neg", "pos"], feats, cfg, num_batches=2)
    mask = mask_from_scores("grad", scores, 0.02)
    trained = train_sparse(tiny_bert, "classify", ["neg", "pos"], feats, mask, cfg)
    delta = trained.model.to_delta("sparse-train", mask="grad")
    assert {n for n, i in mask.items() if i.numel()} == set(delta.tensors)
    for name, sp in delta.tensors.items():
        assert torch.equal(sp.idx.long(), mask[name])
    trained.model.train(False)
    with torch.no_grad():
        want = trained.model(**batch_of(feats)).logits
        untrained = SparseTaskModel(tiny_bert, "classify", ["neg", "pos"], mask)(**batch_of(feats)).logits
    got = swapped_logits(tiny_bert, delta, feats)
    assert not torch.allclose(want, untrained, atol=1e-3)  # training moved the logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not differing(tiny_bert, saved)
    assert evaluate(trained.model, feats)["accuracy"] == float(
        (want.argmax(-1) == torch.tensor([f["labels"] for f in feats])).float().mean())


def test_sparse_training_learns_a_separable_toy_task(tiny_bert):
    feats = classify_features(tiny_bert.tokenizer, toy_examples(), 32)
    mask = random_mask(task_tensors(tiny_bert, "classify"), 0.05, seed=0)
    before = evaluate(SparseTaskModel(tiny_bert, "classify", ["neg", "pos"], mask), feats)
    trained = train_sparse(tiny_bert, "classify", ["neg", "pos"], feats, mask,
                           TrainConfig(lr=2e-2, head_lr=2e-2, max_steps=40, batch_size=12, dropout=False))
    after = evaluate(trained.model, feats)
    assert after["loss"] < before["loss"] * 0.5
    assert after["accuracy"] == 1.0


def test_probe_trains_the_head_alone_and_masks_and_training_start_from_it(tiny_bert):
    saved = snapshot(tiny_bert)
    labels = ["neg", "pos"]
    feats = classify_features(tiny_bert.tokenizer, toy_examples(), 32)
    cfg = TrainConfig(batch_size=4, dropout=False)
    fresh = init_head(tiny_bert, "classify", labels, cfg.seed)
    probed = probe_head(tiny_bert, "classify", labels, feats, cfg, steps=30, lr=5e-2)
    assert not differing(tiny_bert, saved)  # the base is frozen during a probe
    assert set(probed) == set(fresh) and not all(torch.equal(probed[n], fresh[n]) for n in fresh)
    before = evaluate(SparseTaskModel(tiny_bert, "classify", labels, {}, heads=fresh), feats)["loss"]
    after = evaluate(SparseTaskModel(tiny_bert, "classify", labels, {}, heads=probed), feats)["loss"]
    assert after < before
    # the mask is scored with the probed head, and sparse training starts from it
    s_fresh = gradient_scores(tiny_bert, "classify", labels, feats, cfg, num_batches=2)
    s_probed = gradient_scores(tiny_bert, "classify", labels, feats, cfg, num_batches=2, heads=probed)
    assert any(not torch.equal(s_fresh.abs_sum[n], s_probed.abs_sum[n]) for n in s_fresh.abs_sum)
    mask = mask_from_scores("grad", s_probed, 0.02)
    start = SparseTaskModel(tiny_bert, "classify", labels, mask, heads=probed)
    assert all(torch.equal(start.head[n].detach(), probed[n]) for n in probed)
    trained = train_sparse(tiny_bert, "classify", labels, feats, mask, replace(cfg, max_steps=2),
                           heads=probed)
    assert all(torch.equal(p, probed[n]) for n, p in probe_head(
        tiny_bert, "classify", labels, feats, cfg, steps=30, lr=5e-2).items())  # seeded, repeatable
    assert trained.steps == 2 and not differing(tiny_bert, saved)


# ---- causal-LM mode -----------------------------------------------------------------------------

def test_causal_features_put_the_loss_on_the_response_only(tiny_llama):
    tok = tiny_llama.tokenizer
    items = [Instruction(chat_prompt(tok, "Name a colour."), "Blue.")]
    eos = eos_id(tiny_llama)
    assert eos == tiny_llama.config.eos_token_id == 102  # the BERT tokenizer has none: the config's
    (f,) = causal_features(tok, items, 128, eos)
    prompt_len = len(tok(items[0].prompt)["input_ids"])
    response = tok("Blue.", add_special_tokens=False)["input_ids"]
    assert f["labels"][:prompt_len] == [IGNORE] * prompt_len
    assert f["labels"][prompt_len:] == f["input_ids"][prompt_len:] == response + [eos]
    assert causal_features(tok, items, prompt_len, eos) == []  # no response token left: skipped


def test_causal_lm_training_writes_a_generate_delta_that_swaps_in(tiny_llama):
    saved = snapshot(tiny_llama)
    items = load_instructions(DATA / "instructions" / "train.jsonl", tiny_llama.tokenizer)[:4]
    assert items[0].prompt.startswith("user: ") and items[0].prompt.endswith("assistant:")
    feats = causal_features(tiny_llama.tokenizer, items, 64, eos_id(tiny_llama))
    cfg = TrainConfig(lr=5e-2, max_steps=15, batch_size=4, dropout=False)
    scores = gradient_scores(tiny_llama, "generate", [], feats, cfg, num_batches=1)
    mask = mask_from_scores("fisher", scores, 0.05)
    assert "lm_head.weight" not in mask  # tied to the embedding: trained (and stored) once
    before = evaluate(SparseTaskModel(tiny_llama, "generate", [], mask), feats)
    trained = train_sparse(tiny_llama, "generate", [], feats, mask, cfg)
    after = evaluate(trained.model, feats)
    assert after["loss"] < before["loss"] - 0.5
    delta = trained.model.to_delta("sparse-train", mask="fisher")
    assert delta.meta.kind == "generate" and not delta.heads
    trained.model.train(False)
    with torch.no_grad():
        want = trained.model(**batch_of(feats)).logits
    torch.testing.assert_close(swapped_logits(tiny_llama, delta, feats), want, rtol=0, atol=1e-5)
    assert not differing(tiny_llama, saved)


# ---- refit --------------------------------------------------------------------------------------

def test_refit_keeps_the_extracted_mask_and_starts_from_its_values(tiny_bert):
    feats = classify_features(tiny_bert.tokenizer, toy_examples(), 32)
    full = train_full(tiny_bert, "classify", ["neg", "pos"], feats,
                      TrainConfig(lr=1e-3, max_steps=5, batch_size=4))
    extracted = extract(tiny_bert, full.model.net, 0.02)
    assert extracted.meta.labels == ["neg", "pos"]
    same = refit(tiny_bert, extracted, feats, TrainConfig(lr=5e-3, max_steps=0, batch_size=4))
    untouched = same.model.to_delta("extract+refit")
    for name, sp in extracted.tensors.items():
        assert torch.equal(untouched.tensors[name].val, sp.val)
    assert all(torch.equal(untouched.heads[n], h) for n, h in extracted.heads.items())
    refitted = refit(tiny_bert, extracted, feats, TrainConfig(lr=5e-3, max_steps=4, batch_size=4))
    delta = refitted.model.to_delta("extract+refit")
    assert set(delta.tensors) == set(extracted.tensors)
    assert all(torch.equal(delta.tensors[n].idx, sp.idx) for n, sp in extracted.tensors.items())
    assert any(not torch.equal(delta.tensors[n].val, sp.val) for n, sp in extracted.tensors.items())


# ---- command line -------------------------------------------------------------------------------

def write_toy_tsv(path: Path) -> Path:
    rows = [f"{e.text}\t{'positive' if e.label else 'negative'}" for e in toy_examples()] * 3
    path.write_text("sentence\tsentiment\n" + "\n".join(rows) + "\n")
    return path


def test_cli_train_writes_a_valid_delta_and_prints_a_summary(tiny_bert_dir: Path, tmp_path: Path):
    data = write_toy_tsv(tmp_path / "toy.tsv")
    out = tmp_path / "toy.safetensors"
    r = CliRunner().invoke(app, ["train", "--base", str(tiny_bert_dir), "--data", str(data),
                                 "--text-col", "sentence", "--label-col", "sentiment", "--density", "0.01",
                                 "--mask", "grad", "--mask-batches", "2", "--max-steps", "3",
                                 "--batch-size", "8", "--val-size", "6", "--seed", "1", "-o", str(out),
                                 "--exclude", "word_embeddings"])
    assert r.exit_code == 0, r.output
    for word in ("density", "bytes", "train loss", "validation accuracy"):
        assert word in r.output
    delta = load(out)
    validate(delta, load_base(tiny_bert_dir, device="cpu"))
    assert delta.meta.kind == "classify" and delta.meta.labels == ["negative", "positive"]
    prov = delta.meta.provenance.model_dump()
    assert prov["method"] == "sparse-train" and prov["mask"] == "grad" and prov["seed"] == 1
    b = load_base(tiny_bert_dir, device="cpu")
    # the word embeddings' share of the budget went to the other tensors (zero-score entries, which
    # are never chosen, can leave it a little under the target)
    assert not any("word_embeddings" in n for n in delta.tensors)
    assert 0.005 < prov["density"] == delta.nnz / b.numel <= 0.0101
    assert f"density {prov['density']:.4%}" in r.output
    bad = CliRunner().invoke(app, ["train", "--base", str(tiny_bert_dir), "--data", str(data),
                                   "--text-col", "sentence", "--label-col", "nope", "-o", str(out)])
    assert bad.exit_code == 2 and "no column 'nope'" in bad.output


def test_cli_train_probe_epochs_starts_from_a_probed_head(tiny_bert_dir: Path, tmp_path: Path):
    """--probe-epochs trains the head alone first: the same run without it writes another delta."""
    data = write_toy_tsv(tmp_path / "toy.tsv")
    common = ["train", "--base", str(tiny_bert_dir), "--data", str(data), "--text-col", "sentence",
              "--label-col", "sentiment", "--density", "0.01", "--mask", "fisher", "--mask-batches", "2",
              "--max-steps", "2", "--batch-size", "8", "--val-size", "6"]
    runs = {}
    for probe in ("0", "1"):
        out = tmp_path / f"probe{probe}.safetensors"
        r = CliRunner().invoke(app, [*common, "--probe-epochs", probe, "--probe-lr", "0.05", "-o", str(out)])
        assert r.exit_code == 0, r.output
        runs[probe] = load(out)
        validate(runs[probe], load_base(tiny_bert_dir, device="cpu"))
    assert set(runs["0"].heads) == set(runs["1"].heads)
    assert any(not torch.equal(runs["0"].heads[n], runs["1"].heads[n]) for n in runs["0"].heads)


def test_cli_train_generate_on_instruction_jsonl(tiny_llama_dir: Path, tmp_path: Path):
    rows = (DATA / "instructions" / "train.jsonl").read_text().splitlines()[:10]
    data = tmp_path / "inst.jsonl"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "gen.safetensors"
    r = CliRunner().invoke(app, ["train", "--base", str(tiny_llama_dir), "--data", str(data),
                                 "--density", "0.02", "--mask", "random", "--max-steps", "2", "--batch-size",
                                 "4", "--max-length", "64", "--val-size", "2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "validation loss" in r.output and "perplexity" in r.output
    delta = load(out)
    assert delta.meta.kind == "generate" and not delta.heads and delta.meta.labels == []
    validate(delta, load_base(tiny_llama_dir, device="cpu"))


def test_cli_extract_refit_keeps_the_mask(tiny_bert, tiny_bert_dir: Path, tmp_path: Path):
    feats = classify_features(tiny_bert.tokenizer, toy_examples(), 32)
    full = train_full(tiny_bert, "classify", ["negative", "positive"], feats,
                      TrainConfig(lr=1e-3, max_steps=3, batch_size=4))
    full.model.net.save_pretrained(tmp_path / "ft")
    data = write_toy_tsv(tmp_path / "toy.tsv")
    plain, refitted = tmp_path / "plain.safetensors", tmp_path / "refit.safetensors"
    base_args = ["extract", "--base", str(tiny_bert_dir), "--finetuned", str(tmp_path / "ft"),
                 "--density", "0.01"]
    assert CliRunner().invoke(app, [*base_args, "-o", str(plain)]).exit_code == 0
    r = CliRunner().invoke(app, [*base_args, "-o", str(refitted), "--refit", "--data", str(data),
                                 "--text-col", "sentence", "--label-col", "sentiment",
                                 "--max-steps", "3", "--batch-size", "8", "--val-size", "6"])
    assert r.exit_code == 0, r.output
    assert "refit" in r.output and "validation accuracy" in r.output
    a, b = load(plain), load(refitted)
    assert set(a.tensors) == set(b.tensors)
    assert all(torch.equal(a.tensors[n].idx, b.tensors[n].idx) for n in a.tensors)
    assert any(not torch.equal(a.tensors[n].val, b.tensors[n].val) for n in a.tensors)
    assert b.meta.provenance.method == "extract+refit"
    r = CliRunner().invoke(app, [*base_args, "-o", str(refitted), "--refit"])
    assert r.exit_code == 2 and "--data" in r.output


# ---- through the server -------------------------------------------------------------------------

def test_trained_delta_scores_the_same_through_the_rest_api(tiny_bert, redis_proc, tmp_path, live_server):
    from taskdelta.server.app import create_app
    from taskdelta.server.settings import Settings

    examples = toy_examples()
    feats = classify_features(tiny_bert.tokenizer, examples, 32)
    mask = random_mask(task_tensors(tiny_bert, "classify"), 0.05, seed=0)
    trained = train_sparse(tiny_bert, "classify", ["negative", "positive"], feats, mask,
                           TrainConfig(lr=2e-2, head_lr=2e-2, max_steps=10, batch_size=12))
    delta = trained.model.to_delta("sparse-train", mask="random")
    with torch.no_grad():
        probs = trained.model(**batch_of(feats)).logits.softmax(-1)  # offline: the trained model itself
    offline = evaluate(trained.model, feats)
    saved = snapshot(tiny_bert)
    settings = Settings(redis_url=redis_proc.url, data_dir=tmp_path / "data",
                        api_keys="acme:key-acme", admin_key="key-admin")
    with live_server(create_app(settings, base=tiny_bert)) as srv:
        with httpx.Client(base_url=srv.url, headers={"Authorization": "Bearer key-acme"}, timeout=30) as c:
            assert c.put("/v1/tasks/toy", content=dumps(delta)).status_code == 201
            r = c.post("/v1/tasks/toy/classify", json={"texts": [e.text for e in examples]})
            assert r.status_code == 200, r.text
            results = r.json()["results"]
    served = torch.tensor([[res["scores"]["negative"], res["scores"]["positive"]] for res in results])
    torch.testing.assert_close(served, probs, rtol=0, atol=1e-5)
    labels = ["negative", "positive"]
    served_acc = sum(res["label"] == labels[e.label] for res, e in zip(results, examples, strict=True))
    assert served_acc / len(examples) == offline["accuracy"]
    assert not differing(tiny_bert, saved)


# ---- the real base (short) ----------------------------------------------------------------------

@pytest.mark.slow
def test_minilm_sparse_one_percent_learns_sst2_quickly():
    """30 steps of 16 on 1 % of minilm's entries (fisher mask) lift SST-2 far above the majority
    class (~55 % on this split); it reached 79.5 % when written."""
    base = load_base("minilm", device="cpu")  # private: training sets the modules' train mode
    data = load_classify(DATA / "sst2" / "train.tsv", "sentence", "label")
    train, val = carve(data.examples, 200, seed=0)
    feats = classify_features(base.tokenizer, subsample(train, 480, seed=0), 64)
    val_feats = classify_features(base.tokenizer, val, 64)
    cfg = TrainConfig(lr=3e-3, head_lr=1e-3, max_steps=30, batch_size=16)
    scores = gradient_scores(base, "classify", data.labels, feats, cfg, num_batches=2)
    mask = mask_from_scores("fisher", scores, 0.01)
    trained = train_sparse(base, "classify", data.labels, feats, mask, cfg)
    acc = evaluate(trained.model, val_feats)["accuracy"]
    assert acc > 0.72, json.dumps({"accuracy": acc, "loss": trained.train_loss})
