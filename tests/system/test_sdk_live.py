"""The SDK against a live server and a real redis-server (issue 4: "integration tests drive a
live server through the SDK"), `Client` and `AsyncClient` alike.

Every answer is checked against something the SDK did not produce: the offline merged model
(computed before the server starts, so no swap is in flight), the same request made with raw
httpx, or the bytes that were uploaded.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from support import (
    KEYS,
    LONG,
    N_TOKENS,
    PAIRS,
    PROMPT,
    TEXTS,
    HeldWorker,
    auth,
    frozen_copy,
    generate_offline,
    merged_copy,
    sdk,
    slow_decode_step,
)

from taskdelta.client import (
    APIStatusError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ConflictError,
    DeltaRejectedError,
    GatewayTimeoutError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    UnprocessableEntityError,
)
from taskdelta.client.types import (
    ClassifyResponse,
    Ready,
    StreamChunk,
    TaskInfo,
    TaskList,
)
from taskdelta.deltas import dumps, random_delta, save
from taskdelta.server.inference import classify, embed, render_chat
from taskdelta.server.jobs import ClassifyJob, EmbedJob

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
HEAVY = ["word " * 200] * 32  # one embed request that keeps the single worker busy a while


# --- offline references --------------------------------------------------------------------------

def classify_offline(base, delta, texts) -> list[dict]:
    merged, prepared = merged_copy(frozen_copy(base), delta)
    return classify(prepared.head, merged.tokenizer, prepared.labels, [ClassifyJob(tuple(texts))])[0]


def embed_offline(base, delta, texts, normalize: bool) -> list[list[float]]:
    model = merged_copy(frozen_copy(base), delta)[0] if delta is not None else frozen_copy(base)
    return embed(model.backbone, model.tokenizer, [EmbedJob(tuple(texts), normalize)])[0]


def assert_classified(got: ClassifyResponse, want: list[dict]) -> None:
    assert [r.label for r in got.results] == [w["label"] for w in want]
    for r, w in zip(got.results, want, strict=True):
        assert r.scores == pytest.approx(w["scores"], abs=1e-5)


def assert_vectors(got: list[list[float]], want: list[list[float]]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=1e-5)


def norm(v: list[float]) -> float:
    return sum(x * x for x in v) ** 0.5


def assert_request_id(exc: APIStatusError, sent: str | None = None) -> None:
    """The id the SDK reports is the one the server put in the header and in the body."""
    assert exc.response is not None
    header = exc.response.headers["x-request-id"]
    assert exc.request_id == header == exc.body["error"]["request_id"]
    if sent is not None:
        assert header == sent
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", header)


def uploads_counted(metrics_text: str, outcome: str) -> float:
    m = re.search(rf'^taskdelta_uploads_total{{outcome="{outcome}"}} (\S+)$', metrics_text, re.M)
    return float(m.group(1)) if m else 0.0


def answers_counted(metrics_text: str, method: str, route: str, status: int) -> float:
    """How many requests the server answered on `route` with `status` (its latency histogram)."""
    labels = f'method="{method}",route="{route}",status="{status}"'
    m = re.search(rf"^taskdelta_http_request_seconds_count{{{re.escape(labels)}}} (\S+)$",
                  metrics_text, re.M)
    return float(m.group(1)) if m else 0.0


def metric_families(text: str) -> set[str]:
    return {line.split()[2] for line in text.splitlines() if line.startswith("# HELP ")}


# --- tasks: upload, list, get, delete ------------------------------------------------------------

def test_tasks_lifecycle_sync(tiny_bert, serve, tmp_path):
    d = random_delta(tiny_bert, 0.02, seed=11, kind="classify", labels=["neg", "pos"], scale=0.3)
    path = save(d, tmp_path / "cls.safetensors")
    data = dumps(d)
    with serve(tiny_bert) as srv, sdk(srv) as client, httpx.Client(
            base_url=srv.url, headers=auth("acme"), timeout=30) as raw:
        sent: list[tuple[int, int]] = []
        by_path = client.tasks.upload("by-path", path, progress=lambda s, t: sent.append((s, t)))
        by_bytes = client.tasks.upload("by-bytes", data)
        by_object = client.tasks.upload("by-object", d)
        size = path.stat().st_size
        assert sent[-1] == (size, size) and sent[0] == (0, size)
        assert by_path.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert (by_path.bytes, by_bytes.bytes) == (size, len(data))
        assert by_bytes.sha256 == hashlib.sha256(data).hexdigest()
        for info in (by_path, by_bytes, by_object):
            assert (info.version, info.kind, info.labels, info.nnz) == (1, "classify", ["neg", "pos"],
                                                                       d.nnz)
            assert info.base_fingerprint == tiny_bert.fingerprint
            assert info.provenance["seed"] == 11 and info.provenance["method"] == "random"
        # the object went up as a real delta file: the server read the same tensors
        assert by_object.density == pytest.approx(by_bytes.density)

        listing = client.tasks.list()
        assert listing == TaskList.model_validate(raw.get("/v1/tasks").json())
        assert sorted(t.name for t in listing.tasks) == ["by-bytes", "by-object", "by-path"]
        got = client.tasks.get("by-bytes")
        assert got == TaskInfo.model_validate(raw.get("/v1/tasks/by-bytes").json()) == by_bytes

        # If-Match: the named version replaces, a stale one is a conflict that changes nothing
        v2 = client.tasks.upload("by-bytes", data, if_match=1)
        assert v2.version == 2
        with pytest.raises(ConflictError) as info:
            client.tasks.upload("by-bytes", path, if_match=1)
        assert info.value.status_code == 409 and info.value.type == "conflict"
        assert_request_id(info.value)
        assert client.tasks.get("by-bytes").version == 2
        with pytest.raises(ConflictError):
            client.tasks.delete("by-bytes", if_match=1)

        deleted = client.tasks.delete("by-bytes", if_match=2)
        assert (deleted.name, deleted.deleted) == ("by-bytes", True)
        with pytest.raises(NotFoundError) as info:
            client.tasks.get("by-bytes")
        assert info.value.type == "not_found" and "by-bytes" in info.value.message
        with pytest.raises(NotFoundError):
            client.tasks.delete("by-bytes")
        with pytest.raises(NotFoundError):
            client.classify("by-bytes", "x")
        assert [t.name for t in client.tasks.list().tasks] == ["by-object", "by-path"]


async def test_tasks_lifecycle_async(tiny_bert, serve, tmp_path):
    d = random_delta(tiny_bert, 0.02, seed=12, kind="embed", scale=0.3)
    path = save(d, tmp_path / "emb.safetensors")
    data = dumps(d)
    with serve(tiny_bert) as srv:
        async with sdk(srv, cls=AsyncClient) as client, httpx.AsyncClient(
                base_url=srv.url, headers=auth("acme"), timeout=30) as raw:
            sent: list[tuple[int, int]] = []
            infos = await asyncio.gather(
                client.tasks.upload("by-path", path, progress=lambda s, t: sent.append((s, t))),
                client.tasks.upload("by-bytes", data), client.tasks.upload("by-object", d))
            assert sent[-1] == (path.stat().st_size,) * 2
            assert infos[0].sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
            assert infos[1].sha256 == hashlib.sha256(data).hexdigest()
            for info in infos:
                assert (info.version, info.kind, info.labels, info.nnz) == (1, "embed", [], d.nnz)

            listing = await client.tasks.list()
            assert listing == TaskList.model_validate((await raw.get("/v1/tasks")).json())
            assert sorted(t.name for t in listing.tasks) == ["by-bytes", "by-object", "by-path"]
            got = await client.tasks.get("by-path")
            assert got == TaskInfo.model_validate((await raw.get("/v1/tasks/by-path")).json())

            assert (await client.tasks.upload("by-path", d, if_match=1)).version == 2
            with pytest.raises(ConflictError) as info:
                await client.tasks.upload("by-path", data, if_match=1)
            assert_request_id(info.value)
            with pytest.raises(ConflictError):
                await client.tasks.delete("by-path", if_match=1)
            assert (await client.tasks.get("by-path")).version == 2

            assert (await client.tasks.delete("by-path", if_match=2)).deleted is True
            with pytest.raises(NotFoundError):
                await client.tasks.get("by-path")
            with pytest.raises(NotFoundError):
                await client.tasks.delete("by-path")
            assert [t.name for t in (await client.tasks.list()).tasks] == ["by-bytes", "by-object"]


# --- inference on an encoder base ----------------------------------------------------------------

def test_classify_and_embed_match_the_offline_model_sync(tiny_bert, serve):
    cls = random_delta(tiny_bert, 0.02, seed=21, kind="classify", labels=["neg", "pos"], scale=0.3)
    emb = random_delta(tiny_bert, 0.02, seed=22, kind="embed", scale=0.3)
    want_single = classify_offline(tiny_bert, cls, TEXTS)
    want_pairs = classify_offline(tiny_bert, cls, PAIRS)
    want = {(name, n): embed_offline(tiny_bert, delta, TEXTS, n)
            for name, delta in (("emb", emb), ("base", None)) for n in (True, False)}
    with serve(tiny_bert) as srv, sdk(srv) as client:
        client.tasks.upload("cls", cls)
        client.tasks.upload("emb", emb)
        single = client.classify("cls", TEXTS)
        assert (single.task, single.version) == ("cls", 1)
        assert_classified(single, want_single)
        assert_classified(client.classify("cls", PAIRS), want_pairs)
        assert_classified(client.classify("cls", TEXTS[0]), want_single[:1])  # a bare string

        for (name, normalize), vectors in want.items():
            got = client.embed(name, TEXTS, normalize=normalize)
            assert (got.task, got.dim, got.version) == (name, 32, 1 if name == "emb" else None)
            assert_vectors(got.embeddings, vectors)
            norms = [norm(v) for v in got.embeddings]
            if normalize:
                assert norms == pytest.approx([1.0] * len(TEXTS), abs=1e-5)
            else:
                assert all(abs(n - 1.0) > 1e-3 for n in norms), norms
        # the task's delta changes the embedding: the comparison above is not base-vs-base
        assert norm([a - b for a, b in zip(want["emb", True][0], want["base", True][0],
                                           strict=True)]) > 1e-3


async def test_classify_and_embed_match_the_offline_model_async(tiny_bert, serve):
    cls = random_delta(tiny_bert, 0.02, seed=23, kind="classify", labels=["a", "b", "c"], scale=0.3)
    emb = random_delta(tiny_bert, 0.02, seed=24, kind="embed", scale=0.3)
    want_single = classify_offline(tiny_bert, cls, TEXTS)
    want_pairs = classify_offline(tiny_bert, cls, PAIRS)
    want_on = embed_offline(tiny_bert, emb, TEXTS, True)
    want_off = embed_offline(tiny_bert, emb, TEXTS, False)
    with serve(tiny_bert) as srv:
        async with sdk(srv, cls=AsyncClient) as client:
            await asyncio.gather(client.tasks.upload("cls", cls), client.tasks.upload("emb", emb))
            single, pairs, on, off = await asyncio.gather(
                client.classify("cls", TEXTS), client.classify("cls", PAIRS),
                client.embed("emb", TEXTS), client.embed("emb", TEXTS, normalize=False))
    assert_classified(single, want_single)
    assert_classified(pairs, want_pairs)
    assert set(single.results[0].scores) == {"a", "b", "c"}
    assert_vectors(on.embeddings, want_on)
    assert_vectors(off.embeddings, want_off)
    assert [norm(v) for v in on.embeddings] == pytest.approx([1.0] * 3, abs=1e-5)
    assert [norm(v) for v in off.embeddings] == pytest.approx([norm(v) for v in want_off], abs=1e-4)
    assert all(abs(norm(v) - 1.0) > 1e-3 for v in off.embeddings)


# --- generation on a causal base -----------------------------------------------------------------

def test_generate_and_stream_match_the_offline_model_sync(tiny_llama, serve):
    gen = random_delta(tiny_llama, 0.05, seed=4, kind="generate", scale=0.5)
    want = generate_offline(tiny_llama, gen, PROMPT)
    want_chat = generate_offline(tiny_llama, gen, render_chat(tiny_llama.tokenizer, MESSAGES))
    want_base = generate_offline(tiny_llama, None, PROMPT)
    want_sampled = generate_offline(tiny_llama, gen, PROMPT, temperature=0.9, top_p=0.9, seed=7)
    assert want.text and want.finish_reason == "length"  # enough text for the stream to split
    with serve(tiny_llama) as srv, sdk(srv) as client:
        client.tasks.upload("gen", gen)
        plain = client.generate("gen", PROMPT, max_new_tokens=N_TOKENS)
        assert (plain.task, plain.version, plain.text) == ("gen", 1, want.text)
        assert plain.finish_reason == want.finish_reason
        assert (plain.usage.prompt_tokens, plain.usage.completion_tokens) == (
            want.prompt_tokens, want.completion_tokens)
        assert plain.usage.total_tokens == want.prompt_tokens + want.completion_tokens

        chat = client.generate("gen", messages=MESSAGES, max_new_tokens=N_TOKENS)
        assert chat.text == want_chat.text
        assert client.generate("base", PROMPT, max_new_tokens=N_TOKENS).text == want_base.text
        sampled = client.generate("gen", PROMPT, max_new_tokens=N_TOKENS, temperature=0.9,
                                  top_p=0.9, seed=7)
        assert sampled.text == want_sampled.text
        assert sampled.text != want.text  # sampling, not greedy decoding

        with client.generate_stream("gen", PROMPT, max_new_tokens=N_TOKENS) as stream:
            pieces = list(stream)
        assert len(pieces) > 1 and "".join(pieces) == plain.text == stream.text
        assert stream.finish_reason == plain.finish_reason and stream.usage == plain.usage
        assert stream.request_id and re.fullmatch(r"[0-9a-f]{32}", stream.request_id)

        with client.generate_stream("gen", messages=MESSAGES, max_new_tokens=N_TOKENS) as stream:
            chunks = list(stream.chunks())
        assert "".join(c.text for c in chunks) == chat.text
        assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
        assert chunks[-1] == StreamChunk(text="", finish_reason=chat.finish_reason,
                                         usage=chat.usage)


async def test_generate_and_stream_match_the_offline_model_async(tiny_llama, serve):
    gen = random_delta(tiny_llama, 0.05, seed=5, kind="generate", scale=0.5)
    want = generate_offline(tiny_llama, gen, PROMPT)
    want_chat = generate_offline(tiny_llama, gen, render_chat(tiny_llama.tokenizer, MESSAGES))
    assert want.text
    with serve(tiny_llama) as srv:
        async with sdk(srv, cls=AsyncClient) as client:
            await client.tasks.upload("gen", gen)
            plain, chat = await asyncio.gather(
                client.generate("gen", PROMPT, max_new_tokens=N_TOKENS),
                client.generate("gen", messages=MESSAGES, max_new_tokens=N_TOKENS))
            stream = await client.generate_stream("gen", PROMPT, max_new_tokens=N_TOKENS)
            async with stream:
                pieces = [p async for p in stream]
            chat_stream = await client.generate_stream("gen", messages=MESSAGES,
                                                       max_new_tokens=N_TOKENS)
            chunks = [c async for c in chat_stream.chunks()]
    assert (plain.text, plain.finish_reason) == (want.text, want.finish_reason)
    assert plain.usage.completion_tokens == want.completion_tokens
    assert chat.text == want_chat.text
    assert len(pieces) > 1 and "".join(pieces) == plain.text
    assert stream.finish_reason == plain.finish_reason and stream.usage == plain.usage
    assert "".join(c.text for c in chunks) == chat.text
    assert chunks[-1].finish_reason == chat.finish_reason and chunks[-1].usage == chat.usage


def test_an_error_after_the_stream_started_raises_while_iterating(tiny_llama, serve):
    """A deadline that passes mid-generation arrives as an `error` event after a 200; the SDK
    raises the error the status would have mapped to, with the stream's request id."""
    gen = random_delta(tiny_llama, 0.05, seed=4, kind="generate", scale=0.5)
    head = generate_offline(tiny_llama, gen, PROMPT).text
    # the stream starts, then a decode step outlasts the deadline
    with serve(tiny_llama, request_timeout_s=0.5) as srv, sdk(srv) as client, \
            slow_decode_step(tiny_llama, after_tokens=3, hold_s=1.0):
        client.tasks.upload("gen", gen)
        with pytest.raises(NotFoundError):  # before the stream: a plain status error
            client.generate_stream("nope", PROMPT)
        pieces: list[str] = []
        stream = client.generate_stream("gen", PROMPT, max_new_tokens=LONG)
        assert stream.response.status_code == 200
        with pytest.raises(GatewayTimeoutError) as info:
            pieces.extend(stream)
        assert (info.value.status_code, info.value.type) == (504, "timeout")
        assert "did not finish within 0.5 s" in info.value.message
        assert info.value.request_id == stream.request_id == stream.response.headers["x-request-id"]
        assert stream.finish_reason is None and stream.usage is None
        text = "".join(pieces)
        assert text.startswith(head) or head.startswith(text)

        async def in_async() -> tuple[str, GatewayTimeoutError]:
            async with sdk(srv, cls=AsyncClient) as ac:
                stream = await ac.generate_stream("gen", PROMPT, max_new_tokens=LONG)
                got: list[str] = []
                with pytest.raises(GatewayTimeoutError) as info:
                    async for piece in stream:
                        got.append(piece)
                assert info.value.request_id == stream.request_id
                return "".join(got), info.value

        text, exc = asyncio.run(in_async())
        assert text.startswith(head) or head.startswith(text)
        assert exc.type == "timeout" and re.fullmatch(r"[0-9a-f]{32}", exc.request_id)


