"""Extracting a sparse delta from a full fine-tune.

Mechanics on tiny models (top-k selection, scopes, ties, heads, refusals); then, marked slow, a real
fine-tune of `minilm` on SST-2: at density 1.0 the swapped-in base *is* the fine-tuned model wherever
float32 can say so, and at 1 % the predictions mostly agree."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch
from support import bits

from taskdelta.deltas import (
    Base,
    Swapper,
    bind_base,
    dumps,
    extract,
    load_base,
    load_finetuned,
    loads,
    prepare,
    validate,
)


def diffs_of(base: Base, ft_params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """finetuned - base per base tensor, flat, float32."""
    return {n: (ft_params[n] - p).reshape(-1) for n, p in base.params.items()}


def expected_weights(original: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """What a density-1.0 delta makes of a base tensor: base + (ft - base) in float32 where the
    difference is nonzero; the base value itself where it is zero (zero differences are not stored,
    so a base -0.0 stays -0.0 even where the fine-tune has +0.0)."""
    diff = ft - original
    return torch.where(diff != 0, original + diff, original)


def assert_top_k(delta, diffs: dict[str, torch.Tensor]) -> None:
    """Every kept entry is at least as large in magnitude as every dropped one, and its stored
    increment is the difference itself, bit for bit."""
    kept_min, dropped_max = float("inf"), 0.0
    for name, d in diffs.items():
        mask = torch.zeros(d.numel(), dtype=torch.bool)
        if name in delta.tensors:
            sp = delta.tensors[name]
            assert sp.idx.dtype == torch.int32
            assert bool((sp.idx[1:] > sp.idx[:-1]).all()), f"{name}: indices not increasing"
            assert torch.equal(bits(sp.val), bits(d[sp.idx.long()])), name
            mask[sp.idx.long()] = True
            kept_min = min(kept_min, float(d[mask].abs().min()))
        if (~mask).any():
            dropped_max = max(dropped_max, float(d[~mask].abs().max()))
    assert kept_min >= dropped_max


# --- tiny models -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ft_dir(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 'fine-tuned' tiny BERT classifier: the base weights perturbed (some tensors untouched,
    so zeros exist), a fresh classifier head, saved as a folder."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(1)
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    with torch.no_grad():
        for i, p in enumerate(model.bert.parameters()):
            if i % 5 == 4:
                continue  # unchanged tensors: extraction must not store anything for them
            p.add_(torch.randn_like(p) * 10 ** -(2 + i % 3))  # magnitudes spread over 3 decades
    model.config.id2label = {0: "negative", 1: "positive"}
    model.config.label2id = {"negative": 0, "positive": 1}
    out = tmp_path_factory.mktemp("tiny-ft")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_ft(tiny_ft_dir: Path):
    return load_finetuned(tiny_ft_dir)


@pytest.fixture
def fresh_bert(tiny_bert_dir: Path) -> Base:
    return load_base(tiny_bert_dir, device="cpu")


def ft_backbone(ft) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in ft.base_model.named_parameters()}


@pytest.mark.parametrize("density", [0.001, 0.01, 0.2])
def test_global_scope_keeps_the_largest_differences(tiny_bert, tiny_ft, density):
    """Global top-k: round(density * numel) entries over all tensors, none smaller than any dropped
    entry; the head is stored dense and the metadata says what was done."""
    delta = extract(tiny_bert, tiny_ft, density)
    validate(delta, tiny_bert)
    diffs = diffs_of(tiny_bert, ft_backbone(tiny_ft))
    assert delta.nnz == round(density * tiny_bert.numel)
    assert_top_k(delta, diffs)
    assert delta.meta.kind == "classify" and delta.meta.labels == ["negative", "positive"]
    assert delta.meta.provenance.method == "extract"
    assert delta.meta.provenance.density == pytest.approx(delta.nnz / tiny_bert.numel)
    assert delta.meta.provenance.model_extra == {"target_density": density, "scope": "global"}
    for name in ("classifier.weight", "classifier.bias"):
        assert torch.equal(delta.heads[name], dict(tiny_ft.named_parameters())[name])


@pytest.mark.parametrize("density", [0.01, 0.3])
def test_per_tensor_scope_keeps_round_density_numel_per_tensor(tiny_bert, tiny_ft, density):
    """Per-tensor top-k: each tensor keeps round(density * numel) entries (all its nonzeros if it
    has fewer), its own largest ones."""
    delta = extract(tiny_bert, tiny_ft, density, scope="per-tensor")
    validate(delta, tiny_bert)
    diffs = diffs_of(tiny_bert, ft_backbone(tiny_ft))
    for name, d in diffs.items():
        want = min(round(density * d.numel()), int((d != 0).sum()))
        got = delta.tensors[name].nnz if name in delta.tensors else 0
        assert got == want, name
        assert_top_k(type(delta)(meta=delta.meta, tensors={k: v for k, v in delta.tensors.items()
                                                           if k == name}), {name: d})


def test_unchanged_tensors_and_zero_differences_are_never_stored(tiny_bert, tiny_ft):
    """Even at density 1.0, only entries that changed are kept."""
    delta = extract(tiny_bert, tiny_ft, 1.0)
    diffs = diffs_of(tiny_bert, ft_backbone(tiny_ft))
    unchanged = {n for n, d in diffs.items() if not d.any()}
    assert unchanged and not unchanged & set(delta.tensors)
    assert delta.nnz == sum(int((d != 0).sum()) for d in diffs.values())
    assert all(bool((sp.val != 0).all()) for sp in delta.tensors.values())


def test_density_one_then_apply_gives_the_finetuned_weights(fresh_bert, tiny_ft):
    """base + (ft - base) lands on ft wherever that is exact in float32, and only there."""
    base = fresh_bert
    original = {n: p.clone() for n, p in base.params.items()}
    ft = ft_backbone(tiny_ft)
    delta = loads(dumps(extract(base, tiny_ft, 1.0)))
    validate(delta, base)
    sw = Swapper(base)
    with sw.swapped(prepare(delta, base)):
        for name, p in base.params.items():
            round_trip = expected_weights(original[name], ft[name])
            exact = bits(round_trip) == bits(ft[name])
            assert torch.equal(bits(p) == bits(ft[name]), exact), name
            assert torch.equal(bits(p), bits(round_trip)), name


def test_ties_at_the_threshold_keep_exactly_k(tiny_bert_dir):
    """100 equal differences and k = 37: exactly 37 are kept, in index order (deterministic)."""
    from transformers import BertForSequenceClassification

    ft = BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    with torch.no_grad():
        for p in ft.parameters():
            p.zero_()
    zero = copy.deepcopy(ft.bert)
    base = bind_base(zero, None, name="zero", path=None, fingerprint="sha256:zero")
    name = "encoder.layer.1.output.dense.weight"
    with torch.no_grad():
        dict(ft.bert.named_parameters())[name].view(-1)[torch.arange(0, 1000, 10)] = 0.5
    delta = extract(base, ft, 37 / base.numel)
    assert list(delta.tensors) == [name]
    assert delta.tensors[name].idx.tolist() == list(range(0, 370, 10))


def test_density_out_of_range_is_refused(tiny_bert, tiny_ft):
    for density in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="density must be in"):
            extract(tiny_bert, tiny_ft, density)


def test_generate_delta_from_a_causal_lm(tiny_llama, tiny_llama_dir):
    """A fine-tuned causal LM gives a 'generate' delta with no head; the tied embedding is one
    tensor; applied at density 1.0 it reproduces the fine-tuned logits."""
    from transformers import LlamaForCausalLM

    ft = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    delta = extract(tiny_llama, ft, 1.0)
    validate(delta, tiny_llama)
    assert delta.meta.kind == "generate" and delta.heads == {}
    assert "lm_head.weight" not in delta.tensors and "model.embed_tokens.weight" in delta.tensors
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with Swapper(tiny_llama).swapped(prepare(delta, tiny_llama)) as model, torch.no_grad():
        served = model(input_ids=ids).logits
    with torch.no_grad():
        want = ft(input_ids=ids).logits
    assert torch.allclose(served, want, atol=1e-5, rtol=0)


def test_untied_lm_head_on_a_tied_base_is_refused(tiny_llama, tiny_llama_dir):
    """If the fine-tune untied its LM head, two tensors map onto the base's one shared tensor: the
    delta cannot hold both, so extraction refuses rather than silently keep one."""
    from transformers import LlamaForCausalLM

    ft = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    ft.lm_head.weight = torch.nn.Parameter(ft.lm_head.weight.detach() + 0.01)
    assert ft.lm_head.weight is not ft.model.embed_tokens.weight
    with pytest.raises(ValueError, match="both map to base tensor 'model.embed_tokens.weight'"):
        extract(tiny_llama, ft, 0.1)


# --- the real thing: minilm fine-tuned on SST-2 (slow) -----------------------------------------

TRAIN_STEPS, BATCH, LR, HELD_OUT = 40, 16, 1e-4, 200


def sst2_split(data: Path) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(held-out, train): a fixed, seeded split of the SST-2 training file (plain TSV, no quoting)."""
    lines = (data / "sst2" / "train.tsv").read_text(encoding="utf-8").split("\n")
    assert lines[0].split("\t") == ["sentence", "label"]
    rows = [(s, int(y)) for s, y in (line.split("\t") for line in lines[1:] if line)]
    random.Random(0).shuffle(rows)
    return rows[:HELD_OUT], rows[HELD_OUT:]


