"""The peer for bench/decode.py: PEFT's mixed-adapter batch, in this process, same prompts.

smollm2 with LoRA rank 8 on every linear (q, k, v, o, gate, up, down), N adapters with random
non-zero B (`init_lora_weights=False`, so each changes the outputs); one greedy
`generate(..., adapter_names=[a0 .. aN-1])` batch of N rows against the same PeftModel's base
batch (`adapter_names` all "__base__"), exactly `tokens` new tokens a row.
"""

from __future__ import annotations

import copy
import time

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_model(model: torch.nn.Module, adapters: int):
    """A copy of `model` with `adapters` LoRA adapters a0.. (the original stays untouched)."""
    from peft import LoraConfig, get_peft_model

    config = lambda: LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,  # noqa: E731
                                init_lora_weights=False)
    torch.manual_seed(0)
    pm = get_peft_model(copy.deepcopy(model), config(), adapter_name="a0")
    for i in range(1, adapters):
        pm.add_adapter(f"a{i}", config())
    return pm.eval()


@torch.inference_mode()
def batch_seconds(pm, tok, prompts: list[str], names: list[str], tokens: int) -> float:
    enc = tok(prompts, return_tensors="pt", padding=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    started = time.perf_counter()
    out = pm.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                      max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                      pad_token_id=pad, adapter_names=names)
    seconds = time.perf_counter() - started
    assert out.shape[1] - enc["input_ids"].shape[1] == tokens
    return seconds


def peer(model: torch.nn.Module, tok, prompts: list[str], rows: int, tokens: int) -> dict:
    """tokens/s of the mixed-adapter batch (row i: adapter i) and of the base batch; mixed/base
    (base measured before and after, mean)."""
    pm = peft_model(model, rows)
    tok.padding_side = "left"
    batch = prompts[:rows]
    batch_seconds(pm, tok, batch[:2], ["__base__"] * 2, 2)  # one-off setup, not measured
    base_s = [batch_seconds(pm, tok, batch, ["__base__"] * rows, tokens)]
    mixed_s = batch_seconds(pm, tok, batch, [f"a{i}" for i in range(rows)], tokens)
    base_s.append(batch_seconds(pm, tok, batch, ["__base__"] * rows, tokens))
    base_tok = rows * tokens / (sum(base_s) / 2)
    mixed_tok = rows * tokens / mixed_s
    res = {"rows": rows, "adapters": rows, "base_tok_s": base_tok, "mixed_tok_s": mixed_tok,
           "ratio": mixed_tok / base_tok, "base_s": base_s, "mixed_s": mixed_s}
    print(f"  PEFT {rows} rows x {rows} adapters: mixed {mixed_tok:.1f} tok/s, base "
          f"{base_tok:.1f} tok/s, ratio {res['ratio']:.2f}", flush=True)
    del pm
    return res
