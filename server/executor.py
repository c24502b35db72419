"""The executor: the only code that writes the base's weights. Runs in the engine's worker thread.

One step (`step`) does what the scheduler planned: at most one classify/embed micro-batch, some
prompt prefill (chunks of at most the planned tokens), and one decode token for every live row.
Each forward runs on the weights of the task it serves: `swap_to` swaps that task's delta in
(bit-exact, restoring the saved base values first), or, for a classify/embed micro-batch of
several tasks, runs the untouched base with each delta as a sparse correction on its own rows.
A task stays swapped in after its forward, so consecutive forwards of one task swap nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from taskdelta.deltas import Base, PreparedDelta, Swapper
from taskdelta.deltas.mixed import MixedDelta, Mixer

from .inference import MixedPart, classify, classify_mixed, embed, embed_mixed
from .jobs import HEAD_JOBS, EmbedJob, Job
from .kv import DecodeGroup, Owner, cache_argument, owner_runs
from .sequences import Sequence

# A mixed micro-batch runs one backbone forward per family: classify and regress tasks share one
# (both read the pooled output, then their own heads), embed tasks have their own.
MIXED_FAMILIES = ((HEAD_JOBS, classify_mixed), ((EmbedJob,), embed_mixed))


@dataclass(frozen=True)
class EncodePart:
    """One task's rows of a classify/embed micro-batch: sub-jobs holding slices of requests."""

    key: str  # "tenant/name", for the mixed form's cache accounting
    prepared: PreparedDelta | None
    labels: tuple[str, ...]
    jobs: list[Job]


@dataclass(eq=False)
class Prefill:
    """A sequence whose prompt is being read into its own cache, chunk by chunk."""

    seq: Sequence
    prepared: PreparedDelta | None
    group: DecodeGroup  # where it goes once its prompt is read
    key: str = ""  # "tenant/name": its task, for the mixed form's cache accounting
    cache: DynamicCache | None = None


@dataclass
class StepPlan:
    encode: list[EncodePart] = field(default_factory=list)
    prefill: list[tuple[Prefill, int]] = field(default_factory=list)  # (work, tokens this step)
    decode: list[tuple[DecodeGroup, PreparedDelta | None]] = field(default_factory=list)


@dataclass
class StepReport:
    encoded: list[list[Any]] = field(default_factory=list)  # per part, per job: its result
    encode_error: BaseException | None = None
    prefill_errors: list[tuple[Prefill, BaseException]] = field(default_factory=list)
    decode_errors: list[tuple[DecodeGroup, BaseException]] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)  # done, or cancelled, this step
    decoded_rows: int = 0


