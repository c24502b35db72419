"""The step scheduler: continuous batching of generations, bounded classify/embed micro-batches,
KV budget, deadlines that stop the work, streams equal to answers, pinned versions, 429s.

The engine runs for real on tiny random-weight models; the store is an in-memory double of the
`DeltaStore` protocol (the Redis store has its own tests against a real Redis)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
from pathlib import Path

import pytest
import torch
from support import N_TOKENS, MemoryStore, assert_bit_identical, generate_offline, snapshot

from taskdelta.client.types import SamplingParams
from taskdelta.deltas import dumps, load_base, random_delta
from taskdelta.server.engine import Engine
from taskdelta.server.errors import BadTaskRequest, DeadlineExceeded, Overloaded
from taskdelta.server.inference import generate
from taskdelta.server.jobs import EmbedJob, GenerateJob
from taskdelta.server.settings import get_settings

PROMPTS = ["this is a test.", "hello world", "the capital of france is", "one two three four five",
           "a", "once upon a time there was a story about a very long journey"]


@pytest.fixture(scope="module")
def llama(varied_llama_dir: Path):
    return load_base(varied_llama_dir, device="cpu")


def make_engine(base, store=None, **over) -> Engine:
    settings = get_settings(**{"cache_bytes": 64 * 1024**2, "request_timeout_s": 30.0, **over})
    return Engine(base, store or MemoryStore(base), settings)


class StepLog:
    """Wraps the executor's step: records every plan's shape; `hold` blocks the worker."""

    def __init__(self, engine: Engine, delay_s: float = 0.0) -> None:
        self.plans: list[dict] = []
        self.hold = threading.Event()
        self.hold.set()
        step = engine.executor.step

        def logged(plan):
            assert self.hold.wait(10), "a test forgot to release the worker"
            if delay_s:
                threading.Event().wait(delay_s)  # a slower model
            self.plans.append({
                "encode_rows": [[len(j.texts) for j in p.jobs] for p in plan.encode],
                "encode_texts": [[t for j in p.jobs for t in j.texts] for p in plan.encode],
                "prefill": sum(t for _, t in plan.prefill),
                "decode_rows": sum(len(g) for g, _ in plan.decode),
                "live": sum(len(g) for g, _ in plan.decode) + len(plan.prefill)})
            return step(plan)

        engine.executor.step = logged  # type: ignore[method-assign]


def job(prompt: str, **params) -> GenerateJob:
    return GenerateJob(prompt=prompt, params=SamplingParams(**{"max_new_tokens": 12, **params}))


async def run_all(engine: Engine, jobs: list[GenerateJob], order: list[int] | None = None,
                  held: StepLog | None = None, **submit) -> list:
    """Submit the jobs in `order` (10 ms apart; with `held`, the worker waits until all are
    in), answers in the jobs' order."""
    sched = engine.scheduler
    sched.start()
    if held is not None:
        held.hold.clear()
        asyncio.get_running_loop().call_later(0.01 * len(jobs) + 0.05, held.hold.set)
    try:
        futures: dict[int, asyncio.Future] = {}
        for i in order or range(len(jobs)):
            futures[i] = asyncio.ensure_future(sched.submit(engine.registry.base_ref("t"), jobs[i],
                                                            **submit))
            await asyncio.sleep(0.01)
        return [await futures[i] for i in range(len(jobs))]
    finally:
        await sched.stop()


@pytest.mark.parametrize("order", [[0, 1, 2, 3, 4, 5], [5, 3, 1, 0, 2, 4], [2, 5, 0, 4, 1, 3]])
async def test_greedy_output_in_a_continuous_batch_equals_running_alone(llama, order):
    alone = [generate(llama.model, llama.tokenizer, job(p)) for p in PROMPTS]
    assert len({g.text for g in alone}) > 3, "the model must answer differently per prompt"
    engine = make_engine(llama, prefill_tokens=16)
    log = StepLog(engine)
    served = await run_all(engine, [job(p) for p in PROMPTS], order)
    assert [g.text for g in served] == [g.text for g in alone]
    assert [g.completion_tokens for g in served] == [g.completion_tokens for g in alone]
    assert max(p["decode_rows"] for p in log.plans) > 1, "sequences never shared a decode step"


