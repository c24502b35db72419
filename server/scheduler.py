"""The step loop: continuous batching over one model, as in Orca, vLLM and TGI.

Requests are admitted into bounded queues (`queues.py`), their task's pinned version is loaded
under their deadline (`registry.py`), and then every *step* runs in the engine's worker thread
(`executor.py`): at most one classify/embed micro-batch bounded in rows and rows x tokens, up to
`prefill_tokens` of prompt prefill (long prompts in chunks), and one decode token for every live
sequence. New generations join the running decode groups between steps; finished, cancelled and
expired ones leave at the next step, so a 504 or a closed stream frees its slot at once. What to
run is decided by `policy.py` (and, for classify/embed, by `microbatch.py`); the loop only carries
it out and hands back the answers.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from .errors import BadTaskRequest, DeadlineExceeded, Overloaded
from .executor import Executor, Prefill, StepPlan, StepReport
from .jobs import GenerateJob, Job
from .kv import DecodeGroup
from .microbatch import MicroBatches, OnBatch, Taken
from .policy import TurnPolicy, kv_fits
from .queues import Queues, Request
from .registry import Loaded, TaskRef, TaskRegistry
from .sequences import Sequence

log = logging.getLogger("taskdelta.scheduler")
MIXED = ("mixed",)  # the key of the decode group whose rows belong to several tasks


@dataclass(frozen=True)
class Limits:
    max_batch: int = 16  # rows (texts) per classify/embed forward
    max_batch_tokens: int = 8192  # rows x padded tokens per classify/embed forward
    max_queue: int = 256
    max_queued_total: int = 4096
    max_consecutive_batches: int = 8
    max_hold_ms: float = 200.0
    retry_after_s: float = 1.0
    request_timeout_s: float = 60.0
    max_live_sequences: int = 64
    kv_cache_bytes: int = 2 * 1024**3
    prefill_tokens: int = 512  # prompt tokens read per step


class Scheduler:
    def __init__(self, registry: TaskRegistry, executor: Executor, limits: Limits, *,
                 measure: Callable[[Job], list[int]],
                 new_sequence: Callable[[GenerateJob], Sequence],
                 kv_per_token: int = 0, mixed: bool = False,
                 on_batch: OnBatch | None = None,
                 on_mixed: Callable[[int, int], None] | None = None) -> None:
        self.registry = registry
        self.executor = executor
        self.limits = limits
        self._measure = measure  # tokens per text of a classify/embed job (any thread)
        self._new_sequence = new_sequence  # a generate job's Sequence (any thread)
        self._kv_per_token = kv_per_token
        self._mixed = mixed and executor.mixer is not None
        self.queues = Queues(limits.max_queue, limits.max_queued_total, limits.retry_after_s)
        self.turns = TurnPolicy(limits.max_consecutive_batches, limits.max_hold_ms)
        self.encode = MicroBatches(self.queues, self.turns, limits.max_batch,
                                   limits.max_batch_tokens, mixer=executor.mixer, mixed=self._mixed,
                                   settle=_settle, on_batch=on_batch, on_mixed=on_mixed)
        self._prefilling: list[Prefill] = []
        self._groups: dict[tuple, tuple[DecodeGroup, Loaded]] = {}  # (task, version) or MIXED
        self._live: dict[Sequence, Request] = {}  # admitted to decode, prefilling or decoding
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._accepting = True
        self._stopping = False
        self._worker: asyncio.Task[None] | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taskdelta-engine")
        self.steps = 0

    # -- what the rest of the server reads ------------------------------------------------------

    @property
    def swaps(self) -> int:
        return self.executor.swaps

    @property
    def batches(self) -> int:
        """Classify/embed micro-batches run."""
        return self.encode.batches

    @property
    def mixed_batches(self) -> int:
        return self.encode.mixed_batches

    @property
    def total_depth(self) -> int:
        return self.queues.total

    @property
    def live_sequences(self) -> int:
        return len(self._live)

    def depth(self, key) -> int:
        return self.queues.depth(key)

    def queued_tasks(self) -> list:
        return self.queues.tasks()

    # -- submitting -------------------------------------------------------------------------------

    async def submit(self, ref: TaskRef, job: Job, timeout_s: float | None = None) -> Any:
        """Admit one request, load its task, wait for its answer (or its exception)."""
        if not self._accepting:
            raise Overloaded("the server is shutting down", self.limits.retry_after_s)
        loop = asyncio.get_running_loop()
        now = loop.time()
        timeout = self.limits.request_timeout_s if timeout_s is None else timeout_s
        req = Request(ref, job, loop.create_future(), next(self._seq), now, now + timeout)
        self.queues.admit(req)  # 429 here, before any work
        expiry = asyncio.timeout_at(req.deadline)
        try:
            async with expiry:
                await self._prepare(req)
                self.queues.line_up(req)
                self._wakeup.set()
                return await req.future
        except TimeoutError:
            if not expiry.expired():
                raise
            raise DeadlineExceeded(self._late(req)) from None
        finally:
            self._withdraw(req)

    async def _prepare(self, req: Request) -> None:
        """Tokenize (in a thread) and load the pinned delta: the request becomes ready."""
        if isinstance(req.job, GenerateJob):
            req.sequence = await asyncio.to_thread(self._new_sequence, req.job)
            self._check_kv_need(req.sequence)
        else:
            req.lengths = await asyncio.to_thread(self._measure, req.job)
            req.order = sorted(range(len(req.lengths)), key=req.lengths.__getitem__)
        req.loaded = await self.registry.load(req.ref)

    def _check_kv_need(self, seq: Sequence) -> None:
        need = seq.reserved_tokens * self._kv_per_token
        if need > self.limits.kv_cache_bytes:
            raise BadTaskRequest(f"the prompt and max_new_tokens ({seq.reserved_tokens} positions) "
                                 f"need {need} bytes of KV cache; this server has "
                                 f"{self.limits.kv_cache_bytes}: ask for fewer tokens")

    def _withdraw(self, req: Request) -> None:
        if not req.future.done():  # timed out or cancelled: its sequence leaves at the next step
            req.future.cancel()
            if isinstance(req.job, GenerateJob):
                req.job.cancelled.set()
        self.queues.leave(req)
        self._wakeup.set()

    def _late(self, req: Request) -> str:
        return (f"request for task {req.ref.name!r} did not finish within "
                f"{req.deadline - req.enqueued_at:g} s")

    # -- the loop ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="taskdelta-steps")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            plan, encoded = self._plan()
            if plan is None:
                if self._stopping and not self.queues.total and not self._live:
                    return
                self.turns.idle()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            started = loop.time()
            try:
                report = await loop.run_in_executor(self._thread, self.executor.step, plan)
            except Exception as exc:  # the executor itself failed: fail what the step held
                log.exception("engine step failed")
                report = StepReport(encode_error=exc,
                                    prefill_errors=[(w, exc) for w, _ in plan.prefill],
                                    decode_errors=[(g, exc) for g, _ in plan.decode])
            self.steps += 1
            self._absorb(plan, encoded, report, loop.time() - started)

    def _plan(self) -> tuple[StepPlan | None, Taken]:
        plan = StepPlan()
        encoded = self.encode.plan(plan, asyncio.get_running_loop().time())
        self._admit_sequences()
        budget = self.limits.prefill_tokens
        for work in self._prefilling:
            if budget <= 0:
                break
            tokens = min(budget, len(work.seq.prompt) - work.seq.prefilled)
            plan.prefill.append((work, tokens))
            budget -= tokens
        plan.decode = [(g, loaded.prepared) for g, loaded in self._groups.values() if len(g)]
        empty = not (plan.encode or plan.prefill or plan.decode)
        return (None if empty else plan), encoded

    # -- generation: admission into decode ----------------------------------------------------------

    def _admit_sequences(self) -> None:
        """Move ready generations into prefill while decode slots and KV room allow, in order."""
        waiting = self.queues.generate
        for req in [r for r in waiting if r.gone]:
            self.queues.leave(req)
        while waiting and len(self._live) < self.limits.max_live_sequences:
            req = waiting[0]
            if req.loaded is None or not self._kv_room(req):
                break  # in arrival order: a later one does not overtake a waiting one
            waiting.popleft()
            seq = req.sequence
            assert seq is not None
            key = self._group_key(req)
            if key not in self._groups:
                self._groups[key] = (DecodeGroup(mixed=key == MIXED), req.loaded)
            self._live[seq] = req
            self._prefilling.append(Prefill(seq, req.loaded.prepared, self._groups[key][0],
                                            str(req.key)))

    def _group_key(self, req: Request) -> tuple:
        """Where a generation decodes: the shared mixed group when its delta can be applied as a
        correction (or it is the base), else a group of its own task's version (swapped in)."""
        assert req.loaded is not None
        prepared = req.loaded.prepared
        mixer = self.executor.mixer
        if self._mixed and (prepared is None or (mixer is not None and mixer.why_not(prepared) is None)):
            return MIXED
        return (req.ref.tenant, req.ref.name, req.loaded.version)

    def _kv_room(self, req: Request) -> bool:
        if not self._kv_per_token:
            return True
        seq = req.sequence
        assert seq is not None and req.loaded is not None
        target = self._group_key(req)
        shapes = self._kv_shapes()
        rows, longest = shapes.pop(target, (0, 0))
        shapes[target] = (rows + 1, max(longest, seq.reserved_tokens))
        return kv_fits(shapes.values(), self._kv_per_token, self.limits.kv_cache_bytes)

    def _kv_shapes(self) -> dict[tuple, tuple[int, int]]:
        """Per decode group, with the sequences still prefilling into it: (rows, longest)."""
        shapes: dict[tuple, tuple[int, int]] = {}
        for seq, req in self._live.items():
            key = self._group_key(req)
            rows, longest = shapes.get(key, (0, 0))
            shapes[key] = (rows + 1, max(longest, seq.reserved_tokens))
        return shapes

    # -- after a step -----------------------------------------------------------------------------

    def _absorb(self, plan: StepPlan, encoded: Taken,
                report: StepReport, run_s: float) -> None:
        if plan.encode:
            self.encode.answer(plan, encoded, report, run_s)
        for work, exc in report.prefill_errors:
            self._end_sequence(work.seq, exc)
        for group, exc in report.decode_errors:
            for seq in list(group.rows):
                self._end_sequence(seq, exc)
            group.keep([])
        for seq in report.finished:
            self._end_sequence(seq)
        self._prefilling = [w for w in self._prefilling
                            if w.seq in self._live and w.seq.prefilled < len(w.seq.prompt)]
        self._groups = {k: v for k, v in self._groups.items() if len(v[0])
                        or any(w.group is v[0] for w in self._prefilling)}
        self._expire_live()

    def _end_sequence(self, seq: Sequence, error: BaseException | None = None) -> None:
        req = self._live.pop(seq, None)
        if req is None:
            return
        version = req.loaded.version if req.loaded else None
        _settle(req, error if error is not None else seq.result(version))
        self.queues.leave(req)

    def _expire_live(self) -> None:
        """Live sequences whose request is gone (504, client left) stop at the next step."""
        now = asyncio.get_running_loop().time()
        for seq, req in self._live.items():
            if req.gone or now >= req.deadline:
                seq.job.cancelled.set()

    # -- stopping ---------------------------------------------------------------------------------

    async def stop(self, *, drain: bool = False) -> None:
        """Stop accepting; fail what waits (or, with `drain`, run it first); join the worker."""
        self._accepting = False
        if not drain:
            error = Overloaded("the server is shutting down", self.limits.retry_after_s)
            for req in self.queues.all_waiting() + list(self._live.values()):
                _settle(req, error)
                if isinstance(req.job, GenerateJob):
                    req.job.cancelled.set()
        self._stopping = True
        self._wakeup.set()
        if self._worker is not None:
            with suppress(asyncio.CancelledError):
                await self._worker
        await asyncio.to_thread(self._thread.shutdown, True)


def _settle(req: Request, outcome: Any) -> None:
    """Hand one outcome to its request; an exception instance fails it."""
    if req.future.done():
        return
    if isinstance(outcome, BaseException):
        req.future.set_exception(outcome)
    else:
        req.future.set_result(outcome)
