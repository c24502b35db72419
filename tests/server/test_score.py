"""Serving a regress task (issue 16, STS-B): `POST /v1/tasks/{name}/score` answers each text's or
pair's head output equal, bit for bit, to the offline merged model's; the routes of other kinds
refuse it with a 400 that names the score route (and the score route refuses them, naming
theirs); it keeps classify's limits and auth; in a mixed micro-batch a regress task shares the
pooled forward with classify tasks and stays within the documented 1e-5 of its merged model."""

from __future__ import annotations

import httpx
import pytest
import torch
from support import PAIRS, TEXTS, assert_bit_identical, auth, bits, merged_copy, snapshot

from taskdelta.deltas import dumps, load_base, merge_into, prepare, random_delta
from taskdelta.deltas.mixed import Mixer
from taskdelta.server.executor import EncodePart, Executor
from taskdelta.server.inference import classify, embed, measure, score
from taskdelta.server.jobs import ClassifyJob, EmbedJob, ScoreJob

MIXED_ATOL = 1e-5  # docs/engine.md: a mixed forward is within 1e-5 of each task's merged model
LABELS = ("neg", "pos", "meh")


def regress_delta(base, seed: int = 5, scale: float = 0.3):
    return random_delta(base, 0.05, seed=seed, kind="regress", scale=scale)


def test_score_matches_the_offline_merged_model_bitwise(tiny_bert, serve):
    delta = regress_delta(tiny_bert)
    merged, prepared = merged_copy(tiny_bert, delta)
    texts = [*TEXTS, *PAIRS, TEXTS[0]]  # singles and pairs in one request: two forwards
    # the scheduler forwards a request's texts shortest first: the same order here, so the
    # offline forwards have the same rows in the same places (bit-exactness is per composition)
    lengths = measure(merged.tokenizer, ScoreJob(tuple(texts)), 512)
    texts = [texts[i] for i in sorted(range(len(texts)), key=lengths.__getitem__)]
    (want,) = classify(prepared.head, merged.tokenizer, prepared.labels, [ScoreJob(tuple(texts))])
    assert all(isinstance(v, float) for v in want) and len(set(want)) > 1
    saved = snapshot(tiny_bert)
    with serve(tiny_bert) as srv, httpx.Client(base_url=srv.url, headers=auth("acme"), timeout=30) as c:
        r = c.put("/v1/tasks/sts", content=dumps(delta))
        assert r.status_code == 201, r.text
        assert (r.json()["kind"], r.json()["labels"]) == ("regress", ["score"])
        r = c.post("/v1/tasks/sts/score", json={"texts": [t if isinstance(t, str) else list(t)
                                                          for t in texts]})
        assert r.status_code == 200, r.text
        assert r.json() == {"task": "sts", "version": 1, "scores": want}
    assert_bit_identical(tiny_bert, saved)
    # the bench's helper runs the same code: the same numbers
    assert score(prepared.head, merged.tokenizer, texts, batch=2) == pytest.approx(want, abs=1e-6)


