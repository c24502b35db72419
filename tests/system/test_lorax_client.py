"""The real `lorax-client` package against a live server (issue 15): `adapter_id` = task, empty or
absent = the base, plain and streamed, tenant-scoped, errors as the package's own classes.

The client is installed without its dependencies (it pins an old huggingface-hub); the Makefile
does that. Answers are checked against the offline merged model (tiny Llama, greedy).
"""

from __future__ import annotations

import json

import httpx
import pytest
from support import N_TOKENS, PROMPT, auth, generate_offline

from taskdelta.deltas import dumps, random_delta

lorax = pytest.importorskip("lorax", reason="lorax-client: `make install` puts it in (--no-deps)")
from lorax import errors as lorax_errors  # noqa: E402


@pytest.fixture
def gen_server(tiny_llama, serve):
    delta = random_delta(tiny_llama, 0.05, seed=4, kind="generate", scale=0.5)
    with serve(tiny_llama) as srv:
        with httpx.Client(base_url=srv.url, headers=auth("acme"), timeout=30) as c:
            assert c.put("/v1/tasks/gen", content=dumps(delta)).status_code == 201
        yield srv, delta


def client(srv, tenant: str = "acme") -> lorax.Client:
    return lorax.Client(srv.url, headers=auth(tenant), timeout=60)


def test_generate_with_adapter_equals_offline_merged_model(gen_server, tiny_llama):
    srv, delta = gen_server
    want = generate_offline(tiny_llama, delta, PROMPT, temperature=0.0)
    r = client(srv).generate(PROMPT, adapter_id="gen", max_new_tokens=N_TOKENS)
    assert r.generated_text == want.text
    assert r.details.generated_tokens == want.completion_tokens
    assert r.details.prompt_tokens == want.prompt_tokens
    assert len(r.details.tokens) == want.completion_tokens  # one per token, with its logprob
    assert r.details.finish_reason.value == ("length" if want.finish_reason == "length"
                                             else "eos_token")


@pytest.mark.parametrize("adapter_id", [None, ""])
def test_empty_or_absent_adapter_is_the_base(gen_server, tiny_llama, adapter_id):
    srv, _ = gen_server
    want = generate_offline(tiny_llama, None, PROMPT, temperature=0.0)
    r = client(srv).generate(PROMPT, adapter_id=adapter_id, max_new_tokens=N_TOKENS)
    assert r.generated_text == want.text


def test_stream_adds_up_to_the_plain_answer(gen_server, tiny_llama):
    srv, delta = gen_server
    want = generate_offline(tiny_llama, delta, PROMPT, temperature=0.0)
    events = list(client(srv).generate_stream(PROMPT, adapter_id="gen", max_new_tokens=N_TOKENS))
    assert "".join(e.token.text for e in events) == want.text
    assert events[-1].generated_text == want.text
    assert events[-1].details.generated_tokens == want.completion_tokens
    assert all(e.details is None for e in events[:-1])
    # the pieces carry their tokens' logprobs: together, those of the plain answer's tokens
    plain = client(srv).generate(PROMPT, adapter_id="gen", max_new_tokens=N_TOKENS)
    total = sum(t.logprob for t in plain.details.tokens)
    assert total < 0 and sum(e.token.logprob for e in events) == pytest.approx(total, abs=1e-4)


def test_native_generate_routes(gen_server, tiny_llama):
    """TGI's own paths: /generate answers an object, /generate_stream server-sent events."""
    srv, delta = gen_server
    want = generate_offline(tiny_llama, delta, PROMPT, temperature=0.0)
    body = {"inputs": PROMPT, "parameters": {"adapter_id": "gen", "max_new_tokens": N_TOKENS}}
    with httpx.Client(base_url=srv.url, headers=auth("acme"), timeout=30) as c:
        r = c.post("/generate", json=body)
        assert r.status_code == 200 and r.json()["generated_text"] == want.text
        with c.stream("POST", "/generate_stream", json=body) as s:
            events = [json.loads(ln[5:]) for ln in s.iter_lines() if ln.startswith("data:")]
    assert "".join(e["token"]["text"] for e in events) == want.text


def test_sampling_with_seed_is_repeatable(gen_server):
    srv, _ = gen_server
    ask = dict(adapter_id="gen", max_new_tokens=N_TOKENS, do_sample=True, temperature=1.0, seed=5)
    first = client(srv).generate(PROMPT, **ask).generated_text
    assert client(srv).generate(PROMPT, **ask).generated_text == first


def test_errors_are_lorax_client_classes(gen_server):
    srv, _ = gen_server
    with pytest.raises(lorax_errors.NotFoundError):
        client(srv).generate(PROMPT, adapter_id="nope")
    with pytest.raises(lorax_errors.NotFoundError):  # another tenant's task is not there
        client(srv, "beta").generate(PROMPT, adapter_id="gen")
    with pytest.raises(lorax_errors.ValidationError, match="top_k"):  # not honoured: refused
        client(srv).generate(PROMPT, adapter_id="gen", top_k=5)
    bad = lorax.Client(srv.url, headers={"Authorization": "Bearer wrong"})
    with pytest.raises(lorax_errors.UnknownError, match="401"):
        bad.generate(PROMPT)
