"""Issue 15's "done when" for PEFT users: a real PEFT-made SHiRA or LoRA adapter goes through
`taskdelta delta import-peft`, is uploaded, and the server's outputs equal PEFT's own model's:
the same greedy tokens, each with the same log-probability to 1e-5."""

from __future__ import annotations

import httpx
import pytest
import torch
from support import auth
from typer.testing import CliRunner

from taskdelta.deltas.cli import app as delta_app

peft = pytest.importorskip("peft")

PROMPT = "hello there"
N_TOKENS = 10


def peft_model(tiny_llama_dir, config):
    from transformers import LlamaForCausalLM

    torch.manual_seed(3)
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return peft.get_peft_model(model, config).eval()


@torch.no_grad()
def peft_greedy(model, tokenizer) -> tuple[str, list[float]]:
    """PEFT's own model, unmerged: greedy tokens and each one's log-probability."""
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]  # [1, prompt]
    chosen, logprobs = [], []
    for _ in range(N_TOKENS):
        logp = model(input_ids=ids).logits[0, -1].float().log_softmax(-1)
        nxt = int(logp.argmax())
        if nxt == tokenizer.sep_token_id:  # the tiny model's EOS (102)
            break
        chosen.append(nxt)
        logprobs.append(float(logp[nxt]))
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tokenizer.decode(chosen, skip_special_tokens=True), logprobs


@pytest.mark.parametrize("make_config", [
    lambda: peft.ShiraConfig(r=2, target_modules=["q_proj", "v_proj", "up_proj"],
                             init_weights=False),
    lambda: peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"],
                            init_lora_weights=False),
], ids=["shira", "lora"])
def test_imported_adapter_serves_what_peft_computes(make_config, tiny_llama, tiny_llama_dir, serve,
                                                    tmp_path):
    pm = peft_model(tiny_llama_dir, make_config())
    pm.save_pretrained(tmp_path / "adapter")
    want_text, want_logprobs = peft_greedy(pm, tiny_llama.tokenizer)
    assert want_logprobs  # the comparison has tokens to compare
    result = CliRunner().invoke(delta_app, ["import-peft", str(tmp_path / "adapter"), "--base",
                                            str(tiny_llama_dir), "-o", str(tmp_path / "t.safetensors")])
    assert result.exit_code == 0, result.output
    assert "100.00% of the adapter's update" in result.output
    with serve(tiny_llama) as srv, httpx.Client(base_url=srv.url, headers=auth("acme"),
                                                timeout=60) as c:
        put = c.put("/v1/tasks/imported", content=(tmp_path / "t.safetensors").read_bytes())
        assert put.status_code == 201, put.text
        r = c.post("/v1/completions", json={"model": "imported", "prompt": PROMPT, "temperature": 0,
                                            "max_tokens": N_TOKENS, "logprobs": 0})
        assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == want_text
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(want_logprobs, abs=1e-5)