class Executor:
    def __init__(self, base: Base, mixer: Mixer | None = None,
                 on_swap: Callable[[float], None] | None = None,
                 grow_cache: Callable[[str, PreparedDelta, int], None] | None = None) -> None:
        self.base = base
        self.swapper = Swapper(base)
        self.mixer = mixer
        self.on_swap = on_swap
        self._grow_cache = grow_cache  # counts a delta's mixed form in its cache entry
        self.swaps = 0  # times the live weights changed task
        self._cache_arg = cache_argument(base.model) if base.is_causal_lm else "past_key_values"

    @property
    def active(self) -> PreparedDelta | None:
        return self.swapper.active

    def swap_to(self, prepared: PreparedDelta | None) -> None:
        """Make the live weights those of `prepared` (None: the exact base)."""
        if self.swapper.active is prepared:
            return
        started = time.perf_counter()
        if self.swapper.active is not None:
            self.swapper.restore()
        if prepared is not None:
            self.swapper.apply(prepared)
        self.swaps += 1
        if self.on_swap is not None:
            self.on_swap(time.perf_counter() - started)

    def restore_base(self) -> None:
        self.swap_to(None)

    # -- one step ---------------------------------------------------------------------------------

    def step(self, plan: StepPlan) -> StepReport:
        report = StepReport()
        if plan.encode:
            try:
                report.encoded = self.encode(plan.encode)
            except Exception as exc:  # the micro-batch fails; the step goes on
                report.encode_error = exc
        for works, tokens in _prefill_batches(plan.prefill):
            try:
                self.prefill(works, tokens, report)
            except Exception as exc:
                report.prefill_errors += [(w, exc) for w in works]
        for group, prepared in plan.decode:
            try:
                self.decode(group, prepared, report)
            except Exception as exc:
                report.decode_errors.append((group, exc))
        return report

    # -- classify / embed ---------------------------------------------------------------------

    def encode(self, parts: list[EncodePart]) -> list[list[Any]]:
        """Per part, per job: its rows' results. One part: its task swapped in, exact. Several:
        one forward of the base with each part's delta correcting its rows (mixed)."""
        if len(parts) == 1:
            part = parts[0]
            self.swap_to(part.prepared)
            return [self._encode_one(part)]
        return self._encode_mixed(parts)

    def _encode_one(self, part: EncodePart) -> list[Any]:
        results: list[Any] = [None] * len(part.jobs)
        tokenizer = self.base.tokenizer
        for kind, run in ((HEAD_JOBS, self._classify), (EmbedJob, self._embed)):
            idx = [i for i, job in enumerate(part.jobs) if isinstance(job, kind)]
            if idx:
                for i, r in zip(idx, run(tokenizer, part, [part.jobs[i] for i in idx]), strict=True):
                    results[i] = r
        return results

    def _classify(self, tokenizer, part: EncodePart, jobs: list) -> list:
        return classify(self.swapper.task_model, tokenizer, part.labels, jobs)

    def _embed(self, tokenizer, part: EncodePart, jobs: list) -> list:
        return embed(self.base.backbone, tokenizer, jobs)

    def _encode_mixed(self, parts: list[EncodePart]) -> list[list[Any]]:
        assert self.mixer is not None, "mixed micro-batch without a mixer"
        self.swap_to(None)  # the base, exactly: no task swapped in
        tokenizer, backbone = self.base.tokenizer, self.base.backbone
        by_family: dict[int, list[tuple[int, MixedPart]]] = {}
        for n, part in enumerate(parts):
            mixed = self._mixed_form(part) if part.prepared is not None else None
            for f, (kinds, _) in enumerate(MIXED_FAMILIES):
                mine = [j for j in part.jobs if isinstance(j, kinds)]
                if mine:
                    head = part.prepared.head if part.prepared is not None else None
                    by_family.setdefault(f, []).append((n, MixedPart(mixed, head, part.labels, mine)))
        answers: dict[tuple[int, int], list[Any]] = {}
        for f, (_, run) in enumerate(MIXED_FAMILIES):
            group = by_family.get(f, [])
            if group:
                got = run(self.mixer, backbone, tokenizer, [p for _, p in group])
                answers.update({(n, f): list(r) for (n, _), r in zip(group, got, strict=True)})
        return [[answers[(n, _family(job))].pop(0) for job in part.jobs]
                for n, part in enumerate(parts)]

    def _mixed_form(self, part: EncodePart) -> MixedDelta:
        assert self.mixer is not None and part.prepared is not None
        mixed = self.mixer.cached(part.prepared)
        if mixed is None:
            mixed = self.mixer.build(part.prepared)
            if self._grow_cache is not None:
                self._grow_cache(part.key, part.prepared, mixed.nbytes)
        return mixed

    # -- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, works: list[Prefill], tokens: int, report: StepReport) -> None:
        """Read prompt tokens into the caches: one sequence's next `tokens` (a long prompt, in
        chunks), or several whole prompts of one decode group in one left-padded forward. A
        sequence whose prompt is read picks its first token and joins its decode group."""
        for work in [w for w in works if w.seq.cancel_requested()]:
            work.seq.finish = work.seq.finish or "stop"
            report.finished.append(work.seq)
        works = sorted((w for w in works if not w.seq.done), key=_owner_rank(works))
        if not works:
            return
        causal = self.base.model  # the task model is read after the swap below (not a kept head)
        device = _device(causal)
        start = works[0].seq.prefilled  # 0 unless one long prompt is read in chunks
        prompts = [w.seq.prompt[start:start + max(1, tokens)] for w in works]
        width = max(map(len, prompts))
        pads = [width - len(p) for p in prompts]
        ids = torch.tensor([[0] * pad + p for pad, p in zip(pads, prompts, strict=True)], device=device)
        mask = (torch.arange(width)[None, :] >= torch.tensor(pads)[:, None]).long().to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0) + start  # [rows, width]
        cache = works[0].cache if start else DynamicCache(config=causal.config)
        runs = owner_runs([(w.key, w.prepared) for w in works])
        alone = len(runs) == 1 and not self._others_live(works[0])
        with self._weights_for(runs, len(works), alone=alone):
            model = self.swapper.task_model  # after the swap: not a classify task kept swapped in
            out = model(input_ids=ids, attention_mask=mask if any(pads) else None,
                        position_ids=positions, use_cache=True, logits_to_keep=1,
                        **{self._cache_arg: cache})
        for work, prompt in zip(works, prompts, strict=True):
            work.seq.prefilled = start + len(prompt)
        if works[0].seq.prefilled < len(works[0].seq.prompt):
            works[0].cache = cache  # one long prompt: more chunks to come
            return
        self._first_tokens(works, DecodeGroup.of([w.seq for w in works], cache, pads, [0] * len(works),
                                                 [(w.key, w.prepared) for w in works]),
                           out.logits[:, -1].float(), report)

    def _first_tokens(self, works: list[Prefill], block: DecodeGroup, logits: torch.Tensor,
                      report: StepReport) -> None:
        """Each prefilled row's first token; the rows still going join their decode group."""
        for i, work in enumerate(works):
            token = work.seq.pick(logits[i])
            work.seq.push(token)
            block.next_ids[i] = token
            if work.seq.done:
                report.finished.append(work.seq)
            work.cache = None
        block.keep([i for i, w in enumerate(works) if not w.seq.done])
        works[0].group.join(block)

    @torch.no_grad()
    def decode(self, group: DecodeGroup, prepared: PreparedDelta | None, report: StepReport) -> None:
        """Drop rows that were cancelled, then one new token for every row of the group."""
        gone = [s for s in group.rows if s.cancel_requested()]
        for seq in gone:
            seq.finish = seq.finish or "stop"
        report.finished += gone
        group.keep([i for i, s in enumerate(group.rows) if not s.done])
        if not group.rows:
            return
        runs = group.runs() if group.mixed else [(0, len(group), ("", prepared))]
        with self._weights_for(runs, len(group), alone=len(runs) == 1):
            model = self.swapper.task_model  # after the swap: not a classify task kept swapped in
            out = model(**group.step_inputs(_device(model), self._cache_arg))
        logits = out.logits[:, -1].float()  # [rows, vocab]
        report.decoded_rows += len(group.rows)
        for i, seq in enumerate(group.rows):
            token = seq.pick(logits[i])
            seq.push(token)
            group.next_ids[i] = token
            if seq.done:
                report.finished.append(seq)
        group.keep([i for i, s in enumerate(group.rows) if not s.done])


    # -- whose weights a forward runs on --------------------------------------------------------

    def _weights_for(self, runs: list[tuple[int, int, Owner]], rows: int, alone: bool):
        """One delta for every row (`alone`): swapped in, exact. Several: the untouched base with
        each run's delta as a correction on its rows (within rounding of the merged models)."""
        if alone:
            self.swap_to(runs[0][2][1])
            return contextlib.nullcontext()
        assert self.mixer is not None, "a mixed forward without a mixer"
        self.swap_to(None)
        segments = [(a, b, self._mixed_form(EncodePart(key, p, (), [])) if p is not None else None)
                    for a, b, (key, p) in runs]
        return self.mixer.mixing(segments, rows)

    @staticmethod
    def _others_live(work: Prefill) -> bool:
        """Whether the mixed group this sequence joins decodes rows of another delta."""
        return work.group.mixed and any(p is not work.prepared for _, p in work.group.owners)


def _family(job: Job) -> int:
    """The index of the MIXED_FAMILIES entry that runs a job."""
    return next(f for f, (kinds, _) in enumerate(MIXED_FAMILIES) if isinstance(job, kinds))


def _prefill_batches(planned: list[tuple[Prefill, int]]) -> list[tuple[list[Prefill], int]]:
    """Whole prompts bound for one decode group go in one forward; a prompt read in chunks (it
    started before, or does not end this step) goes alone."""
    batches: dict[int, list[Prefill]] = {}
    alone: list[tuple[list[Prefill], int]] = []
    for work, tokens in planned:
        whole = work.seq.prefilled == 0 and tokens >= len(work.seq.prompt)
        if whole:
            batches.setdefault(id(work.group), []).append(work)
        else:
            alone.append(([work], tokens))
    return [(works, max(len(w.seq.prompt) for w in works)) for works in batches.values()] + alone


def _owner_rank(works: list[Prefill]):
    """Sort key that puts the works of one delta next to each other (first appearance order)."""
    rank: dict[int, int] = {}
    for w in works:
        rank.setdefault(id(w.prepared), len(rank))
    return lambda w: rank[id(w.prepared)]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
