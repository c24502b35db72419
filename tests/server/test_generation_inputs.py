"""A generation's answer does not depend on what the worker ran before it, and no temperature the
schema admits makes it fail (found beyond issue 14's list, on a live server):

- a classify task on a causal-LM base stays swapped in after its step; the next prefill and decode
  took the model to run *before* swapping to their own weights, so they ran the classify head
  model: a sampled generation was a 500 ("prob_dist must be 1 or 2 dim") and a greedy one silently
  answered a wrong first token;
- a positive temperature so small that logits / temperature overflow (1e-320, 5e-324) made softmax
  NaN: a 500 on every generate route."""

from __future__ import annotations

import httpx
import pytest
from support import HANG_GUARD_S, auth

from taskdelta.deltas import dumps, load_base, random_delta

PROMPT = "the capital of france is"


@pytest.fixture
def client(varied_llama_dir, serve):
    """A live server on the tiny Llama with a classify task `c`, and acme's client."""
    base = load_base(varied_llama_dir, device="cpu")
    delta = dumps(random_delta(base, 0.01, seed=1, kind="classify", labels=["a", "b"]))
    with serve(base) as srv, httpx.Client(base_url=srv.url, headers=auth("acme"),
                                          timeout=HANG_GUARD_S) as c:
        assert c.put("/v1/tasks/c", content=delta).status_code == 201
        yield c


def generate(c: httpx.Client, **params) -> str:
    r = c.post("/v1/tasks/base/generate", json={"prompt": PROMPT, "max_new_tokens": 6, **params})
    assert r.status_code == 200, r.text
    return r.json()["text"]


@pytest.mark.parametrize("params", [{}, {"temperature": 1.0, "seed": 7}], ids=["greedy", "sampled"])
def test_a_generation_after_a_classify_step_answers_as_it_does_alone(client, params):
    alone = generate(client, **params)
    assert alone
    for _ in range(2):
        r = client.post("/v1/tasks/c/classify", json={"texts": ["x"]})
        assert r.status_code == 200, r.text
        assert generate(client, **params) == alone


@pytest.mark.parametrize("temperature", [1e-320, 5e-324, 1e-40])
def test_a_vanishing_temperature_picks_the_most_likely_token(client, temperature):
    greedy = generate(client)
    assert generate(client, temperature=temperature, seed=3) == greedy
    r = client.post("/v1/completions", json={"model": "base", "prompt": PROMPT, "max_tokens": 6,
                                             "temperature": temperature})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == greedy