def sse_data(response: httpx.Response) -> list[dict]:
    lines = [ln[6:] for ln in response.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def test_openai_routes_over_raw_http(tiny_llama, serve):
    """The SDK does not wrap /v1/chat/completions and /v1/completions: raw httpx, same model."""
    gen = random_delta(tiny_llama, 0.05, seed=4, kind="generate", scale=0.5)
    want = generate_offline(tiny_llama, gen, PROMPT)
    want_chat = generate_offline(tiny_llama, gen, render_chat(tiny_llama.tokenizer, MESSAGES))
    chat = {"model": "gen", "messages": MESSAGES, "max_tokens": N_TOKENS, "temperature": 0}
    with serve(tiny_llama) as srv, sdk(srv) as client, httpx.Client(
            base_url=srv.url, headers=auth("acme"), timeout=30) as raw:
        client.tasks.upload("gen", gen)
        r = raw.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion" and body["model"] == "gen"
        assert body["id"] == f"chatcmpl-{r.headers['x-request-id']}"  # as OpenAI names chat ids
        choice = body["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": want_chat.text}
        assert choice["finish_reason"] == want_chat.finish_reason
        assert body["usage"]["completion_tokens"] == want_chat.completion_tokens

        r = raw.post("/v1/completions", json={"model": "gen", "prompt": PROMPT,
                                              "max_tokens": N_TOKENS, "temperature": 0})
        assert r.status_code == 200 and r.json()["object"] == "text_completion"
        assert r.json()["choices"][0]["text"] == want.text

        streamed = chat | {"stream": True, "stream_options": {"include_usage": True}}
        with raw.stream("POST", "/v1/chat/completions", json=streamed) as s:
            events = sse_data(s)
        assert {e["object"] for e in events} == {"chat.completion.chunk"}
        choices = [e for e in events if e["choices"]]  # as OpenAI: usage comes in a last chunk
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in choices)
        assert text == want_chat.text
        assert choices[-1]["choices"][0]["finish_reason"] == want_chat.finish_reason
        assert events[-1]["usage"]["completion_tokens"] == want_chat.completion_tokens

        with raw.stream("POST", "/v1/completions", json={
                "model": "gen", "prompt": PROMPT, "max_tokens": N_TOKENS, "temperature": 0,
                "stream": True}) as s:
            events = sse_data(s)
        assert "".join(e["choices"][0]["text"] for e in events) == want.text
        # the SDK's own generate agrees with the OpenAI route
        assert client.generate("gen", messages=MESSAGES, max_new_tokens=N_TOKENS).text == text
        # an unknown model is a 404 in OpenAI's error shape (openai.NotFoundError)
        r = raw.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
        assert r.json()["error"]["code"] == "not_found"


