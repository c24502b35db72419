"""bench/decode.py end to end on a tiny random Llama: the real server starts, streams tokens to
every client level and scenario, and the side-by-side table has one row for each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def chatty_llama(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A tiny Llama that keeps talking: an untied LM head (a tied one echoes the prompt's last
    token, [SEP] with this tokenizer, which decodes to no text) and an EOS id it never picks."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=101, eos_token_id=1)
    cfg.architectures = ["LlamaForCausalLM"]
    out = tmp_path_factory.mktemp("chatty-llama")
    LlamaForCausalLM(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def test_quick_run_prints_a_row_per_scenario_and_level(chatty_llama: Path, tmp_path: Path) -> None:
    """Every (scenario, C) row is in the printed table and the JSON, with streamed tokens counted
    and a reference to compare with; the embedding client beside the load got answers."""
    out = tmp_path / "decode.json"
    argv = [sys.executable, str(ROOT / "bench" / "decode.py"), "--base", str(chatty_llama),
            "--quick", "--clients", "1,4", "--classify-clients", "4", "--with-classify",
            "--duration", "2", "--warmup", "0.5", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a bound, not a timing claim: the run takes ~30 s on 2 busy cores
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    # the first table is the throughput table (a goals table follows it after a blank line)
    first = run.stdout[run.stdout.index("\n| "):].split("\n\n")[0]
    table = [line for line in first.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[:2] for line in table[2:]] == [
        ["| base", "1"], ["| base", "4"], ["| task", "1"], ["| task", "4"], ["| base+embed", "4"]]
    rows = json.loads(out.read_text())["rows"]
    assert all(r["tokens_per_s"] > 0 and r["reference_tok_s"] > 0 and r["errors"] == 0 for r in rows)
    assert rows[-1]["embed"]["answered"] > 0
