"""The README's OpenAI, LoRAX and PEFT examples (issue 15), run as written against a live server
(a tiny random-weight Llama stands in for smollm2-135m; the key `your-key` is a real tenant's)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from support import frozen_copy

from taskdelta.server.app import create_app
from taskdelta.server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
KEY = "your-key"


def readme_block(name: str) -> str:
    """The fenced block right after `<!-- readme-test: NAME -->` in README.md."""
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- readme-test: {name} -->\n```\w+\n(.*?)```", text, re.S)
    assert m, f"README has no block marked {name!r}"
    return m.group(1)


@pytest.fixture
def server(tiny_llama, redis_proc, tmp_path, live_server):
    """The tiny Llama without an end-of-sequence token: random weights would often end an answer
    at once, and the examples print what they get."""
    base = frozen_copy(tiny_llama)
    base.model.config.eos_token_id = None
    base.model.generation_config.eos_token_id = None
    settings = Settings(redis_url=redis_proc.url, data_dir=tmp_path / "data",
                        api_keys=f"readme:{KEY}")
    with live_server(create_app(settings, base=base)) as srv:
        yield srv


def run_python(code: str, srv, cwd: Path) -> list[str]:
    code = code.replace("http://127.0.0.1:8000", srv.url)
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_openai_example(server, tmp_path):
    lines = run_python(readme_block("openai"), server, tmp_path)
    assert lines[0] == "['base']"  # this tenant has no task yet
    scored = lines[2:-1]  # one line per scored token: text, logprob, two alternatives
    assert scored and all(re.fullmatch(r"'.*' -?\d.* \[.*, .*\]", ln) for ln in scored), lines


def test_lorax_example(server, tmp_path):
    assert len(run_python(readme_block("lorax"), server, tmp_path)) == 2


def test_peft_example(server, tiny_llama_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    peft.get_peft_model(model, peft.ShiraConfig(r=2, target_modules=["q_proj"], init_weights=False)
                        ).save_pretrained(tmp_path / "my-shira-adapter")
    script = readme_block("peft").replace("smollm2-135m", str(tiny_llama_dir))
    env = os.environ | {"PATH": f"{BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
                        "TASKDELTA_BASE_URL": server.url, "TASKDELTA_API_KEY": KEY}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "100.00% of the adapter's update" in done.stdout
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}) as c:
        assert c.get("/v1/models/my-task").json()["parent"] == str(tiny_llama_dir)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "my-task-merged") is not None
