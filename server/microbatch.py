"""Classify/embed micro-batches: which requests' texts the next step encodes, and their answers.

Each step encodes at most one micro-batch, bounded in rows and rows x tokens (`RowBudget`). The
task whose turn it is (`TurnPolicy`) goes first; with mixed batches on, other tasks' requests whose
deltas the mixer can apply as corrections fill the rest of the budget, oldest line first. One delta
per task in a micro-batch: requests pinned to another version of the same task wait for a later
one. A request's texts are taken shortest first and may span several micro-batches; it is answered
when its last text is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from .executor import EncodePart, StepPlan, StepReport
from .policy import RowBudget, TurnPolicy, take_rows
from .queues import Queues, Request

log = logging.getLogger("taskdelta.scheduler")
OnBatch = Callable[[str, int, list[float], float], None]
Taken = list[tuple[Request, tuple[int, ...]]]  # requests and which of their texts a micro-batch holds


@dataclass(frozen=True)
class EncodeResult:
    """A classify/embed request's rows and the task version that computed them."""

    rows: list[Any]
    version: int | None


class MicroBatches:
    """Plans the encode part of each step and hands its answers back to the requests."""

    def __init__(self, queues: Queues, turns: TurnPolicy, max_rows: int, max_tokens: int, *,
                 mixer: Any, mixed: bool, settle: Callable[[Request, Any], None],
                 on_batch: OnBatch | None = None,
                 on_mixed: Callable[[int, int], None] | None = None) -> None:
        self.queues, self.turns = queues, turns
        self.max_rows, self.max_tokens = max_rows, max_tokens
        self.mixer = mixer
        self.mixed = mixed  # the scheduler's setting, already off where there is no mixer
        self._settle = settle
        self._on_batch = on_batch
        self._on_mixed = on_mixed  # (tasks, requests) of each mixed micro-batch
        self.batches = 0  # micro-batches run
        self.mixed_batches = 0

    # -- planning ---------------------------------------------------------------------------------

    def plan(self, plan: StepPlan, now: float) -> Taken:
        """Fill `plan.encode`; returns the requests' slices it holds (for `answer`)."""
        self._drop_gone()
        ready = self.queues.ready_encode_tasks()
        if not ready:
            return []
        key = self.turns.pick(ready, self._oldest, now)
        budget = RowBudget(self.max_rows, self.max_tokens)
        taken = self._take(key, budget)
        if self.mixed and self._mixable(taken) and not budget.full:
            for other in sorted((k for k in ready if k != key), key=self._oldest):
                more = self._take(other, budget, mixable_only=True)
                taken += more
                if budget.full or not more:
                    break
        parts = self._parts(taken)
        plan.encode = parts
        self.turns.ran(key if len(parts) == 1 else None, now)
        return taken

    def _take(self, key, budget: RowBudget, mixable_only: bool = False) -> Taken:
        line = [r for r in self.queues.encode.get(key, ()) if r.loaded is not None]
        if line:  # one delta per task in a micro-batch (requests pinned to another version wait)
            anchor = line[0].loaded.prepared  # type: ignore[union-attr]
            line = [r for r in line if r.loaded.prepared is anchor]  # type: ignore[union-attr]
        if mixable_only:
            line = [r for r in line if self._mixable([(r, ())])]
        slices = take_rows(((r, [r.lengths[i] for i in r.order]) for r in line), budget)
        taken = []
        for s in slices:
            req: Request = s.owner  # type: ignore[assignment]
            texts = tuple(req.order[i] for i in s.indices)
            del req.order[: len(s.indices)]
            taken.append((req, texts))
        self.queues.drop_taken(key)
        return taken

    def _mixable(self, taken: Taken) -> bool:
        for req, _ in taken:
            prepared = req.loaded.prepared if req.loaded else None
            if self.mixer is None or prepared is None or self.mixer.why_not(prepared) is not None:
                return False
        return True

    def _parts(self, taken: Taken) -> list[EncodePart]:
        """One part per loaded delta, its requests' slices as sub-jobs in `taken`'s order within
        each part (`answer` walks them the same way)."""
        parts: dict[int, EncodePart] = {}
        for req, texts in taken:
            loaded = req.loaded
            assert loaded is not None
            sub = replace(req.job, texts=tuple(req.job.texts[i] for i in texts))  # type: ignore[type-var]
            part = parts.get(id(loaded.prepared))
            if part is None:
                part = parts[id(loaded.prepared)] = EncodePart(str(req.key), loaded.prepared,
                                                               loaded.labels, [])
            part.jobs.append(sub)
        return list(parts.values())

    def _oldest(self, key) -> int:
        line = self.queues.encode.get(key)
        return line[0].seq if line else 1 << 62

    def _drop_gone(self) -> None:
        for line in list(self.queues.encode.values()):
            for req in [r for r in line if r.gone]:
                self.queues.leave(req)

    # -- after the step ---------------------------------------------------------------------------

    def answer(self, plan: StepPlan, taken: Taken, report: StepReport, run_s: float) -> None:
        """Hand each request its rows; a request whose last text ran is settled and leaves."""
        self.batches += 1
        self.mixed_batches += len(plan.encode) > 1
        if report.encode_error is not None:
            for req, _ in taken:
                self._settle(req, report.encode_error)
                self.queues.leave(req)
            return
        by_part = {id(part.prepared): iter(got) for part, got in zip(plan.encode, report.encoded,
                                                                       strict=True)}
        for req, texts in taken:
            answers = next(by_part[id(req.loaded.prepared if req.loaded else None)])
            for i, answer in zip(texts, answers, strict=True):
                req.answers[i] = answer
            if len(req.answers) == len(req.lengths):
                loaded = req.loaded
                rows = [req.answers[i] for i in range(len(req.lengths))]
                self._settle(req, EncodeResult(rows, loaded.version if loaded else None))
                self.queues.leave(req)
        self._report(plan, taken, run_s)

    def _report(self, plan: StepPlan, taken: Taken, run_s: float) -> None:
        now = asyncio.get_running_loop().time()
        waits = [now - run_s - r.enqueued_at for r, _ in taken]
        try:
            if self._on_batch is not None:
                self._on_batch(plan.encode[0].key, len(taken), waits, run_s)
            if self._on_mixed is not None and len(plan.encode) > 1:
                self._on_mixed(len(plan.encode), len(taken))
        except Exception:
            log.exception("a batch hook failed")