async def test_generations_share_decode_steps(llama):
    engine = make_engine(llama)
    log = StepLog(engine)
    served = await run_all(engine, [job(p, max_new_tokens=16) for p in PROMPTS * 2], held=log)
    tokens = sum(g.completion_tokens for g in served)
    decode_steps = sum(1 for p in log.plans if p["decode_rows"])
    assert tokens == 12 * 16
    assert decode_steps < tokens / 4, "a continuous batch decodes many sequences per step"


async def test_long_prompts_are_read_in_chunks(llama):
    engine = make_engine(llama, prefill_tokens=16)
    log = StepLog(engine)
    long_prompt = " ".join(["word"] * 120)
    served = await run_all(engine, [job(long_prompt), job("hello")])
    assert served[0].prompt_tokens > 100
    assert max(p["prefill"] for p in log.plans) <= 16
    assert served[0].text == generate(llama.model, llama.tokenizer, job(long_prompt)).text


async def test_kv_budget_bounds_live_sequences_and_everyone_is_served(llama):
    from taskdelta.server.kv import kv_bytes_per_token

    per_token = kv_bytes_per_token(llama.config, llama.dtype)
    engine = make_engine(llama)
    engine.scheduler.limits = dataclasses.replace(engine.scheduler.limits,
                                                  kv_cache_bytes=per_token * 40)
    log = StepLog(engine)
    jobs = [job(p, max_new_tokens=8) for p in ["hello world", "a b c", "one two", "x y z", "ok"]]
    reserved = [len(llama.tokenizer(j.prompt)["input_ids"]) + 8 for j in jobs]
    served = await run_all(engine, jobs)
    fits = 40 // max(reserved)
    assert 1 <= max(p["live"] for p in log.plans) <= fits
    assert [g.text for g in served] == [generate(llama.model, llama.tokenizer, j).text for j in jobs]


async def test_a_generation_larger_than_the_kv_budget_is_refused(llama):
    from taskdelta.server.kv import kv_bytes_per_token

    engine = make_engine(llama)
    per_token = kv_bytes_per_token(llama.config, llama.dtype)
    engine.scheduler.limits = dataclasses.replace(engine.scheduler.limits,
                                                  kv_cache_bytes=per_token * 10)
    with pytest.raises(BadTaskRequest, match="KV cache"):
        await run_all(engine, [job("hello world", max_new_tokens=64)])


async def test_a_deadline_stops_the_generation_at_the_next_step(llama):
    engine = make_engine(llama)
    log = StepLog(engine, delay_s=0.01)
    chunks: list = []
    long_job = GenerateJob(prompt="hello", params=SamplingParams(max_new_tokens=200),
                           emit=chunks.append)
    sched = engine.scheduler
    sched.start()
    try:
        with pytest.raises(DeadlineExceeded):
            await sched.submit(engine.registry.base_ref("t"), long_job, timeout_s=0.3)
        for _ in range(200):  # the sequence leaves within a step or two
            if sched.live_sequences == 0:
                break
            await asyncio.sleep(0.02)
        assert sched.live_sequences == 0
        steps_after = len(log.plans)
        answer = await sched.submit(engine.registry.base_ref("t"), job("hi", max_new_tokens=2))
        assert answer.completion_tokens == 2
    finally:
        await sched.stop()
    assert sum(p["decode_rows"] for p in log.plans[:steps_after]) < 200, "the work ran on"


async def test_a_stream_never_shows_text_that_a_stop_string_cuts(llama):
    prompt = "the capital of france is"
    full = generate(llama.model, llama.tokenizer, job(prompt, max_new_tokens=20)).text
    words = full.split()
    assert len(words) > 3
    stop = " " + words[2]  # cut in the middle of the answer
    answer = generate(llama.model, llama.tokenizer, job(prompt, max_new_tokens=20, stop=[stop]))
    assert answer.finish_reason == "stop" and stop not in answer.text
    engine = make_engine(llama)
    pieces: list = []
    streamed_job = GenerateJob(prompt=prompt, params=SamplingParams(max_new_tokens=20, stop=[stop]),
                               emit=pieces.append)
    served = await run_all(engine, [streamed_job])
    text = "".join(c.text for c in pieces)
    assert text == answer.text == served[0].text
    shown = itertools.accumulate(c.text for c in pieces)
    assert all(answer.text.startswith(prefix) for prefix in shown), "a stream showed cut text"
    assert pieces[-1].finish_reason == "stop"


def test_settled_length_holds_back_a_possible_stop_prefix():
    from taskdelta.server.sequences import settled_length

    assert settled_length("4, 5, 6, ", [" 7"]) == len("4, 5, 6,")
    assert settled_length("4, 5, 6,", [" 7"]) == len("4, 5, 6,")
    assert settled_length("abc\ufffd", []) == 3
    assert settled_length("ab", ["xyz"]) == 2


