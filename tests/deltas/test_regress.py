"""The regress kind (issue 16, STS-B): a classify-shaped task with one output read raw. Its file
round-trips and is validated like classify's (exactly one label, a one-output head); float targets
load from a TSV; sparse training on an MSE loss learns, and the written delta reproduces the trained
outputs through the swap; Pearson / Spearman are the textbook ones; a one-output fine-tune is
extracted as regress; and `taskdelta delta train --kind regress` writes a delta the server accepts."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from support import differing, snapshot
from typer.testing import CliRunner

from taskdelta.deltas import (
    DeltaRejected,
    Swapper,
    dumps,
    extract,
    load,
    load_base,
    loads,
    prepare,
    random_delta,
    validate,
)
from taskdelta.deltas.cli import app
from taskdelta.deltas.data import Example, classify_features, collate, load_regress
from taskdelta.deltas.heads import build_classifier, head_spec
from taskdelta.deltas.masks import random_mask
from taskdelta.deltas.train import (
    SparseTaskModel,
    TrainConfig,
    evaluate,
    regression_metrics,
    task_tensors,
    train_sparse,
)

WORDS = ["good", "bad", "fine", "awful", "great", "poor", "nice", "dull"]


def toy_pairs(n: int = 24, seed: int = 0) -> list[Example]:
    """Pairs whose target is how many words they share (0-3): learnable from the inputs."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = rng.sample(WORDS, 3)
        shared = rng.randint(0, 3)
        b = a[:shared] + rng.sample([w for w in WORDS if w not in a], 3 - shared)
        out.append(Example((" ".join(a), " ".join(b)), float(shared)))
    return out


def inputs_of(features) -> dict[str, torch.Tensor]:
    batch = collate(features, pad_id=0)
    batch.pop("labels")
    return batch


def test_a_regress_delta_round_trips_and_its_head_has_one_output(tiny_bert):
    delta = random_delta(tiny_bert, 0.02, seed=1, kind="regress")
    assert delta.meta.labels == ["score"]
    spec = head_spec(tiny_bert, "regress", 1)
    assert spec == head_spec(tiny_bert, "classify", 1)  # one head code path: only the width differs
    assert spec["classifier.weight"][0] == (1, tiny_bert.config.hidden_size)
    back = loads(dumps(delta))
    validate(back, tiny_bert)
    assert back.meta.kind == "regress" and back.meta.labels == ["score"]
    assert all(torch.equal(back.heads[n], delta.heads[n]) for n in delta.heads)


@pytest.mark.parametrize("labels", [[], ["a", "b"]])
def test_a_regress_delta_needs_exactly_one_label(tiny_bert, labels):
    good = random_delta(tiny_bert, 0.02, seed=1, kind="regress")
    bad = type(good)(meta=good.meta.model_copy(update={"labels": labels}), tensors=good.tensors,
                     heads=good.heads)
    with pytest.raises(DeltaRejected, match="exactly 1 label") as err:
        validate(bad, tiny_bert)
    assert err.value.tensor == "__metadata__.labels"


def test_a_regress_delta_with_a_two_output_head_is_refused(tiny_bert):
    """A classify head (two outputs) relabelled as regress: the head's shape is checked."""
    two = random_delta(tiny_bert, 0.02, seed=1, kind="classify")
    bad = type(two)(meta=two.meta.model_copy(update={"kind": "regress", "labels": ["score"]}),
                    tensors=two.tensors, heads=two.heads)
    with pytest.raises(DeltaRejected, match=r"does not fit the head, expected \(1, 32\)") as err:
        validate(bad, tiny_bert)
    assert err.value.tensor.startswith("head::classifier.")


