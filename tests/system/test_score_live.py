"""The SDK's `score()` against a live server (issue 16, a regress task such as STS-B), `Client` and
`AsyncClient` alike: the scores equal the offline merged model's bit for bit (concurrent requests,
which may share a padded forward, within 1e-6), pairs go as pairs, the version that ran comes
back, and classify on a regress task is a `BadRequestError` naming the score route."""

from __future__ import annotations

import asyncio

import pytest
from support import PAIRS, TEXTS, merged_copy, sdk

from taskdelta.client import AsyncClient, BadRequestError
from taskdelta.deltas import random_delta
from taskdelta.server.inference import classify, measure
from taskdelta.server.jobs import ScoreJob

ATOL = 1e-6


def offline(base, delta, texts: list) -> tuple[list, list[float]]:
    """The texts shortest first (the order the scheduler forwards them) and the merged model's
    scores for them."""
    merged, prepared = merged_copy(base, delta)
    lengths = measure(merged.tokenizer, ScoreJob(tuple(texts)), 512)
    texts = [texts[i] for i in sorted(range(len(texts)), key=lengths.__getitem__)]
    (want,) = classify(prepared.head, merged.tokenizer, prepared.labels, [ScoreJob(tuple(texts))])
    return texts, want  # type: ignore[return-value]


def test_score_sync_matches_the_offline_model(tiny_bert, serve):
    delta = random_delta(tiny_bert, 0.02, seed=61, kind="regress", scale=0.3)
    texts, want = offline(tiny_bert, delta, [*PAIRS, (TEXTS[0], TEXTS[1])])
    singles, want_singles = offline(tiny_bert, delta, TEXTS)
    with serve(tiny_bert) as srv, sdk(srv) as client:
        client.tasks.upload("sts", delta)
        got = client.score("sts", texts)
        assert (got.task, got.version, got.scores) == ("sts", 1, want)
        assert client.score("sts", singles).scores == want_singles
        with pytest.raises(BadRequestError, match=r"/v1/tasks/sts/score"):
            client.classify("sts", "x")


async def test_score_async_matches_the_offline_model(tiny_bert, serve):
    delta = random_delta(tiny_bert, 0.02, seed=62, kind="regress", scale=0.3)
    texts, want = offline(tiny_bert, delta, [*PAIRS, (TEXTS[2], TEXTS[0])])
    with serve(tiny_bert) as srv:
        async with sdk(srv, cls=AsyncClient) as client:
            await client.tasks.upload("sts", delta)
            got = await client.score("sts", texts)
            assert (got.version, got.scores) == (1, want)
            both = await asyncio.gather(client.score("sts", texts), client.score("sts", texts))
            for r in both:
                assert r.scores == pytest.approx(want, abs=ATOL)
            with pytest.raises(BadRequestError, match=r"'regress' task; it cannot classify"):
                await client.classify("sts", "x")
