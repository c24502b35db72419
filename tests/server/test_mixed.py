"""Mixed-task batches (opt-in): one forward of the untouched base serves requests of several tasks,
each delta applied as a sparse correction to its own rows. Outputs match each task's offline merged
model within a tolerance (not bit for bit), the base stays bit-identical, a task that cannot be
mixed runs through the swap, the scheduler fills a batch across tasks only with loaded deltas,
and with the mode off nothing changes."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from support import MemoryStore, bits

from taskdelta.deltas import Base, _mixed_kernel, dumps, load_base, merge_into, prepare, random_delta
from taskdelta.deltas.mixed import Mixer
from taskdelta.server.app import create_app
from taskdelta.server.cache import CacheEntry, DeltaCache
from taskdelta.server.engine import Engine
from taskdelta.server.executor import EncodePart, Executor
from taskdelta.server.inference import classify, embed
from taskdelta.server.jobs import ClassifyJob, EmbedJob
from taskdelta.server.registry import Loaded, TaskRef, TaskRegistry
from taskdelta.server.settings import Settings, get_settings

PROB_ATOL = 1e-5  # probabilities and embeddings: mixed vs the merged model
SENTENCES = ["a gripping , funny film", "dull", "it is neither here nor there , and it knows it",
             "the cast is wonderful", "an utter mess from start to finish"]
PAIR = ("a man is playing a guitar", "someone plays music")
LABELS = ["neg", "pos", "meh"]
def deltas(base: Base, kinds: list[str], density: float = 0.05) -> list:
    """Random deltas touching every tensor: Linear weights and biases, embeddings, LayerNorms."""
    return [random_delta(base, density, seed=100 + i, kind=kind, labels=LABELS if kind == "classify"
                         else None, scale=0.05) for i, kind in enumerate(kinds)]


def merged_outputs(model_dir: Path, delta, jobs: list) -> list:
    """What the offline merged model answers: a fresh copy of the base with the delta merged in."""
    ref = load_base(model_dir, device="cpu")
    prepared = prepare(delta, ref)
    merge_into(ref.params, prepared)
    if delta.meta.kind == "classify":
        return classify(prepared.head, ref.tokenizer, tuple(LABELS), jobs)
    return embed(ref.backbone, ref.tokenizer, jobs)


def max_diff(got: Any, want: Any) -> float:
    """Largest absolute difference between two nested answers (scores dicts / float lists)."""
    if isinstance(got, dict) and "scores" in got:
        diff = max_diff(got["scores"], want["scores"])
        assert got["label"] == want["label"] or diff < 1e-4, (got, want)  # a near tie may flip
        return diff
    if isinstance(got, dict):
        assert got.keys() == want.keys()
        return max((max_diff(got[k], want[k]) for k in got), default=0.0)
    if isinstance(got, list):
        assert len(got) == len(want)
        return max((max_diff(a, b) for a, b in zip(got, want, strict=True)), default=0.0)
    return abs(float(got) - float(want))


@pytest.fixture
def engine(tiny_bert):
    """The executor with a mixer: `encode` runs one part swapped in, several parts mixed."""
    eng = Executor(tiny_bert, Mixer(tiny_bert))
    yield eng
    eng.restore_base()
    eng.mixer.close()


def run_parts(executor: Executor, parts: list[tuple[str, Any, list]]) -> list:
    """(key, prepared, jobs) parts through one micro-batch; the answers flat, in order."""
    got = executor.encode([EncodePart(k, p, tuple(LABELS) if p is not None else (), jobs)
                           for k, p, jobs in parts])
    return [r for part in got for r in part]


@pytest.fixture(params=["kernel", "torch"])
def kernel_mode(request, monkeypatch):
    """The compiled kernels and the torch sparse path give the same answers (within rounding)."""
    if request.param == "torch":
        monkeypatch.setenv(_mixed_kernel.DISABLE_ENV, "0")
    _mixed_kernel.reset()
    yield request.param
    _mixed_kernel.reset()


def test_mixed_batch_matches_each_tasks_merged_model_and_leaves_the_base_exact(
        kernel_mode, tiny_bert, tiny_bert_dir, engine):
    made = deltas(tiny_bert, ["classify", "classify", "embed", "classify"])
    prepared = [prepare(d, tiny_bert, name=f"t{i}") for i, d in enumerate(made)]
    jobs = [
        [ClassifyJob(texts=(SENTENCES[0], SENTENCES[1])), ClassifyJob(texts=(PAIR,))],
        [ClassifyJob(texts=(SENTENCES[2],))],
        [EmbedJob(texts=(SENTENCES[3], SENTENCES[4])), EmbedJob(texts=("x",), normalize=False)],
        [ClassifyJob(texts=tuple(SENTENCES)), ClassifyJob(texts=(PAIR, SENTENCES[1]))],
    ]
    assert (engine.mixer._kernel is None) == (kernel_mode == "torch")
    before = {n: bits(p).clone() for n, p in tiny_bert.params.items()}
    for p in prepared:
        assert engine.mixer.why_not(p) is None
    run_parts(engine, [("acme/t1", prepared[1], jobs[1])])  # a task swapped in: mixing restores first
    base_embed = [EmbedJob(texts=("plain base",))]
    parts = [(f"acme/t{i}", p, j) for i, (p, j) in enumerate(zip(prepared, jobs, strict=True))]
    parts.insert(2, ("acme/base", None, base_embed))
    got = run_parts(engine, parts)
    assert engine.swapper.active is None
    assert all(torch.equal(bits(p), before[n]) for n, p in tiny_bert.params.items()), \
        "the base changed"

    flat_want = []
    for d, j in zip(made[:2], jobs[:2], strict=True):
        flat_want += merged_outputs(tiny_bert_dir, d, j)
    flat_want += embed(tiny_bert.backbone, tiny_bert.tokenizer, base_embed)
    for d, j in zip(made[2:], jobs[2:], strict=True):
        flat_want += merged_outputs(tiny_bert_dir, d, j)
    worst = max_diff(got, flat_want)
    print(f"\nmixed vs merged ({kernel_mode}): max abs diff {worst:.2e}")
    assert worst <= PROB_ATOL
    # the corrections matter: the base alone answers differently
    plain = classify(prepared[0].head, tiny_bert.tokenizer, tuple(LABELS), jobs[0])
    assert max_diff(plain, flat_want[:2]) > 10 * PROB_ATOL


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_linear_kernel_equals_dense_products_for_any_run_length_and_refuses_out_of_place_indices(
        index_dtype):
    """Runs of 1 to 130 rows (one pass and several, 8-row vectors full and not), a base gap, two
    tokens a row; the same call twice gives the same bits; indices below a column's first, past
    the matrix or out of order are refused (IndexError), never followed."""
    kernel = _mixed_kernel.load()
    if kernel is None:
        pytest.skip("the mixed kernels cannot be built here")
    gen = torch.Generator().manual_seed(0)
    out, inp, per_row = 40, 24, 2
    lengths = [1, 7, 4, 9, 18, 36, 64, 65]  # batch rows (x2 tokens: up to 130 rows a run)
    starts = [sum(lengths[:i]) + (3 if i >= 3 else 0) for i in range(len(lengths))]  # a gap
    ends = [a + n for a, n in zip(starts, lengths, strict=True)]
    x = torch.randn(per_row * ends[-1], inp, generator=gen)
    y = torch.randn(per_row * ends[-1], out, generator=gen)
    want = y.double()
    idxs, vals = [], []
    for a, b in zip(starts, ends, strict=True):
        dense = torch.randn(out, inp, generator=gen) * (torch.rand(out, inp, generator=gen) < 0.1)
        flat = dense.flatten().nonzero().flatten()
        junk_low = torch.tensor([-7, -1])  # before column 0's first index
        junk_high = torch.tensor([out * inp, out * inp + 5, 2**30])  # past the matrix
        idxs.append(flat.to(index_dtype))
        vals.append(dense.flatten()[flat])
        rows = slice(per_row * a, per_row * b)
        want[rows] += x[rows].double() @ dense.double().t()
    got = y.clone()
    kernel.linear_fix(x, got, per_row, idxs, vals, starts, ends)
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=0)
    again = y.clone()
    kernel.linear_fix(x, again, per_row, idxs, vals, starts, ends)
    assert torch.equal(bits(got), bits(again))
    shuffled = [i[torch.randperm(i.numel(), generator=gen)].contiguous() for i in idxs]
    for junk in (shuffled[-1], torch.cat([junk_low.to(index_dtype), idxs[-1]]),
                 torch.cat([idxs[-1], junk_high.to(index_dtype)])):
        with pytest.raises(IndexError, match="out of place"):
            kernel.linear_fix(x, again, per_row, [junk], [torch.ones(junk.numel())], [0], [1])
    with pytest.raises(IndexError, match="out of range"):
        kernel.linear_fix(x, again, per_row, idxs[:1], vals[:1], [0], [ends[-1] + 1])


def test_single_task_batches_stay_bit_exact_with_the_mode_on(tiny_bert, engine):
    """The hooks do nothing outside a mixed batch: a swapped-in task answers exactly as without."""
    d = deltas(tiny_bert, ["classify"])[0]
    p = prepare(d, tiny_bert, name="t")
    jobs = [ClassifyJob(texts=tuple(SENTENCES))]
    with_hooks = run_parts(engine, [("acme/t", p, jobs)])
    engine.restore_base()
    engine.mixer.close()
    without = run_parts(engine, [("acme/t", p, jobs)])
    assert with_hooks == without


def test_tasks_that_cannot_be_mixed_say_why(tiny_bert, tiny_bert_dir, engine):
    bf16 = load_base(tiny_bert_dir, device="cpu", dtype="bfloat16")
    mixer = Mixer(bf16)
    try:
        assert "float32" in mixer.why_not(prepare(random_delta(bf16, 0.01, kind="embed"), bf16))
    finally:
        mixer.close()
    p = prepare(deltas(tiny_bert, ["classify"])[0], tiny_bert)
    mixer = engine.mixer
    norm = next(n for n in p.names if "LayerNorm" in n)
    mixer._targets.pop(norm)  # as if the delta touched a module kind the mixer cannot correct
    try:
        assert norm in mixer._why_not(p)
        assert mixer.why_not(prepare(deltas(tiny_bert, ["classify"])[0], tiny_bert)) is not None
    finally:
        mixer._targets = mixer._find_targets()


def test_peek_sees_only_the_pinned_fresh_version_and_the_mixed_form_is_counted(tiny_bert, engine):
    p = prepare(deltas(tiny_bert, ["classify"])[0], tiny_bert, name="t")
    cache = DeltaCache(1 << 30)
    registry = TaskRegistry(tiny_bert, store=None, cache=cache)  # type: ignore[arg-type]
    engine._grow_cache = registry.grow
    ref = TaskRef("acme", "t", "classify", 1)
    assert registry.peek(ref) is None
    cache.put(("acme", "t"), CacheEntry(version=1, value=Loaded(1, p), nbytes=p.nbytes))
    assert registry.peek(ref).prepared is p
    assert registry.peek(TaskRef("acme", "t", "classify", 2)) is None  # another version
    cache._entries[("acme", "t")].checked_at -= registry.version_check_s + 1
    assert registry.peek(ref) is None  # due for a version check: the normal path does it
    run_parts(engine, [("acme/t", p, [ClassifyJob(texts=("x",))]),
                       ("acme/base", None, [EmbedJob(texts=("y",))])])
    assert cache.nbytes == p.nbytes + engine.mixer.cached(p).nbytes > p.nbytes


# --- the scheduler ---------------------------------------------------------------------------


async def scheduled_parts(base: Base, mixed: bool) -> tuple[list[int], list]:
    """Four tasks' classify requests queued while the worker is held: how many tasks each
    micro-batch served, and the answers."""
    store = MemoryStore(base)
    made = deltas(base, ["classify"] * 4)
    for i, d in enumerate(made):
        store.put("acme", f"t{i}", dumps(d), "classify")
    engine = Engine(base, store, get_settings(mixed_batches=mixed, max_batch=16))
    sched, parts_per_batch, release = engine.scheduler, [], threading.Event()
    step = engine.executor.step

    def logged(plan):
        assert release.wait(10), "the test never released the worker"
        parts_per_batch.append(len(plan.encode))
        return step(plan)

    engine.executor.step = logged  # type: ignore[method-assign]
    try:
        refs = [await engine.registry.resolve("acme", f"t{i}", "classify") for i in range(4)]
        for ref in refs:  # loaded (and cached) before the burst: all of them can mix
            await engine.registry.load(ref)
        sched.start()
        work = [asyncio.ensure_future(sched.submit(refs[n % 4], ClassifyJob(texts=(SENTENCES[n % 5],))))
                for n in range(12)]
        await asyncio.sleep(0.1)  # all queued (and ready) before the first step runs
        release.set()
        answers = await asyncio.gather(*work)
    finally:
        release.set()
        await sched.stop()
        engine.close()
    return parts_per_batch, answers


def test_scheduler_mixes_loaded_tasks_into_one_micro_batch_only_when_on(tiny_bert):
    on, answers_on = asyncio.run(scheduled_parts(tiny_bert, mixed=True))
    off, answers_off = asyncio.run(scheduled_parts(tiny_bert, mixed=False))
    assert max(on) > 1, "no micro-batch served several tasks"
    assert max(off) == 1 and len(off) >= 4
    for a, b in zip(answers_on, answers_off, strict=True):
        assert max_diff(a.rows, b.rows) <= PROB_ATOL
    assert Settings().mixed_batches is True  # the default since mixed decode (issue 13)


# --- end to end ------------------------------------------------------------------------------


def test_live_server_with_mixed_batches_serves_each_task_its_own_answers(
        tiny_bert, tiny_bert_dir, redis_proc, tmp_path, live_server, monkeypatch):
    monkeypatch.setenv("TASKDELTA_MIXED_BATCHES", "1")
    s = Settings(redis_url=redis_proc.url, data_dir=tmp_path / "data", auth=False)
    assert s.mixed_batches
    made = deltas(tiny_bert, ["classify"] * 4)
    want = {f"t{i}": merged_outputs(tiny_bert_dir, d, [ClassifyJob(texts=(t,)) for t in SENTENCES])
            for i, d in enumerate(made)}
    before = {n: bits(p).clone() for n, p in tiny_bert.params.items()}
    with live_server(create_app(s, base=tiny_bert)) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            for i, d in enumerate(made):
                assert c.put(f"/v1/tasks/t{i}", content=dumps(d)).status_code == 201
                assert c.post(f"/v1/tasks/t{i}/classify", json={"texts": ["x"]}).status_code == 200

        async def burst() -> list:
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                asks = [(f"t{n % 4}", n % len(SENTENCES)) for n in range(64)]
                rs = await asyncio.gather(*(c.post(f"/v1/tasks/{t}/classify",
                                                   json={"texts": [SENTENCES[k]]})
                                            for t, k in asks))
                return [(t, k, r) for (t, k), r in zip(asks, rs, strict=True)]

        worst = 0.0
        for task, k, r in asyncio.run(burst()):
            assert r.status_code == 200, r.text
            worst = max(worst, max_diff(r.json()["results"][0], want[task][k][0]))
        metrics = httpx.get(f"{srv.url}/metrics").text
        mixed = srv.state.scheduler.mixed_batches
    print(f"\nlive mixed batches: {mixed}, max abs diff vs merged {worst:.2e}")
    assert mixed >= 1 and "taskdelta_mixed_batches_total" in metrics
    assert worst <= PROB_ATOL
    assert all(torch.equal(bits(p), before[n]) for n, p in tiny_bert.params.items()), \
        "the base changed"