async def test_classify_embed_run_in_bounded_micro_batches_and_others_get_answers(tiny_bert):
    engine = make_engine(tiny_bert, max_batch=8, max_batch_tokens=512, max_consecutive_batches=2)
    log = StepLog(engine)
    sched = engine.scheduler
    sched.start()
    big = EmbedJob(texts=tuple(" ".join(["token"] * (20 + i % 40)) for i in range(64)))
    small = EmbedJob(texts=("a short one",))
    finished: list[str] = []
    try:
        async def run(name: str, j: EmbedJob, tenant: str):
            out = await sched.submit(engine.registry.base_ref(tenant), j)
            finished.append(name)
            return out

        log.hold.clear()  # both are queued before the first step
        big_task = asyncio.ensure_future(run("big", big, "acme"))
        await asyncio.sleep(0.05)
        small_task = asyncio.ensure_future(run("small", small, "other"))
        await asyncio.sleep(0.05)
        log.hold.set()
        big_out, small_out = await big_task, await small_task
    finally:
        await sched.stop()
    lengths = engine.measure(big) + engine.measure(small)
    by_text = dict(zip(big.texts + small.texts, lengths, strict=True))
    forwards = [texts for p in log.plans for texts in p["encode_texts"]]
    assert len(forwards) > 64 * 30 // 512, "the big request took several forwards"
    for texts in forwards:
        assert len(texts) <= 8 and len(texts) * max(by_text[t] for t in texts) <= 512
    assert finished.index("small") < finished.index("big"), "a small request waited for a big one"
    assert len(big_out.rows) == 64 and len(small_out.rows) == 1
    from taskdelta.server.inference import embed

    alone = embed(tiny_bert.backbone, tiny_bert.tokenizer, [big])[0]  # one padded batch of 64
    assert torch.allclose(torch.tensor(big_out.rows), torch.tensor(alone), atol=1e-5)


async def test_the_answer_names_the_version_that_ran(tiny_bert):
    store = MemoryStore(tiny_bert)
    store.put("acme", "task", dumps(random_delta(tiny_bert, 0.01, seed=1, kind="embed")), "embed")
    engine = make_engine(tiny_bert, store)
    sched = engine.scheduler
    sched.start()
    try:
        ref = await engine.registry.resolve("acme", "task", "embed")
        assert ref.version == 1
        out = await sched.submit(ref, EmbedJob(texts=("hello",)))
        assert out.version == 1
        store.put("acme", "task", dumps(random_delta(tiny_bert, 0.01, seed=2, kind="embed")), "embed")
        engine.registry.invalidate("acme", "task")
        out = await sched.submit(ref, EmbedJob(texts=("hello",)))  # pinned to 1, which is gone
        assert out.version == 2
    finally:
        await sched.stop()
        engine.close()


async def test_full_queue_answers_429_before_any_work(llama):
    engine = make_engine(llama, max_queue=2)
    log = StepLog(engine)
    sched = engine.scheduler
    sched.start()
    ref = engine.registry.base_ref("t")
    log.hold.clear()
    try:
        first = [asyncio.ensure_future(sched.submit(ref, job(p))) for p in PROMPTS[:2]]
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded):
            await sched.submit(ref, job("one too many"))
        log.hold.set()
        assert all(g.completion_tokens for g in await asyncio.gather(*first))
    finally:
        log.hold.set()
        await sched.stop()


async def test_stop_fails_what_waits_and_joins_the_worker(llama):
    engine = make_engine(llama)
    log = StepLog(engine)
    sched = engine.scheduler
    sched.start()
    log.hold.clear()
    work = [asyncio.ensure_future(sched.submit(engine.registry.base_ref("t"), job(p)))
            for p in PROMPTS]
    await asyncio.sleep(0.05)
    stopping = asyncio.ensure_future(sched.stop())
    await asyncio.sleep(0.05)
    log.hold.set()
    await stopping
    outcomes = await asyncio.gather(*work, return_exceptions=True)
    assert all(isinstance(o, Overloaded) or hasattr(o, "text") for o in outcomes)
    assert any(isinstance(o, Overloaded) for o in outcomes)