def test_float_targets_load_from_a_tsv_and_a_non_number_is_named(tmp_path: Path):
    path = tmp_path / "sts.tsv"
    path.write_text("s1\ts2\tscore\na cat\ta dog\t3.8\nit rains\tsun\t0\n")
    got = load_regress(path, "s1", "score", "s2")
    assert got == [Example(("a cat", "a dog"), 3.8), Example(("it rains", "sun"), 0.0)]
    batch = collate([{"input_ids": [1], "labels": e.label} for e in got], pad_id=0)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == pytest.approx([3.8, 0.0])
    path.write_text("s1\ts2\tscore\na\tb\thigh\n")
    with pytest.raises(ValueError, match=r"sts.tsv:2: score is 'high', not a number"):
        load_regress(path, "s1", "score", "s2")


def test_pearson_and_spearman_are_the_textbook_ones():
    preds, targets = [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 1.0, 4.0, 3.0, 5.0]
    m = regression_metrics(preds, targets)
    assert m["pearson"] == pytest.approx(0.8)  # cov 2.0 / (var 2.0)
    assert m["spearman"] == pytest.approx(0.8)  # ranks equal the values here
    assert m["loss"] == pytest.approx(0.8)  # four errors of 1 over 5
    # monotone but not linear: Spearman 1, Pearson below it; ties take their mean rank
    m = regression_metrics([1.0, 2.0, 3.0, 100.0], [0.0, 1.0, 1.0, 2.0])
    assert m["pearson"] < 0.95
    assert m["spearman"] == pytest.approx(0.9486832980505138)  # ranks 0,1,2,3 vs 0,1.5,1.5,3