def test_wrong_kind_routes_are_refused_naming_the_right_route(tiny_bert, serve):
    regress, cls = regress_delta(tiny_bert), random_delta(tiny_bert, 0.01, seed=6, kind="classify")
    emb = random_delta(tiny_bert, 0.01, seed=7, kind="embed")
    with serve(tiny_bert, max_text_chars=50) as srv, \
            httpx.Client(base_url=srv.url, headers=auth("acme"), timeout=30) as c:
        for name, d in (("sts", regress), ("cls", cls), ("emb", emb)):
            assert c.put(f"/v1/tasks/{name}", content=dumps(d)).status_code == 201
        for path, says in [("/v1/tasks/sts/classify", "'regress' task; it cannot classify (use "
                                                      "POST /v1/tasks/sts/score)"),
                           ("/v1/tasks/sts/embed", "it cannot embed (use POST /v1/tasks/sts/score)"),
                           ("/v1/tasks/cls/score", "'classify' task; it cannot score (use POST "
                                                   "/v1/tasks/cls/classify)"),
                           ("/v1/tasks/emb/score", "it cannot score (use POST /v1/tasks/emb/embed)"),
                           ("/v1/tasks/base/score", "no regression head")]:
            r = c.post(path, json={"texts": ["x"]})
            assert r.status_code == 400, (path, r.text)
            assert r.json()["error"]["type"] == "bad_request" and says in r.json()["error"]["message"]
        # classify's limits and auth hold for the score route too
        assert c.post("/v1/tasks/sts/score", json={"texts": []}).status_code == 422
        assert c.post("/v1/tasks/sts/score", json={"texts": ["x"], "top_k": 1}).status_code == 422
        r = c.post("/v1/tasks/sts/score", json={"texts": ["y" * 51]})
        assert r.status_code == 413 and "TASKDELTA_MAX_TEXT_CHARS" in r.json()["error"]["message"]
        assert c.post("/v1/tasks/sts/score", json={"texts": ["x"]}, headers=auth("beta")).status_code == 404
        assert c.post("/v1/tasks/sts/score", json={"texts": ["x"]},
                      headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.post("/v1/tasks/nope/score", json={"texts": ["x"]}).status_code == 404
        paths = c.get("/openapi.json").json()["paths"]
        assert "/v1/tasks/{task}/score" in paths


@pytest.fixture
def executor(tiny_bert):
    ex = Executor(tiny_bert, Mixer(tiny_bert))
    yield ex
    ex.restore_base()
    ex.mixer.close()


def merged_answers(model_dir, delta, jobs: list) -> list:
    """The offline merged model's answers: a fresh copy of the base with the delta merged in."""
    ref = load_base(model_dir, device="cpu")
    prepared = prepare(delta, ref)
    merge_into(ref.params, prepared)
    if prepared.head is None:
        return embed(ref.backbone, ref.tokenizer, jobs)
    return classify(prepared.head, ref.tokenizer, prepared.labels, jobs)


def flat_diff(got, want) -> float:
    """Largest absolute difference between two nested answers (floats, lists, classify dicts)."""
    if isinstance(got, dict):
        assert got["label"] == want["label"]
        return max(abs(got["scores"][k] - want["scores"][k]) for k in want["scores"])
    if isinstance(got, list):
        assert len(got) == len(want)
        return max((flat_diff(a, b) for a, b in zip(got, want, strict=True)), default=0.0)
    return abs(float(got) - float(want))


def test_a_regress_task_mixes_with_classify_and_embed_tasks_within_tolerance(
        tiny_bert, tiny_bert_dir, executor):
    made = [random_delta(tiny_bert, 0.05, seed=20, kind="classify", labels=list(LABELS), scale=0.05),
            regress_delta(tiny_bert, seed=21, scale=0.05),
            random_delta(tiny_bert, 0.05, seed=22, kind="embed", scale=0.05)]
    prepared = [prepare(d, tiny_bert, name=f"t{i}") for i, d in enumerate(made)]
    jobs = [[ClassifyJob(texts=tuple(TEXTS))],
            [ScoreJob(texts=(TEXTS[1], PAIRS[0])), ScoreJob(texts=(TEXTS[2],))],
            [EmbedJob(texts=(TEXTS[0],))]]
    assert all(executor.mixer.why_not(p) is None for p in prepared)
    before = {n: bits(p).clone() for n, p in tiny_bert.params.items()}
    forwards = []
    hook = tiny_bert.backbone.register_forward_hook(lambda m, a, o: forwards.append(1))
    try:
        got = executor.encode([EncodePart(f"acme/t{i}", p, p.labels, j)
                               for i, (p, j) in enumerate(zip(prepared, jobs, strict=True))])
    finally:
        hook.remove()
    # classify and regress rows share the pooled forwards (single texts, pairs), embed has its own
    assert len(forwards) == 3
    assert executor.swapper.active is None
    assert all(torch.equal(bits(p), before[n]) for n, p in tiny_bert.params.items())
    want = [merged_answers(tiny_bert_dir, d, j) for d, j in zip(made, jobs, strict=True)]
    assert all(isinstance(v, float) for job in got[1] for v in job)
    assert flat_diff(got, want) <= MIXED_ATOL
    # the corrections matter: the base's forward with the task's head alone answers otherwise
    plain = classify(prepared[1].head, tiny_bert.tokenizer, prepared[1].labels, jobs[1])
    assert flat_diff(plain, want[1]) > 10 * MIXED_ATOL


def test_a_regress_task_alone_in_a_micro_batch_is_swapped_in_and_exact(tiny_bert, tiny_bert_dir, executor):
    delta = regress_delta(tiny_bert, seed=23)
    prepared = prepare(delta, tiny_bert, name="sts")
    jobs = [ScoreJob(texts=(*TEXTS, PAIRS[1]))]
    (got,) = executor.encode([EncodePart("acme/sts", prepared, prepared.labels, jobs)])
    assert executor.swapper.active is prepared
    assert got == merged_answers(tiny_bert_dir, delta, jobs)
