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

from taskdelta.deltas import Base, _mixed_kernel, load_base, merge_into, prepare, random_delta
from taskdelta.deltas.mixed import Mixer
from taskdelta.server.app import create_app
from taskdelta.server.cache import CacheEntry, DeltaCache
from taskdelta.server.engine import Engine
from taskdelta.server.inference import classify, embed
from taskdelta.server.jobs import ClassifyJob, EmbedJob, GenerateJob
from taskdelta.server.scheduler import Mixing, Scheduler
from taskdelta.server.settings import Settings

PROB_ATOL = 1e-5  # probabilities and embeddings: mixed vs the merged model
SENTENCES = ["a gripping , funny film", "dull", "it is neither here nor there , and it knows it",
             "the cast is wonderful", "an utter mess from start to finish"]
PAIR = ("a man is playing a guitar", "someone plays music")
LABELS = ["neg", "pos", "meh"]
_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(_INT_VIEW[t.element_size()])


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
    eng = Engine(tiny_bert, store=None, cache=DeltaCache(1 << 30), mixed=True)  # type: ignore[arg-type]
    yield eng
    eng.restore_base()
    eng.mixer.close()


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
    engine.execute("acme/t1", prepared[1], jobs[1])  # a task swapped in: mixing restores first
    base_embed = [EmbedJob(texts=("plain base",))]
    parts = [(f"acme/t{i}", p, j) for i, (p, j) in enumerate(zip(prepared, jobs, strict=True))]
    parts.insert(2, ("acme/base", None, base_embed))
    got = engine.execute_mixed(parts)
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
def test_linear_kernel_equals_dense_products_for_any_run_length_and_skips_out_of_place_indices(
        index_dtype):
    """Runs of 1 to 130 rows (one pass and several, 8-row vectors full and not), a base gap, two
    tokens a row; indices below a column's first or past the matrix are skipped, not read; the
    same call twice gives the same bits."""
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
        idxs.append(torch.cat([junk_low, flat, junk_high]).to(index_dtype))
        vals.append(torch.cat([torch.full((2,), 1e30), dense.flatten()[flat], torch.full((3,), 1e30)]))
        rows = slice(per_row * a, per_row * b)
        want[rows] += x[rows].double() @ dense.double().t()
    got = y.clone()
    kernel.linear_fix(x, got, per_row, idxs, vals, starts, ends)
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=0)
    again = y.clone()
    kernel.linear_fix(x, again, per_row, idxs, vals, starts, ends)
    assert torch.equal(bits(got), bits(again))
    shuffled = [i[torch.randperm(i.numel(), generator=gen)].contiguous() for i in idxs]
    kernel.linear_fix(x, again, per_row, shuffled, vals, starts, ends)  # wrong sums, in bounds
    with pytest.raises(RuntimeError, match="out of range"):
        kernel.linear_fix(x, again, per_row, idxs[:1], vals[:1], [0], [ends[-1] + 1])


def test_single_task_batches_stay_bit_exact_with_the_mode_on(tiny_bert, engine):
    """The hooks do nothing outside a mixed batch: a swapped-in task answers exactly as without."""
    d = deltas(tiny_bert, ["classify"])[0]
    p = prepare(d, tiny_bert, name="t")
    jobs = [ClassifyJob(texts=tuple(SENTENCES))]
    with_hooks = engine.execute("acme/t", p, jobs)
    engine.restore_base()
    engine.mixer.close()
    without = engine.execute("acme/t", p, jobs)
    assert with_hooks == without


def test_tasks_that_cannot_be_mixed_say_why(tiny_bert, tiny_bert_dir, tiny_llama, engine):
    mixer = Mixer(tiny_llama)  # RMSNorm, rotary attention, a last-token head: not supported
    try:
        p = prepare(random_delta(tiny_llama, 0.01, kind="embed"), tiny_llama)
        assert "not support" in mixer.why_not(p)
    finally:
        mixer.close()
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
    assert not engine.mixable(p, GenerateJob(prompt="x", params=None))  # type: ignore[arg-type]
    assert not engine.mixable(None, EmbedJob(texts=("x",)))  # the base: not mixed


def test_peek_sees_only_cached_recently_confirmed_deltas_and_counts_their_bytes(tiny_bert, engine):
    p = prepare(deltas(tiny_bert, ["classify"])[0], tiny_bert, name="t")
    assert engine.peek("acme/t") is None
    engine.cache.put(("acme", "t"), CacheEntry(version=1, value=p, nbytes=p.nbytes))
    assert engine.peek("acme/t") is p
    assert engine.peek("acme/base") is None
    engine.cache._entries[("acme", "t")].checked_at -= engine.version_check_s + 1
    assert engine.peek("acme/t") is None  # due for a version check: the normal path does it
    engine.execute_mixed([("acme/t", p, [ClassifyJob(texts=("x",))])])
    assert engine.cache.nbytes == p.nbytes + engine.mixer.cached(p).nbytes > p.nbytes