# --- errors mapped from real answers -------------------------------------------------------------

def test_errors_from_the_server_sync(tiny_bert, tiny_llama, serve):
    good = random_delta(tiny_bert, 0.01, seed=31, kind="classify", labels=["x", "y"])
    foreign = random_delta(tiny_llama, 0.01, seed=32, kind="generate")
    with serve(tiny_bert) as srv, sdk(srv) as acme, sdk(srv, "beta") as beta:
        acme.tasks.upload("t", good)

        with Client(srv.url, api_key="wrong") as bad, pytest.raises(AuthenticationError) as info:
            bad.tasks.list()
        assert info.value.status_code == 401 and "invalid API key" in info.value.message
        assert_request_id(info.value)
        with Client(srv.url, api_key="") as anonymous, pytest.raises(AuthenticationError) as info:
            anonymous.classify("t", "x")
        assert "missing API key" in info.value.message

        # isolation: beta sees nothing of acme's task, and its own "t" is a different task
        for call in (lambda: beta.tasks.get("t"), lambda: beta.classify("t", "x"),
                     lambda: beta.tasks.delete("t")):
            with pytest.raises(NotFoundError) as info:
                call()
            assert info.value.status_code == 404 and "'t'" in info.value.message
        assert beta.tasks.list().tasks == []
        assert acme.tasks.get("t").version == 1

        with pytest.raises(BadRequestError) as info:
            acme.embed("t", "x")
        assert "'classify' task" in info.value.message and info.value.type == "bad_request"
        with pytest.raises(BadRequestError, match="cannot generate"):
            acme.generate("base", "x")
        with pytest.raises(BadRequestError, match="no classifier head"):
            acme.classify("base", "x")
        with pytest.raises(BadRequestError, match="cannot be replaced"):
            acme.tasks.upload("base", good)

        data = dumps(good)
        with pytest.raises(DeltaRejectedError) as info:
            acme.tasks.upload("t", data[: len(data) // 2])
        assert info.value.status_code == 422 and info.value.type == "delta_rejected"
        assert "truncated" in info.value.message
        assert_request_id(info.value)
        with pytest.raises(DeltaRejectedError) as info:
            acme.tasks.upload("t", foreign)
        assert tiny_llama.fingerprint in info.value.message  # names the base it was made for
        assert acme.tasks.get("t").version == 1  # the rejected uploads replaced nothing

        # a request the wire contract refuses is a 422 too, but not a rejected delta
        with pytest.raises(UnprocessableEntityError) as info:
            acme.classify("t", [])
        assert not isinstance(info.value, DeltaRejectedError)
        assert info.value.type == "invalid_request" and "texts" in info.value.message


async def test_errors_from_the_server_async_carry_the_request_id_sent(tiny_bert, serve):
    good = random_delta(tiny_bert, 0.01, seed=33, kind="embed")
    with serve(tiny_bert) as srv:
        async with sdk(srv, cls=AsyncClient) as acme:
            await acme.tasks.upload("t", good)
        # a request id chosen by the caller comes back on the error
        mine = httpx.AsyncClient(headers={"X-Request-ID": "trace-7f3a"}, timeout=30)
        async with AsyncClient(srv.url, api_key="wrong", http_client=mine) as bad:
            with pytest.raises(AuthenticationError) as info:
                await bad.tasks.get("t")
            assert_request_id(info.value, sent="trace-7f3a")
        async with AsyncClient(srv.url, api_key=KEYS["beta"], http_client=mine) as beta:
            with pytest.raises(NotFoundError) as info:
                await beta.embed("t", "x")
            assert_request_id(info.value, sent="trace-7f3a")
            assert str(info.value).endswith("(request id trace-7f3a)")
        await mine.aclose()
        async with sdk(srv, cls=AsyncClient) as acme:
            with pytest.raises(BadRequestError) as info:
                await acme.classify("t", "x")
            assert "'embed' task" in info.value.message
            assert_request_id(info.value)
            with pytest.raises(DeltaRejectedError) as info:
                await acme.tasks.upload("t2", b"not a delta file at all")
            assert info.value.status_code == 422 and info.value.message
            with pytest.raises(NotFoundError):
                await acme.tasks.get("t2")


def test_payload_too_large(tiny_bert, serve):
    d = random_delta(tiny_bert, 0.01, seed=34, kind="embed")
    with serve(tiny_bert, max_delta_bytes=4096) as srv, sdk(srv) as client:
        with pytest.raises(PayloadTooLargeError) as info:
            client.tasks.upload("big", d)
        assert info.value.status_code == 413 and "4096" in info.value.message
        assert_request_id(info.value)

        async def upload_async():
            async with sdk(srv, cls=AsyncClient) as ac:
                with pytest.raises(PayloadTooLargeError) as info:
                    await ac.tasks.upload("big", dumps(d), if_match=3)
                return info.value

        assert "4096" in asyncio.run(upload_async()).message
        assert client.tasks.list().tasks == []
        # the server saw each upload once: a 413 is not retried, even when replay-safe
        assert answers_counted(client.metrics(), "PUT", "/v1/tasks/{task}", 413) == 2


def test_rate_limit_with_tiny_queues(tiny_bert, serve):
    """Queues of one: while the worker is held, concurrent requests beyond the queue are refused
    with a 429 the SDK raises as RateLimitError (with Retry-After); released, the admitted ones
    are served. The worker is held until the first refusal, so there is one by construction."""
    limits = dict(max_queue=1, max_queued_total=1, max_batch=1)
    with serve(tiny_bert, **limits) as srv, sdk(srv, max_retries=0) as client, \
            HeldWorker(tiny_bert) as worker:
        def one(_: int):
            try:
                return client.embed("base", HEAVY)
            except RateLimitError as exc:
                worker.release()
                return exc

        worker.hold()
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(one, range(32)))
        refused = [a for a in answers if isinstance(a, RateLimitError)]
        assert refused and len(refused) < len(answers)
        exc = refused[0]
        assert (exc.status_code, exc.type) == (429, "rate_limited")
        assert exc.retry_after is not None and exc.retry_after >= 1
        assert exc.retry_after == float(exc.response.headers["retry-after"])
        assert_request_id(exc)

        async def flood() -> list:
            async def one_async(ac: AsyncClient):
                try:
                    return await ac.embed("base", HEAVY)
                except RateLimitError as exc:
                    worker.release()
                    return exc

            async with sdk(srv, cls=AsyncClient, max_retries=0) as ac:
                return await asyncio.gather(*(one_async(ac) for _ in range(32)))

        worker.hold()
        async_answers = asyncio.run(flood())
        assert all(isinstance(a, RateLimitError) or a.dim == 32 for a in async_answers)
        async_refused = [a for a in async_answers if isinstance(a, RateLimitError)]
        assert async_refused and len(async_refused) < len(async_answers)
        # max_retries=0: the server saw exactly one request per refusal the callers got
        counted = answers_counted(client.metrics(), "POST", "/v1/tasks/{task}/embed", 429)
        assert counted == len(refused) + len(async_refused)


# --- service endpoints ---------------------------------------------------------------------------

def test_health_ready_metrics_sync(tiny_bert, serve, redis_proc):
    d = random_delta(tiny_bert, 0.01, seed=41, kind="embed")
    with serve(tiny_bert) as srv, sdk(srv) as client, httpx.Client(base_url=srv.url,
                                                                   timeout=30) as raw:
        assert client.health().status == "ok" and raw.get("/healthz").json() == {"status": "ok"}
        ready = client.ready()
        assert ready == Ready.model_validate(raw.get("/readyz").json())
        assert (ready.ready, ready.model_loaded, ready.redis) == (True, True, True)
        assert (ready.base, ready.base_fingerprint) == (tiny_bert.name, tiny_bert.fingerprint)

        before = client.metrics()
        client.tasks.upload("m", d)
        client.tasks.upload("m", d)
        after = client.metrics()
        assert uploads_counted(after, "created") == uploads_counted(before, "created") + 1
        assert uploads_counted(after, "replaced") == uploads_counted(before, "replaced") + 1
        assert "taskdelta_http_request_seconds" in metric_families(after)
        assert metric_families(after) == metric_families(raw.get("/metrics").text)

        with Client(srv.url, api_key="wrong") as stranger:  # probes need no key
            assert stranger.health().status == "ok" and stranger.ready().ready

        redis_proc.stop()  # a 503 with a Ready body is an answer, not an error
        down = client.ready(max_retries=0)
        assert (down.ready, down.redis, down.model_loaded) == (False, False, True)
        assert raw.get("/readyz").status_code == 503


async def test_health_ready_metrics_async(tiny_bert, serve):
    emb = random_delta(tiny_bert, 0.01, seed=42, kind="embed")
    with serve(tiny_bert) as srv:
        async with sdk(srv, cls=AsyncClient) as client:
            health, ready, before = await asyncio.gather(client.health(), client.ready(),
                                                         client.metrics())
            assert health.status == "ok"
            assert (ready.ready, ready.redis, ready.base_fingerprint) == (
                True, True, tiny_bert.fingerprint)
            await client.tasks.upload("m", emb)
            after = await client.metrics()
    assert uploads_counted(after, "created") == uploads_counted(before, "created") + 1
    assert "taskdelta_uploads_total" in metric_families(after)

