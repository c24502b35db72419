"""The `taskdelta` command, run as a subprocess against a live server and a real redis-server
(issue 4: "integration tests drive a live server through the CLI").

What the command prints is compared with what the SDK gets for the same request, and with the
offline model where the SDK is not enough to tell.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import (
    KEYS,
    LONG,
    N_TOKENS,
    PAIRS,
    PROMPT,
    TEXTS,
    assert_one_line_error,
    generate_offline,
    sdk,
    slow_decode_step,
)

from taskdelta.client.types import (
    ClassifyResponse,
    Deleted,
    EmbedResponse,
    GenerateResponse,
    Ready,
    StreamChunk,
    TaskInfo,
    TaskList,
)
from taskdelta.deltas import dumps, random_delta, save

EXE = Path(sys.executable).with_name("taskdelta")
# no TASKDELTA_* from the caller's shell; wide, plain output so tables do not wrap
ENV = {k: v for k, v in os.environ.items()
       if not k.startswith("TASKDELTA_") and k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
ENV |= {"NO_COLOR": "1", "COLUMNS": "200", "TERM": "dumb"}
RID = r"\(request id [0-9a-f]{32}\)"


class Cli:
    """Runs `taskdelta --url URL --api-key KEY ...` as a separate process."""

    def __init__(self, url: str, key: str | None = KEYS["acme"]) -> None:
        self.url, self.key = url, key

    def __call__(self, *args: str, env: dict[str, str] | None = None,
                 flags: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(EXE)]
        if flags:
            cmd += ["--url", self.url] + (["--api-key", self.key] if self.key else [])
        return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=120,
                              env=ENV | (env or {}))

    def ok(self, *args: str, **kw) -> subprocess.CompletedProcess[str]:
        result = self(*args, **kw)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        return result


def table_cells(line: str) -> list[str]:
    """The cells of one row of a rich table (empty for border lines)."""
    return [c.strip() for c in line.strip().strip("│").split("│")] if "│" in line else []


@pytest.fixture(scope="module", autouse=True)
def _installed() -> None:
    assert EXE.exists(), f"{EXE} is missing: install the package (`pip install -e .`)"


# --- tasks ---------------------------------------------------------------------------------------

def test_tasks_upload_list_show_delete(tiny_bert, serve, tmp_path):
    d = random_delta(tiny_bert, 0.02, seed=51, kind="classify", labels=["neg", "pos"], scale=0.3)
    file = save(d, tmp_path / "sst2.delta.safetensors")
    with serve(tiny_bert) as srv, sdk(srv) as client:
        cli = Cli(srv.url)
        out = cli.ok("tasks", "upload", "sst2", str(file)).stdout
        assert out.strip() == (f"uploaded sst2: version 1, classify, {d.nnz:,} entries (density "
                               f"{d.nnz / tiny_bert.numel:.4%}), {file.stat().st_size:,} bytes")
        up = TaskInfo.model_validate_json(cli.ok("tasks", "upload", "sst2", str(file),
                                                 "--if-match", "1", "--json").stdout)
        assert up.version == 2 and up.sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
        assert up == client.tasks.get("sst2")
        # env instead of flags reaches the same tenant
        by_env = Cli(srv.url).ok("tasks", "upload", "imdb", str(file), flags=False,
                                 env={"TASKDELTA_BASE_URL": srv.url,
                                      "TASKDELTA_API_KEY": KEYS["acme"]})
        assert by_env.stdout.startswith("uploaded imdb: version 1, classify")

        listing = TaskList.model_validate_json(cli.ok("tasks", "list", "--json").stdout)
        assert listing == client.tasks.list()
        assert [t.name for t in listing.tasks] == ["imdb", "sst2"]
        table = cli.ok("tasks", "list").stdout
        rows = {cells[0]: cells for cells in map(table_cells, table.splitlines()) if cells}
        assert rows["sst2"][1:4] == ["classify", "2", f"{d.nnz:,}"]
        assert rows["imdb"][1:3] == ["classify", "1"]
        assert set(rows) == {"imdb", "sst2"}

        shown = cli.ok("tasks", "show", "sst2").stdout
        fields = dict(re.match(r"(.+?):\s+(.*)$", line).groups() for line in shown.splitlines())
        assert fields["labels"] == "neg, pos" and fields["version"] == "2"
        assert fields["sha256"] == up.sha256 and fields["base"] == tiny_bert.fingerprint
        assert fields["provenance.seed"] == "51"
        assert TaskInfo.model_validate_json(cli.ok("tasks", "show", "sst2", "--json").stdout) == up

        stale = cli("tasks", "upload", "sst2", str(file), "--if-match", "1")
        assert_one_line_error(stale, r"^error: 409 conflict: ", RID, regex=True)
        assert client.tasks.get("sst2").version == 2

        assert cli.ok("tasks", "delete", "sst2", "--if-match", "2").stdout == "deleted sst2\n"
        assert Deleted.model_validate_json(cli.ok("tasks", "delete", "imdb", "--json").stdout) == (
            Deleted(name="imdb", deleted=True))
        assert client.tasks.list().tasks == []
        gone = cli("tasks", "show", "sst2")
        assert_one_line_error(gone, r"^error: 404 not_found: .*'sst2'", RID, regex=True)
        assert gone.stdout == ""


def test_upload_errors_are_one_line(tiny_bert, tiny_llama, serve, tmp_path):
    data = dumps(random_delta(tiny_bert, 0.01, seed=52, kind="embed"))
    half = tmp_path / "half.safetensors"
    half.write_bytes(data[: len(data) // 2])
    foreign = save(random_delta(tiny_llama, 0.002, seed=53), tmp_path / "llama.safetensors")
    with serve(tiny_bert, max_delta_bytes=len(data) - 1) as srv, sdk(srv) as client:
        cli = Cli(srv.url)
        assert_one_line_error(cli("tasks", "upload", "e", str(half)),
                              "422 delta_rejected: .*truncated", RID, regex=True)
        assert_one_line_error(cli("tasks", "upload", "e", str(foreign)),
                              "422 delta_rejected: .*" + tiny_llama.fingerprint, regex=True)
        whole = tmp_path / "whole.safetensors"
        whole.write_bytes(data)
        assert_one_line_error(cli("tasks", "upload", "e", str(whole)),
                              f"413 payload_too_large: .*limit of {len(data) - 1} bytes", regex=True)
        missing = cli("tasks", "upload", "e", str(tmp_path / "nope.safetensors"))
        assert missing.returncode == 2 and "Traceback" not in missing.stderr
        assert client.tasks.list().tasks == []


# --- inference -----------------------------------------------------------------------------------

def test_classify_and_embed(tiny_bert, serve):
    cls = random_delta(tiny_bert, 0.02, seed=54, kind="classify", labels=["neg", "pos"], scale=0.3)
    emb = random_delta(tiny_bert, 0.02, seed=55, kind="embed", scale=0.3)
    with serve(tiny_bert) as srv, sdk(srv) as client:
        client.tasks.upload("cls", cls)
        client.tasks.upload("emb", emb)
        cli = Cli(srv.url)

        want = client.classify("cls", TEXTS)
        got = ClassifyResponse.model_validate_json(cli.ok("classify", "cls", *TEXTS, "--json").stdout)
        assert got == want
        table = cli.ok("classify", "cls", *TEXTS).stdout
        for text, r in zip(TEXTS, want.results, strict=True):
            row = next(cells for cells in map(table_cells, table.splitlines()) if text in cells)
            assert row == [text, r.label, f"{r.scores[r.label]:.3f}"]

        flat = [t for pair in PAIRS for t in pair]
        pairs = ClassifyResponse.model_validate_json(
            cli.ok("classify", "cls", *flat, "--pair", "--json").stdout)
        assert pairs == client.classify("cls", PAIRS)
        odd = cli("classify", "cls", *flat[:3], "--pair")
        assert odd.returncode == 2 and "even number" in odd.stderr

        vectors = EmbedResponse.model_validate_json(cli.ok("embed", "emb", *TEXTS, "--json").stdout)
        assert vectors == client.embed("emb", TEXTS)
        raw = EmbedResponse.model_validate_json(
            cli.ok("embed", "emb", *TEXTS, "--no-normalize", "--json").stdout)
        assert raw == client.embed("emb", TEXTS, normalize=False) and raw != vectors
        shown = cli.ok("embed", "emb", *TEXTS[:2]).stdout.splitlines()
        assert shown[0] == "2 embeddings, dim 32"
        for line, vec in zip(shown[1:], vectors.embeddings[:2], strict=True):
            assert ", ".join(f"{v:+.4f}" for v in vec[:6]) + ", ..." in line
        base = EmbedResponse.model_validate_json(cli.ok("embed", "base", "x", "--json").stdout)
        assert base == client.embed("base", "x") and base.version is None

        assert_one_line_error(cli("classify", "emb", "x"), "400 bad_request: .*'embed' task", RID, regex=True)


def test_generate_streams_the_greedy_text(tiny_llama, serve):
    gen = random_delta(tiny_llama, 0.05, seed=4, kind="generate", scale=0.5)
    want = generate_offline(tiny_llama, gen, PROMPT)
    assert want.text
    n = str(N_TOKENS)
    with serve(tiny_llama) as srv, sdk(srv) as client:
        client.tasks.upload("gen", gen)
        cli = Cli(srv.url)
        streamed = cli.ok("generate", "gen", PROMPT, "--max-new-tokens", n)
        assert streamed.stdout == want.text + "\n"
        assert streamed.stderr.strip() == f"[{want.finish_reason}, {want.completion_tokens} tokens]"

        lines = cli.ok("generate", "gen", PROMPT, "--max-new-tokens", n, "--json").stdout
        chunks = [StreamChunk.model_validate_json(line) for line in lines.splitlines()]
        assert len(chunks) > 2 and "".join(c.text for c in chunks) == want.text
        assert chunks[-1].finish_reason == want.finish_reason
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == want.completion_tokens

        whole = cli.ok("generate", "gen", PROMPT, "--max-new-tokens", n, "--no-stream", "--json")
        assert GenerateResponse.model_validate_json(whole.stdout) == client.generate(
            "gen", PROMPT, max_new_tokens=N_TOKENS)
        plain = cli.ok("generate", "gen", PROMPT, "--max-new-tokens", n, "--no-stream")
        assert plain.stdout == want.text + "\n"

        args = ("--max-new-tokens", n, "--temperature", "0.9", "--seed", "3", "--no-stream")
        sampled = cli.ok("generate", "gen", PROMPT, *args).stdout
        assert sampled == client.generate("gen", PROMPT, max_new_tokens=N_TOKENS, temperature=0.9,
                                          seed=3).text + "\n"
        assert sampled != want.text + "\n"  # the options did reach the server

        unknown = cli("generate", "nope", PROMPT)
        assert_one_line_error(unknown, r"^error: 404 not_found: .*'nope'", RID, regex=True)
        assert unknown.stdout == ""  # failed before the stream started: no stray newline


def test_generate_error_mid_stream_ends_the_text_then_one_line(tiny_llama, serve):
    gen = random_delta(tiny_llama, 0.05, seed=4, kind="generate", scale=0.5)
    head = generate_offline(tiny_llama, gen, PROMPT).text
    # the stream starts, then a decode step outlasts the deadline
    with serve(tiny_llama, request_timeout_s=0.5) as srv, sdk(srv) as client, \
            slow_decode_step(tiny_llama, after_tokens=3, hold_s=1.0):
        client.tasks.upload("gen", gen)
        broken = Cli(srv.url)("generate", "gen", PROMPT, "--max-new-tokens", str(LONG))
    assert_one_line_error(broken, r"^error: 504 timeout: .*did not finish within 0.5 s", RID, regex=True)
    assert broken.stdout.endswith("\n")  # the line is ended, then the error follows
    text = broken.stdout[:-1]
    assert text.startswith(head) or head.startswith(text)


# --- service and connection errors ---------------------------------------------------------------

def test_health_auth_and_connection_errors(tiny_bert, serve, redis_proc):
    with serve(tiny_bert) as srv, sdk(srv) as client:
        cli = Cli(srv.url)
        ready = cli.ok("health").stdout.strip()
        assert ready == f"ready: base {tiny_bert.name}, model loaded, redis ok"
        assert Ready.model_validate_json(cli.ok("health", "--json").stdout) == client.ready()
        assert Cli(srv.url, key=None).ok("health").stdout.startswith("ready:")  # no key needed

        assert_one_line_error(Cli(srv.url, key="wrong")("tasks", "list"),
                              r"^error: 401 unauthorized: invalid API key", RID, regex=True)
        assert_one_line_error(Cli(srv.url, key=None)("tasks", "list"), "401 .*missing API key", regex=True)

        redis_proc.stop()
        down = cli("health")
        assert down.returncode == 1 and "Traceback" not in down.stderr
        assert down.stdout.strip() == f"NOT ready: base {tiny_bert.name}, model loaded, redis down"
        url = srv.url
    # the server is gone: one line naming where it tried (after the client's retries)
    assert_one_line_error(Cli(url)("tasks", "list"), f"^error: cannot reach {re.escape(url)}", regex=True)