# --- the scheduler ---------------------------------------------------------------------------


class FakeMixModel:
    """execute / execute_mixed doubles: which tasks ran together; a gate holds the first batch."""

    def __init__(self, loaded: set[str], refuse: set[str] = frozenset()) -> None:
        self.loaded, self.refuse = loaded, refuse
        self.batches: list[list[tuple[str, list]]] = []
        self.gate = threading.Event()

    def execute(self, task: str, handle: Any, payloads: list) -> list:
        if payloads == ["hold"]:
            assert self.gate.wait(10)
        self.batches.append([(task, list(payloads))])
        return [f"{task}:{p}" for p in payloads]

    def execute_mixed(self, parts: list) -> list:
        self.batches.append([(t, list(ps)) for t, _, ps in parts])
        return [f"{t}:{p}" for t, _, ps in parts for p in ps]

    async def load(self, task: str) -> str:
        return f"h:{task}"

    def mixing(self) -> Mixing:
        return Mixing(peek=lambda t: f"h:{t}" if t in self.loaded else None,
                      accepts=lambda h, p: h is not None and h[2:] not in self.refuse
                      and p != "gen", execute=self.execute_mixed)


async def run_scheduled(model: FakeMixModel, requests: list[tuple[str, str]], mixing: bool,
                        max_batch: int = 8) -> tuple[list, Scheduler]:
    s = Scheduler(model.execute, model.load, max_batch=max_batch, max_wait_ms=0, max_queue=64,
                  max_queued_total=256, max_consecutive_batches=8, max_hold_ms=1000,
                  retry_after_s=1, mixing=model.mixing() if mixing else None)
    s.start()
    hold = asyncio.create_task(s.submit("first", "hold"))
    while not s._executing:
        await asyncio.sleep(0.001)
    pending = []
    for task, payload in requests:  # queued while the first batch holds the worker
        pending.append(asyncio.create_task(s.submit(task, payload)))
        await asyncio.sleep(0)
    model.gate.set()
    answers = await asyncio.gather(hold, *pending)
    await s.stop()
    return answers, s


def test_scheduler_fills_a_batch_across_tasks_only_with_loaded_mixable_requests():
    model = FakeMixModel(loaded={"a", "b", "c", "d"}, refuse={"c"})
    reqs = [("a", "1"), ("b", "2"), ("cold", "3"), ("b", "4"), ("c", "5"), ("d", "gen"),
            ("b", "6")]
    answers, s = asyncio.run(run_scheduled(model, reqs, mixing=True))
    assert answers == ["first:hold"] + [f"{t}:{p}" for t, p in reqs]
    mixed = model.batches[1]
    assert mixed == [("a", ["1"]), ("b", ["2", "4", "6"])]  # cold, refused c, d's generate: not
    alone = sorted(b[0][0] for b in model.batches[2:])
    assert alone == ["c", "cold", "d"] and all(len(b) == 1 for b in model.batches[2:])
    assert s.mixed_batches == 1


def test_scheduler_mixes_oldest_first_up_to_max_batch():
    model = FakeMixModel(loaded={f"t{i}" for i in range(6)})
    reqs = [(f"t{i % 6}", str(i)) for i in range(12)]
    asyncio.run(run_scheduled(model, reqs, mixing=True, max_batch=5))
    first = model.batches[1]  # the picked task's whole queue, then the oldest of the others
    assert first == [("t0", ["0", "6"]), ("t1", ["1"]), ("t2", ["2"]), ("t3", ["3"])]
    assert sum(len(ps) for b in model.batches[1:] for _, ps in b) == 12


def test_with_the_mode_off_batches_stay_one_task_each():
    model = FakeMixModel(loaded={"a", "b"})
    reqs = [("a", "1"), ("b", "2"), ("a", "3")]
    answers, s = asyncio.run(run_scheduled(model, reqs, mixing=False))
    assert answers[1:] == ["a:1", "b:2", "a:3"]
    assert all(len(b) == 1 for b in model.batches) and s.mixed_batches == 0
    assert Settings().mixed_batches is False


# --- end to end ------------------------------------------------------------------------------


def test_live_server_with_mixed_batches_serves_each_task_its_own_answers(
        tiny_bert, tiny_bert_dir, redis_proc, tmp_path, live_server, monkeypatch):
    from taskdelta.deltas import dumps

    monkeypatch.setenv("TASKDELTA_MIXED_BATCHES", "1")
    s = Settings(redis_url=redis_proc.url, data_dir=tmp_path / "data", auth=False,
                 max_wait_ms=0.0)
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
