"""Shared fixtures: tiny random-weight model folders and a real redis-server on a free port."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One torch thread, here and in every server process a test starts (they inherit the environment):
# on 2 cores shared by the test process, in-process servers' workers and child processes, torch's
# spinning OpenMP threads oversubscribe the cores, and on a busy machine the tiny-model tests ran
# 3-6x slower with 2 threads than with 1 (tests/deltas/test_swap.py + test_train.py: 47-83 s vs
# 14-16 s). Tests that need real threads ask for them (support.torch_threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import support  # noqa: E402  (imports torch: after OMP_NUM_THREADS is set)
import torch  # noqa: E402

from taskdelta.server.embedded import free_port, wait_for_ping  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

@pytest.fixture(scope="session")
def task_data() -> Path:
    if support.DATA is None:
        pytest.skip("no shared task data: set TASKDELTA_SHARED_DATA to the shared/data folder")
    return support.DATA


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
            [support.redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
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
def real_base():
    """`real_base(name, dtype="float32")`: a packaged default base, loaded once per session and
    shared (a smollm2 load costs seconds). Tests that swap into it must restore it: the ones that
    use it check bit-identity after themselves anyway."""
    from taskdelta.deltas import load_base

    loaded: dict[tuple[str, str], object] = {}

    def get(name: str, dtype: str = "float32"):
        if (name, dtype) not in loaded:
            loaded[name, dtype] = load_base(name, device="cpu", dtype=dtype)
        return loaded[name, dtype]
    return get


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
def varied_llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A tiny Llama whose greedy outputs vary (larger initial weights than `tiny_llama_dir`'s,
    whose random model answers EOS at once): for tests that compare generated text."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=101, eos_token_id=102,
                      initializer_range=0.2)
    cfg.architectures = ["LlamaForCausalLM"]
    return _save_tiny(LlamaForCausalLM(cfg), tokenizer_dir, tmp_path_factory.mktemp("varied-llama"))


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


@pytest.fixture
def serve(redis_proc, tmp_path, live_server):
    """`with serve(base, **settings) as srv:` a live server (support.settings_for) over this
    test's redis-server."""
    def start(base, **over):
        from taskdelta.server.app import create_app

        return live_server(create_app(support.settings_for(redis_proc.url, tmp_path, **over), base=base))
    return start
