"""What the engine runs: one job per HTTP request, plain frozen dataclasses."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from taskdelta.client.types import SamplingParams, StreamChunk


@dataclass(frozen=True)
class ClassifyJob:
    texts: tuple[str | tuple[str, str], ...]
    top_k: int | None = None


@dataclass(frozen=True)
class ScoreJob:
    """A regress task's texts: each answered with its head's one output, as a float."""

    texts: tuple[str | tuple[str, str], ...]


# Jobs a task's pooled head answers (the classify code path: one forward, then the head); a batch
# of them shares one backbone forward whichever of the two each task is.
HEAD_JOBS = (ClassifyJob, ScoreJob)


@dataclass(frozen=True)
class EmbedJob:
    texts: tuple[str, ...]
    normalize: bool = True


@dataclass(frozen=True)
class GenerateJob:
    prompt: str  # already rendered (chat template applied)
    params: SamplingParams
    # streaming: called from the worker thread with each piece; the API hops it onto the loop
    emit: Callable[[StreamChunk], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


Job = ClassifyJob | ScoreJob | EmbedJob | GenerateJob