@pytest.fixture(scope="module")
def minilm_ft(tmp_path_factory: pytest.TempPathFactory, task_data: Path) -> tuple[Path, dict, list[str]]:
    """minilm fully fine-tuned (every weight trains) for TRAIN_STEPS AdamW steps, saved; with the
    held-out sentences and their tokenization."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    from taskdelta.deltas import resolve_base

    folder = resolve_base("minilm")
    held, train = sst2_split(task_data)
    tok = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(folder, num_labels=2).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    for step in range(TRAIN_STEPS):
        batch = train[step * BATCH : (step + 1) * BATCH]
        enc = tok([s for s, _ in batch], padding=True, truncation=True, max_length=64,
                  return_tensors="pt")
        model(**enc, labels=torch.tensor([y for _, y in batch])).loss.backward()
        opt.step()
        opt.zero_grad()
    model.config.id2label = {0: "negative", 1: "positive"}
    model.config.label2id = {"negative": 0, "positive": 1}
    out = tmp_path_factory.mktemp("minilm-sst2")
    model.save_pretrained(out)
    enc = dict(tok([s for s, _ in held], padding=True, truncation=True, max_length=64,
                   return_tensors="pt"))
    return out, enc, [str(y) for _, y in held]


@pytest.fixture(scope="module")
def ft_model(minilm_ft):
    """The fine-tuned model loaded once (the tests below only read it) and its held-out logits."""
    folder, enc, _ = minilm_ft
    ft = load_finetuned(folder)
    with torch.no_grad():
        return ft, ft(**enc).logits


@pytest.fixture(scope="module")
def minilm() -> Base:
    """A private minilm: these tests swap into it."""
    return load_base("minilm", device="cpu")


@torch.no_grad()
def served_logits(base: Base, delta, enc: dict) -> torch.Tensor:
    with Swapper(base).swapped(prepare(delta, base)) as model:
        return model(**enc).logits


@pytest.mark.slow
def test_minilm_density_one_reproduces_the_finetune(minilm, minilm_ft, ft_model):
    """Density 1.0: every base weight equals the fine-tuned one to the last bit exactly where
    base + (ft - base) == ft in float32 (counted), and the logits agree within 1e-5."""
    _, enc, _ = minilm_ft
    base = minilm
    ft, want = ft_model
    ftp = ft_backbone(ft)
    original = {n: p.clone() for n, p in base.params.items()}
    delta = loads(dumps(extract(base, ft, 1.0)))
    validate(delta, base)
    changed = sum(int((ftp[n] != original[n]).sum()) for n in original)
    assert delta.nnz == changed and changed > 0.5 * base.numel  # a full fine-tune moves most

    inexact = 0
    with Swapper(base).swapped(prepare(delta, base)) as model, torch.no_grad():
        for name, p in base.params.items():
            round_trip = expected_weights(original[name], ftp[name])
            exact = bits(round_trip) == bits(ftp[name])
            assert torch.equal(bits(p) == bits(ftp[name]), exact), name
            assert torch.equal(bits(p), bits(round_trip)), name
            inexact += int((~exact).sum())
        served = model(**enc).logits
    assert all(torch.equal(bits(p), bits(original[n])) for n, p in base.params.items())
    gap = float((served - want).abs().max())
    print(f"\ndensity 1.0: {delta.nnz} entries, {inexact} not exact in float32 "
          f"({inexact / delta.nnz:.2e}); max |logit gap| {gap:.2e}")
    assert gap <= 1e-5


@pytest.mark.slow
def test_minilm_one_percent_mostly_agrees(minilm, minilm_ft, ft_model):
    """Density 0.01: predicted labels on 200 held-out sentences mostly agree with the fine-tuned
    model's, and the logit margins are strongly correlated with its margins, far above a control
    that keeps only the dense head."""
    _, enc, _ = minilm_ft
    base = minilm
    ft, want = ft_model
    delta = loads(dumps(extract(base, ft, 0.01)))
    validate(delta, base)
    assert delta.nnz == round(0.01 * base.numel)
    head_only = type(delta)(meta=delta.meta, tensors={}, heads=delta.heads)

    def compare(logits: torch.Tensor) -> tuple[float, float, float]:
        agree = float((logits.argmax(-1) == want.argmax(-1)).float().mean())
        m, mw = logits[:, 1] - logits[:, 0], want[:, 1] - want[:, 0]
        corr = float(torch.corrcoef(torch.stack([m, mw]))[0, 1])
        return agree, corr, float((logits - want).abs().mean())

    agree, corr, gap = compare(served_logits(base, delta, enc))
    agree0, corr0, gap0 = compare(served_logits(base, head_only, enc))
    where = sum(t.nnz for n, t in delta.tensors.items() if "word_embeddings" in n) / delta.nnz
    print(f"\ndensity 0.01 ({delta.nnz} entries, {where:.0%} in the word embeddings): "
          f"agreement {agree:.3f}, margin correlation {corr:.3f}, mean |logit gap| {gap:.3f}; "
          f"head-only control: agreement {agree0:.3f}, correlation {corr0:.3f}, gap {gap0:.3f}")
    assert agree >= 0.75
    assert corr >= 0.7 and corr > corr0 + 0.3
    assert gap < gap0


@pytest.mark.slow
def test_minilm_per_tensor_scope(minilm, minilm_ft, ft_model):
    """Per-tensor scope on the real model: round(0.01 * numel) per tensor (or all its changes)."""
    _, enc, _ = minilm_ft
    base = minilm
    ft, want_logits = ft_model
    delta = extract(base, ft, 0.01, scope="per-tensor")
    validate(delta, base)
    diffs = diffs_of(base, ft_backbone(ft))
    for name, d in diffs.items():
        want = min(round(0.01 * d.numel()), int((d != 0).sum()))
        assert (delta.tensors[name].nnz if name in delta.tensors else 0) == want, name
    assert_top_k(type(delta)(meta=delta.meta, tensors={n: delta.tensors[n]
                                                       for n in ["pooler.dense.weight"]}),
                 {"pooler.dense.weight": diffs["pooler.dense.weight"]})
    agree = float((served_logits(base, delta, enc).argmax(-1) == want_logits.argmax(-1))
                  .float().mean())
    print(f"\nper-tensor density 0.01: {delta.nnz} entries, agreement {agree:.3f}")