def test_policy_take_rows_keeps_every_forward_within_budget():
    from taskdelta.server.policy import RowBudget, take_rows

    for lengths in itertools.product([1, 7, 30, 64], repeat=3):
        budget = RowBudget(max_rows=4, max_tokens=64)
        slices = take_rows([("a", sorted(lengths)), ("b", [5, 5])], budget)
        rows = [i for s in slices for i in s.indices]
        assert 1 <= len(rows) <= 4 and budget.rows * budget.longest <= max(64, budget.longest)


@pytest.mark.parametrize("mixed", [True, False])
async def test_generations_of_many_tasks_match_each_merged_model(llama, mixed):
    """Mixed on: one decode forward serves rows of several tasks on the untouched base (each
    delta a correction on its rows); off: one group per task, swapped in. Either way every
    sequence's greedy text is its merged model's, and the base stays bit-identical."""
    store = MemoryStore(llama)
    made = [random_delta(llama, 0.01, seed=40 + i, kind="generate", scale=0.2) for i in range(4)]
    for i, d in enumerate(made):
        store.put("acme", f"g{i}", dumps(d), "generate")
    prompts = [(i % 4, p) for i, p in enumerate(PROMPTS)] + [(None, "plain base prompt")]
    want = [generate_offline(llama, made[i] if i is not None else None, p).text for i, p in prompts]
    assert len(set(want)) > 3
    saved = snapshot(llama)
    engine = make_engine(llama, store, mixed_batches=mixed)
    log = StepLog(engine)
    runs: list[int] = []
    decode = engine.executor.decode

    def counted(group, prepared, report):
        runs.append(len(group.runs()) if group.mixed else 1)
        return decode(group, prepared, report)

    engine.executor.decode = counted  # type: ignore[method-assign]
    sched = engine.scheduler
    sched.start()
    log.hold.clear()
    try:
        refs = [await engine.registry.resolve("acme", f"g{i}", "generate") if i is not None
                else engine.registry.base_ref("acme") for i, _ in prompts]
        futures = [asyncio.ensure_future(sched.submit(ref, job(p, max_new_tokens=N_TOKENS)))
                   for ref, (_, p) in zip(refs, prompts, strict=True)]
        await asyncio.sleep(0.1)
        log.hold.set()
        served = await asyncio.gather(*futures)
    finally:
        log.hold.set()
        await sched.stop()
        engine.close()
    assert [g.text for g in served] == want
    assert (max(runs) > 1) == mixed, "mixed decode steps iff the mode is on"
    assert_bit_identical(llama, saved)


def test_sampling_keeps_the_most_likely_token_whatever_top_p(llama):
    """top_p of 5e-324 is 0 in float32: the nucleus must still hold the most likely token."""
    g = generate(llama.model, llama.tokenizer,
                 job("hello", max_new_tokens=4, temperature=1.997, top_p=5e-324, seed=1))
    greedy = generate(llama.model, llama.tokenizer, job("hello", max_new_tokens=4))
    assert g.text == greedy.text  # a nucleus of one token is greedy decoding


def test_logprobs_are_the_chosen_tokens_log_probabilities(llama):
    g = generate(llama.model, llama.tokenizer, job("hello", max_new_tokens=3, logprobs=2))
    assert g.logprobs is not None and len(g.logprobs) == g.completion_tokens == 3
    for entry in g.logprobs:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])  # greedy


async def test_a_cached_task_keeps_serving_while_the_store_is_away(tiny_bert):
    from taskdelta.server.errors import StoreUnavailable

    store = MemoryStore(tiny_bert)
    store.put("acme", "task", dumps(random_delta(tiny_bert, 0.01, seed=1, kind="embed")), "embed")
    engine = make_engine(tiny_bert, store, version_check_s=0.01)
    sched = engine.scheduler
    sched.start()
    try:
        ref = await engine.registry.resolve("acme", "task", "embed")
        first = await sched.submit(ref, EmbedJob(texts=("hello",)))

        async def away(*_args, **_kw):
            raise StoreUnavailable("the task store (Redis) failed")

        store.get = store.get_blob = store.current_version = away  # type: ignore[method-assign]
        await asyncio.sleep(0.02)  # the cached entry is due for a version check
        ref = await engine.registry.resolve("acme", "task", "embed")
        again = await sched.submit(ref, EmbedJob(texts=("hello",)))
        assert again.version == first.version == 1 and again.rows == first.rows
        with pytest.raises(StoreUnavailable):
            await engine.registry.resolve("acme", "never-cached", "embed")
    finally:
        await sched.stop()
        engine.close()
