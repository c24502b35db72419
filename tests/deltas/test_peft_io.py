"""PEFT adapters in, merged folders out (issue 15), against real PEFT-made adapters on tiny
random-weight models: SHiRA maps exactly, LoRA merges and keeps a chosen density, saved modules
become differences or heads, and an exported folder loads with `from_pretrained`."""

from __future__ import annotations

import json

import pytest
import torch
from support import frozen_copy, merged_copy

from taskdelta.deltas import validate
from taskdelta.deltas.peft_io import export_merged, import_peft

peft = pytest.importorskip("peft")

PROMPT_IDS = torch.tensor([[101, 7592, 2045, 2003, 1037, 3231, 102]])  # [1, 7]


def peft_llama(tiny_llama_dir, config, seed: int = 1):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return peft.get_peft_model(model, config).eval()


def shira_config():
    return peft.ShiraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"],
                            init_weights=False)  # random weights: a non-trivial adapter


def lora_config(**over):
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    return peft.LoraConfig(**(kw | over))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=PROMPT_IDS).logits.float()


def test_shira_entries_are_peft_delta_weights_exactly(tiny_llama, tiny_llama_dir, tmp_path):
    pm = peft_llama(tiny_llama_dir, shira_config())
    pm.save_pretrained(tmp_path / "shira")
    imported = import_peft(tiny_llama, tmp_path / "shira")
    delta = imported.delta
    validate(delta, tiny_llama)
    assert imported.kept_energy == 1.0 and delta.meta.provenance.model_dump()["peft_type"] == "SHIRA"
    layers = {n: m for n, m in pm.named_modules() if hasattr(m, "get_delta_weight")}
    assert len(delta.tensors) == len(layers) == 6
    for module_name, layer in layers.items():
        name = module_name.removeprefix("base_model.model.") + ".weight"
        want = layer.get_delta_weight("default").to_dense().reshape(-1)
        got = torch.zeros_like(want)
        got[delta.tensors[name].idx.long()] = delta.tensors[name].val
        assert torch.equal(got, want), name  # bit for bit


def test_shira_merged_model_matches_peft_model(tiny_llama, tiny_llama_dir, tmp_path):
    pm = peft_llama(tiny_llama_dir, shira_config())
    pm.save_pretrained(tmp_path / "shira")
    merged, _ = merged_copy(frozen_copy(tiny_llama), import_peft(tiny_llama, tmp_path / "shira").delta)
    assert torch.allclose(logits(merged.model), logits(pm), atol=1e-5)
    assert not torch.allclose(logits(frozen_copy(tiny_llama).model), logits(pm), atol=1e-3)


@pytest.mark.parametrize("over", [{}, {"use_rslora": True}, {"rank_pattern": {"down_proj": 2}}])
def test_lora_merged_at_full_density_matches_peft_model(tiny_llama, tiny_llama_dir, tmp_path, over):
    pm = peft_llama(tiny_llama_dir, lora_config(**over))
    pm.save_pretrained(tmp_path / "lora")
    imported = import_peft(tiny_llama, tmp_path / "lora")
    assert imported.kept_energy == pytest.approx(1.0)
    merged, _ = merged_copy(frozen_copy(tiny_llama), imported.delta)
    assert torch.allclose(logits(merged.model), logits(pm), atol=1e-5)


def test_lora_at_a_density_keeps_the_largest_entries_and_says_how_much(tiny_llama, tiny_llama_dir,
                                                                       tmp_path):
    pm = peft_llama(tiny_llama_dir, lora_config())
    pm.save_pretrained(tmp_path / "lora")
    full = import_peft(tiny_llama, tmp_path / "lora")
    density = full.delta.nnz / tiny_llama.numel / 4
    part = import_peft(tiny_llama, tmp_path / "lora", density=density)
    assert part.delta.nnz == round(density * tiny_llama.numel)
    assert 0.25 < part.kept_energy < 1.0  # the top quarter of entries hold over a quarter
    kept = min(float(t.val.abs().min()) for t in part.delta.tensors.values())
    dropped = {n: set(t.idx.tolist()) for n, t in part.delta.tensors.items()}
    for n, t in full.delta.tensors.items():  # every dropped entry is no larger than a kept one
        out = [abs(v) for i, v in zip(t.idx.tolist(), t.val.tolist(), strict=True)
               if i not in dropped.get(n, set())]
        assert max(out, default=0.0) <= kept + 1e-12


def test_seq_cls_adapter_brings_its_classifier_as_the_head(tiny_bert, tiny_bert_dir, tmp_path):
    from transformers import BertForSequenceClassification

    from taskdelta.server.inference import classify
    from taskdelta.server.jobs import ClassifyJob

    torch.manual_seed(2)
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3)
    pm = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=4,
                                                    target_modules=["query", "value"],
                                                    init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "cls")
    delta = import_peft(tiny_bert, tmp_path / "cls", labels=["a", "b", "c"]).delta
    validate(delta, tiny_bert)
    assert delta.meta.kind == "classify" and set(delta.heads) == {"classifier.weight",
                                                                  "classifier.bias"}
    merged, prepared = merged_copy(frozen_copy(tiny_bert), delta)
    texts = ("a fine film", "rain again")
    got = classify(prepared.head, merged.tokenizer, prepared.labels, [ClassifyJob(texts)])[0]
    enc = merged.tokenizer(list(texts), padding=True, return_tensors="pt")
    with torch.no_grad():
        want = pm(**enc).logits.softmax(-1)
    for row, w in zip(got, want.tolist(), strict=True):
        assert [row["scores"][k] for k in ("a", "b", "c")] == pytest.approx(w, abs=1e-5)


def test_tied_saved_module_is_refused(tiny_llama, tiny_llama_dir, tmp_path):
    """lm_head is tied to the embedding in this base: a delta cannot change one alone."""
    pm = peft_llama(tiny_llama_dir, lora_config(modules_to_save=["lm_head"]))
    pm.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="tied"):
        import_peft(tiny_llama, tmp_path / "lora")


def test_not_an_adapter_folder_says_so(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="not a PEFT adapter folder"):
        import_peft(tiny_llama, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        import_peft(tiny_llama, tmp_path)


def test_export_is_a_folder_from_pretrained_loads(tiny_llama, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    pm = peft_llama(tiny_llama_dir, shira_config())
    pm.save_pretrained(tmp_path / "shira")
    delta = import_peft(tiny_llama, tmp_path / "shira").delta
    export_merged(frozen_copy(tiny_llama), delta, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.allclose(logits(loaded), logits(pm), atol=1e-5)
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