def test_sparse_regress_training_learns_and_the_delta_reproduces_it_through_the_swap(tiny_bert):
    saved = snapshot(tiny_bert)
    feats = classify_features(tiny_bert.tokenizer, toy_pairs(), 32)
    assert isinstance(feats[0]["labels"], float)
    mask = random_mask(task_tensors(tiny_bert, "regress"), 0.05, seed=0)
    before = evaluate(SparseTaskModel(tiny_bert, "regress", ["score"], mask), feats)
    trained = train_sparse(tiny_bert, "regress", ["score"], feats, mask,
                           TrainConfig(lr=2e-2, head_lr=2e-2, max_steps=40, batch_size=12, dropout=False))
    after = evaluate(trained.model, feats)
    assert trained.losses[-1] < trained.losses[0]
    assert after["loss"] < before["loss"] * 0.5
    assert set(after) == {"pearson", "spearman", "loss"}
    delta = loads(dumps(trained.model.to_delta("sparse-train", mask="random")))
    validate(delta, tiny_bert)
    assert delta.meta.kind == "regress" and delta.meta.labels == ["score"]
    with torch.no_grad():
        want = trained.model(**inputs_of(feats)).logits  # [rows, 1]
        with Swapper(tiny_bert).swapped(prepare(delta, tiny_bert)) as model:
            got = model(**inputs_of(feats)).logits
    assert got.shape == (len(feats), 1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not differing(tiny_bert, saved)


def test_a_one_output_fine_tune_is_extracted_as_regress(tiny_bert):
    delta = random_delta(tiny_bert, 0.02, seed=3, kind="regress")
    finetuned = build_classifier(tiny_bert, ["score"], delta.heads)  # shares the base: a zero diff
    got = extract(tiny_bert, finetuned, 0.01)
    assert got.meta.kind == "regress" and got.meta.labels == ["score"]
    assert set(got.heads) == set(delta.heads)
    validate(got, tiny_bert)


def test_cli_train_regress_writes_a_valid_delta_and_prints_pearson(tiny_bert_dir: Path, tmp_path: Path):
    data = tmp_path / "sts.tsv"
    rows = [f"{' '.join(e.text[0].split())}\t{e.text[1]}\t{e.label}" for e in toy_pairs(30, seed=2)]
    data.write_text("sentence1\tsentence2\tscore\n" + "\n".join(rows) + "\n")
    out = tmp_path / "sts.safetensors"
    r = CliRunner().invoke(app, ["train", "--base", str(tiny_bert_dir), "--data", str(data),
                                 "--kind", "regress", "--text-col", "sentence1", "--pair-col", "sentence2",
                                 "--label-col", "score", "--density", "0.01", "--mask-batches", "2",
                                 "--max-steps", "3", "--batch-size", "8", "--val-size", "6",
                                 "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "validation Pearson" in r.output and "Spearman" in r.output
    delta = load(out)
    validate(delta, load_base(tiny_bert_dir, device="cpu"))
    assert delta.meta.kind == "regress" and delta.meta.labels == ["score"]
    prov = delta.meta.provenance.model_dump()
    assert {"val_pearson", "val_spearman", "val_loss"} <= set(prov)
    bad = CliRunner().invoke(app, ["train", "--base", str(tiny_bert_dir), "--data", str(data),
                                   "--kind", "regress", "--text-col", "sentence1", "--label-col",
                                   "sentence2", "-o", str(out)])
    assert bad.exit_code != 0 and "not a number" in bad.output


def test_a_one_output_seq_cls_peft_adapter_imports_as_regress(tiny_bert, tiny_bert_dir, tmp_path):
    """PEFT's SEQ_CLS with num_labels=1 (transformers' regression) becomes a regress delta whose
    served output is the adapter model's."""
    peft = pytest.importorskip("peft")
    from transformers import BertForSequenceClassification

    from taskdelta.deltas.peft_io import import_peft
    from taskdelta.server.inference import classify
    from taskdelta.server.jobs import ScoreJob

    torch.manual_seed(3)
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=1)
    pm = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=4,
                                                    target_modules=["query", "value"],
                                                    init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "sts")
    delta = import_peft(tiny_bert, tmp_path / "sts").delta
    validate(delta, tiny_bert)
    assert delta.meta.kind == "regress" and delta.meta.labels == ["LABEL_0"]
    texts = ("a fine film", "rain again")
    with Swapper(tiny_bert).swapped(prepare(delta, tiny_bert)) as served:
        (got,) = classify(served, tiny_bert.tokenizer, ("LABEL_0",), [ScoreJob(texts)])
    enc = tiny_bert.tokenizer(list(texts), padding=True, return_tensors="pt")
    with torch.no_grad():
        want = pm(**enc).logits[:, 0]
    assert got == pytest.approx(want.tolist(), abs=1e-5)


@pytest.mark.parametrize("kind", ["regress", "classify"])
def test_a_head_read_from_any_file_offset_serves_the_merged_models_outputs_bitwise(tiny_bert, kind):
    """A parsed head tensor is a view into the file's bytes, aligned to its element only; CPU
    matmuls sum in another order for a weight not 16-byte aligned. The head is copied when built,
    so a head model built from a file answers as one built from the delta in memory (the offline
    merged model's head), bit for bit, whatever the header's length."""
    from taskdelta.server.inference import classify
    from taskdelta.server.jobs import ClassifyJob, ScoreJob

    delta = random_delta(tiny_bert, 0.02, seed=61, kind=kind, scale=0.3)
    job = (ScoreJob if kind == "regress" else ClassifyJob)((("it rains", "the sun is out"),
                                                            ("a man plays a guitar", "music"),
                                                            ("a fine film", "the worst thing")))
    want = classify(build_classifier(tiny_bert, delta.meta.labels, delta.heads), tiny_bert.tokenizer,
                    tuple(delta.meta.labels), [job])
    offsets = set()
    for pad in range(0, 64, 4):  # the base name's length shifts every tensor's offset in the file
        named = type(delta)(meta=delta.meta.model_copy(update={"base_name": "x" * pad}),
                            tensors=delta.tensors, heads=delta.heads)
        back = loads(dumps(named))
        offsets.add(back.heads["classifier.weight"].data_ptr() % 16)
        head = build_classifier(tiny_bert, back.meta.labels, back.heads)
        assert classify(head, tiny_bert.tokenizer, tuple(back.meta.labels), [job]) == want, pad
    assert len(offsets) > 1  # the file views were misaligned in some of them
