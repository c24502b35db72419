"""The serving core wired together for one base: task registry, executor and step scheduler.

    route -> registry.resolve (pinned version) -> scheduler.submit -> registry.load (that version)
          -> scheduler step (policy) -> executor (the only code that writes weights)

`Engine` only builds these from the settings and gives the scheduler the two base-specific
helpers it needs: how many tokens a classify/embed text takes, and a `Sequence` for a prompt.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable

from taskdelta.deltas import Base
from taskdelta.deltas.mixed import Mixer

from .cache import DeltaCache
from .executor import Executor
from .inference import max_tokens, measure
from .jobs import GenerateJob, Job
from .kv import kv_bytes_per_token
from .microbatch import OnBatch
from .registry import TaskRegistry
from .scheduler import Limits, Scheduler
from .sequences import Sequence, eos_ids, prompt_ids
from .settings import Settings
from .store import DeltaStore


def limits_of(settings: Settings) -> Limits:
    return Limits(max_batch=settings.max_batch, max_batch_tokens=settings.max_batch_tokens,
                  max_queue=settings.max_queue, max_queued_total=settings.max_queued_total,
                  max_consecutive_batches=settings.max_consecutive_batches,
                  max_hold_ms=settings.max_hold_ms, retry_after_s=settings.retry_after_s,
                  request_timeout_s=settings.request_timeout_s,
                  max_live_sequences=settings.max_live_sequences,
                  kv_cache_bytes=settings.kv_cache_bytes, prefill_tokens=settings.prefill_tokens)


class Engine:
    def __init__(self, base: Base, store: DeltaStore, settings: Settings,
                 on_swap: Callable[[float], None] | None = None,
                 on_batch: OnBatch | None = None,
                 on_mixed: Callable[[int, int], None] | None = None) -> None:
        self.base = base
        self.cache = DeltaCache(settings.cache_bytes)
        self.registry = TaskRegistry(base, store, self.cache, settings.version_check_s)
        mixer = Mixer(base) if settings.mixed_batches else None
        self.executor = Executor(base, mixer, on_swap=on_swap, grow_cache=self.registry.grow)
        model = base.model
        # the request side's own tokenizer, one call at a time: a fast tokenizer's padding and
        # truncation settings are state, and the worker thread uses the base's at the same time
        self._front = copy.deepcopy(base.tokenizer)
        self._front_lock = threading.Lock()
        self._positions = getattr(model.config, "max_position_embeddings", None) or 4096
        self._eos = eos_ids(model, base.tokenizer) if base.is_causal_lm else set()
        self._limit = max_tokens(model)
        per_token = kv_bytes_per_token(model.config, base.dtype) if base.is_causal_lm else 0
        self.scheduler = Scheduler(self.registry, self.executor, limits_of(settings),
                                   measure=self.measure, new_sequence=self.new_sequence,
                                   kv_per_token=per_token, mixed=mixer is not None,
                                   on_batch=on_batch, on_mixed=on_mixed)

    def measure(self, job: Job) -> list[int]:
        with self._front_lock:
            return measure(self._front, job, self._limit)

    def new_sequence(self, job: GenerateJob) -> Sequence:
        with self._front_lock:
            ids = prompt_ids(self._front, job.prompt, self._positions)
        # the sequence decodes its text in the worker thread, with the base's tokenizer
        return Sequence(job, ids, self._positions, self.base.tokenizer, self._eos, self.base.device)

    def close(self) -> None:
        """Put the exact base back and take the mixer's hooks off (shutdown, tests)."""
        self.executor.restore_base()
        if self.executor.mixer is not None:
            self.executor.mixer.close()
