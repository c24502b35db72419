"""The official `openai` package against a live server (issue 15): every OpenAI route, plain and
streamed, and its errors as the package's own exception classes.

Answers are checked against the offline merged model (tiny random-weight Llama, greedy), or
against the project's own routes for the same task.
"""

from __future__ import annotations

import base64
import dataclasses

import httpx
import numpy as np
import openai
import pytest
from support import KEYS, N_TOKENS, PROMPT, auth, frozen_copy, generate_offline, merged_copy

from taskdelta.deltas import dumps, random_delta
from taskdelta.server.inference import embed, render_chat
from taskdelta.server.jobs import EmbedJob
from taskdelta.server.sequences import Generation

MESSAGES = [{"role": "user", "content": "hi"}]
# The engine fills Generation.logprobs (issue 15's contract with the engine). Tests that need it
# are marked with this: expected failures until then, real tests after.
ENGINE_LOGPROBS = any(f.name == "logprobs" for f in dataclasses.fields(Generation))
needs_engine_logprobs = pytest.mark.xfail(not ENGINE_LOGPROBS, strict=True,
                                          reason="Generation.logprobs not filled by the engine yet")


def client(srv, tenant: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEYS[tenant], max_retries=0, timeout=60)


@pytest.fixture
def gen_server(tiny_llama, serve):
    """A live server with the generate task `gen` uploaded by tenant acme."""
    delta = random_delta(tiny_llama, 0.05, seed=4, kind="generate", scale=0.5)
    with serve(tiny_llama) as srv:
        with httpx.Client(base_url=srv.url, headers=auth("acme"), timeout=30) as c:
            assert c.put("/v1/tasks/gen", content=dumps(delta)).status_code == 201
        yield srv, delta


def chat_prompt(base) -> str:
    return render_chat(base.tokenizer, MESSAGES)


# --- models --------------------------------------------------------------------------------------

def test_models_lists_base_and_own_tasks_with_parent_and_owner(gen_server, tiny_llama):
    srv, _ = gen_server
    models = {m.id: m for m in client(srv).models.list()}
    assert set(models) == {"base", "gen"}
    assert models["gen"].owned_by == "acme" and models["gen"].parent == tiny_llama.name
    assert client(srv).models.retrieve("gen").id == "gen"
    assert [m.id for m in client(srv, "beta").models.list()] == ["base"]  # tenants see their own
    with pytest.raises(openai.NotFoundError):
        client(srv, "beta").models.retrieve("gen")


# --- completions ---------------------------------------------------------------------------------

def test_completion_equals_offline_merged_model(gen_server, tiny_llama):
    srv, delta = gen_server
    want = generate_offline(tiny_llama, delta, PROMPT, temperature=0.0)
    r = client(srv).completions.create(model="gen", prompt=PROMPT, max_tokens=N_TOKENS,
                                       temperature=0)
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == want.finish_reason
    assert r.usage.completion_tokens == want.completion_tokens
    echoed = client(srv).completions.create(model="gen", prompt=PROMPT, max_tokens=N_TOKENS,
                                            temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + want.text


def test_completion_stream_and_prompt_list(gen_server, tiny_llama):
    srv, delta = gen_server
    want = generate_offline(tiny_llama, delta, PROMPT, temperature=0.0)
    other = generate_offline(tiny_llama, delta, "good morning", temperature=0.0)
    texts = {0: "", 1: ""}
    for chunk in client(srv).completions.create(model="gen", prompt=[PROMPT, "good morning"],
                                                max_tokens=N_TOKENS, temperature=0, stream=True):
        for ch in chunk.choices:
            texts[ch.index] += ch.text
    assert texts == {0: want.text, 1: other.text}


def test_chat_max_completion_tokens_n_and_usage(gen_server, tiny_llama):
    """max_completion_tokens bounds the answer; n=2 is two choices of the same greedy text."""
    srv, delta = gen_server
    want = generate_offline(tiny_llama, delta, chat_prompt(tiny_llama), temperature=0.0)
    r = client(srv).chat.completions.create(model="gen", messages=MESSAGES, n=2, temperature=0,
                                            max_completion_tokens=N_TOKENS)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.role == "assistant" and c.message.content == want.text for c in r.choices)
    assert r.usage.completion_tokens == 2 * want.completion_tokens <= 2 * N_TOKENS
    assert r.usage.prompt_tokens == want.prompt_tokens  # the shared prompt counted once
    short = client(srv).chat.completions.create(model="gen", messages=MESSAGES, temperature=0,
                                                max_completion_tokens=3)
    assert short.usage.completion_tokens <= 3 and short.choices[0].finish_reason == "length"


