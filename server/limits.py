"""Bounds on what one request may make the server do or send back, beyond the body size limits:
characters per text (inference) and labels per classify delta (upload; every result carries a
score per label, so the label count and length bound each response)."""

from __future__ import annotations

from collections.abc import Iterable

from taskdelta.deltas import DeltaRejected

from .errors import PayloadTooLarge
from .settings import Settings


def check_texts(texts: Iterable[str | tuple[str, str]], s: Settings) -> None:
    """413 naming the first text (or pair) longer than `max_text_chars`."""
    for i, item in enumerate(texts):
        length = len(item) if isinstance(item, str) else max(len(part) for part in item)
        if length > s.max_text_chars:
            raise PayloadTooLarge(f"text {i} has {length} characters, over the limit of "
                                  f"{s.max_text_chars} (TASKDELTA_MAX_TEXT_CHARS)")


def check_labels(labels: list[str], s: Settings) -> None:
    """422 (a refused delta) for more than `max_labels` labels or one longer than
    `max_label_chars`."""
    if len(labels) > s.max_labels:
        raise DeltaRejected(f"{len(labels)} labels, over the limit of {s.max_labels} "
                            "(TASKDELTA_MAX_LABELS)", "__metadata__.labels")
    longest = max((len(label) for label in labels), default=0)
    if longest > s.max_label_chars:
        raise DeltaRejected(f"a label of {longest} characters, over the limit of "
                            f"{s.max_label_chars} (TASKDELTA_MAX_LABEL_CHARS)",
                            "__metadata__.labels")