def test_chat_stream_chunks_as_openai_sends_them(gen_server, tiny_llama):
    srv, delta = gen_server
    want = generate_offline(tiny_llama, delta, chat_prompt(tiny_llama), temperature=0.0)
    chunks = list(client(srv).chat.completions.create(
        model="gen", messages=MESSAGES, temperature=0, max_completion_tokens=N_TOKENS, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id.startswith("chatcmpl-") for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [want.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.completion_tokens


def test_chat_stream_with_n_opens_and_finishes_every_choice(gen_server, tiny_llama):
    """n streamed choices share the batch: each opens with the role and adds up to the answer."""
    srv, delta = gen_server
    want = generate_offline(tiny_llama, delta, chat_prompt(tiny_llama), temperature=0.0)
    roles, texts, finishes = {}, {0: "", 1: "", 2: ""}, {}
    for chunk in client(srv).chat.completions.create(model="gen", messages=MESSAGES, n=3,
                                                     temperature=0, max_completion_tokens=N_TOKENS,
                                                     stream=True):
        for ch in chunk.choices:
            if ch.delta.role:
                roles.setdefault(ch.index, ch.delta.role)
                assert ch.index not in finishes and texts[ch.index] == ""  # the role comes first
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert roles == {0: "assistant", 1: "assistant", 2: "assistant"}
    assert texts == {i: want.text for i in range(3)}
    assert finishes == {i: want.finish_reason for i in range(3)}


def test_seed_makes_sampling_repeatable(gen_server):
    srv, _ = gen_server
    ask = dict(model="gen", prompt=PROMPT, max_tokens=N_TOKENS, temperature=1.0, seed=7)
    first = client(srv).completions.create(**ask).choices[0].text
    assert client(srv).completions.create(**ask).choices[0].text == first


def test_stream_with_stop_string_equals_plain_answer(gen_server, tiny_llama):
    """A stream never emits text that a stop string later cuts (the engine holds back a tail
    that could still begin a stop string): streamed text == non-streamed text."""
    srv, delta = gen_server
    full = generate_offline(tiny_llama, delta, PROMPT, temperature=0.0).text
    assert len(full) > 8
    stop = full[len(full) // 2 - 1: len(full) // 2 + 1]  # two characters in the middle
    ask = dict(model="gen", prompt=PROMPT, max_tokens=N_TOKENS, temperature=0, stop=stop)
    plain = client(srv).completions.create(**ask).choices[0].text
    assert stop not in plain and full.startswith(plain)
    streamed = "".join(c.choices[0].text for c in client(srv).completions.create(**ask, stream=True)
                       if c.choices)
    assert streamed == plain


@needs_engine_logprobs
def test_chat_logprobs_and_top_logprobs(gen_server):
    """Greedy: the chosen token is the most likely one, so its logprob tops its alternatives."""
    srv, _ = gen_server
    r = client(srv).chat.completions.create(model="gen", messages=MESSAGES, temperature=0,
                                            max_completion_tokens=N_TOKENS, logprobs=True,
                                            top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0.0
        assert t.logprob >= max(a.logprob for a in t.top_logprobs) - 1e-5


@needs_engine_logprobs
def test_completion_logprobs_legacy_shape(gen_server):
    srv, _ = gen_server
    r = client(srv).completions.create(model="gen", prompt=PROMPT, max_tokens=N_TOKENS,
                                       temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert len(lp.tokens) == r.usage.completion_tokens
    assert all(len(top) <= 2 for top in lp.top_logprobs)


# --- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"temperature": 5}, "temperature"),
    ({"n": 100}, "n"),
])
def test_unhonoured_or_invalid_parameters_are_400_naming_the_param(gen_server, extra, param):
    srv, _ = gen_server
    with pytest.raises(openai.BadRequestError) as info:
        client(srv).chat.completions.create(model="gen", messages=MESSAGES, **extra)
    assert info.value.status_code == 400 and info.value.param == param
    assert info.value.body["type"] == "invalid_request_error"


def test_unknown_model_and_bad_key_are_openai_errors(gen_server):
    srv, _ = gen_server
    with pytest.raises(openai.NotFoundError) as info:
        client(srv).completions.create(model="nope", prompt="x")
    assert "nope" in info.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client(srv, "beta").chat.completions.create(model="gen", messages=MESSAGES)
    bad = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# --- embeddings ----------------------------------------------------------------------------------

def test_embeddings_equal_the_embed_route(tiny_bert, serve):
    """float and base64 (the package's default) both carry the task's own embeddings."""
    delta = random_delta(tiny_bert, 0.05, seed=9, kind="embed", scale=0.3)
    texts = ["a fine film", "rain again"]
    model = merged_copy(frozen_copy(tiny_bert), delta)[0]
    want = embed(model.backbone, model.tokenizer, [EmbedJob(tuple(texts), True)])[0]
    with serve(tiny_bert) as srv:
        with httpx.Client(base_url=srv.url, headers=auth("acme"), timeout=30) as c:
            assert c.put("/v1/tasks/emb", content=dumps(delta)).status_code == 201
        r = client(srv).embeddings.create(model="emb", input=texts, encoding_format="float")
        assert [d.index for d in r.data] == [0, 1] and r.usage.prompt_tokens > 0
        for got, w in zip(r.data, want, strict=True):
            assert got.embedding == pytest.approx(w, abs=1e-5)
        raw = client(srv).embeddings.create(model="emb", input=texts, encoding_format="base64")
        for got, w in zip(raw.data, want, strict=True):  # asked for: left encoded by the package
            floats = np.frombuffer(base64.b64decode(got.embedding), dtype="<f4")
            assert floats.tolist() == pytest.approx(w, abs=1e-5)
        default = client(srv).embeddings.create(model="emb", input=texts[0])  # base64 on the wire
        assert default.data[0].embedding == pytest.approx(want[0], abs=1e-5)
        with pytest.raises(openai.BadRequestError) as info:
            client(srv).embeddings.create(model="emb", input="x", dimensions=3)
        assert info.value.param == "dimensions"
