"""What runs next: pure decisions over the queues, no I/O and no model.

- `TurnPolicy` picks the task of the next classify/embed micro-batch: the task swapped in keeps
  the model while it has work, until it has had `max_consecutive` micro-batches or `max_hold_ms`
  while another task waits; otherwise the task whose oldest request waited longest.
- `take_rows` fills a micro-batch from requests, oldest first, bounded in rows and in
  rows x padded tokens; a request larger than that is served over several steps.
- `kv_fits` decides whether one more sequence fits the KV cache budget.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass
class TurnPolicy:
    max_consecutive: int
    max_hold_ms: float
    current: object | None = None  # the task of the last micro-batch
    streak: int = 0
    streak_started: float = 0.0

    def pick(self, waiting: list[object], oldest: Callable[[object], int], now: float) -> object:
        """The next task among `waiting` (non-empty)."""
        if self.current in waiting and not self._turn_over(len(waiting), now):
            return self.current
        others = [t for t in waiting if t != self.current] or waiting
        return min(others, key=oldest)

    def _turn_over(self, tasks_waiting: int, now: float) -> bool:
        if tasks_waiting < 2 or self.streak == 0:
            return False
        held_ms = (now - self.streak_started) * 1000
        return self.streak >= self.max_consecutive or held_ms >= self.max_hold_ms

    def ran(self, task: object | None, now: float) -> None:
        """A micro-batch of `task` ran (None: a mixed one, on the plain base)."""
        if task != self.current:
            self.current, self.streak = task, 0
        if self.streak == 0:
            self.streak_started = now
        self.streak += 1

    def idle(self) -> None:
        self.streak = 0


@dataclass(frozen=True)
class Slice:
    """Some texts of one request: indices into its texts."""

    owner: object
    indices: tuple[int, ...]


@dataclass
class RowBudget:
    max_rows: int
    max_tokens: int  # rows x the longest row's tokens
    rows: int = 0
    longest: int = 0

    def admits(self, tokens: int) -> bool:
        rows, longest = self.rows + 1, max(self.longest, tokens)
        return rows <= self.max_rows and (rows * longest <= self.max_tokens or self.rows == 0)

    def add(self, tokens: int) -> None:
        self.rows += 1
        self.longest = max(self.longest, tokens)

    @property
    def full(self) -> bool:
        return self.rows >= self.max_rows


def take_rows(requests: Iterable[tuple[object, list[int]]], budget: RowBudget) -> list[Slice]:
    """Rows for one micro-batch from (owner, token lengths of its untaken texts in order),
    oldest owner first. Stops at the first text that does not fit, so every owner's texts are
    taken in order (shortest first, as the caller sorted them)."""
    slices: list[Slice] = []
    for owner, lengths in requests:
        taken: list[int] = []
        for i, tokens in enumerate(lengths):
            if not budget.admits(tokens):
                break
            budget.add(tokens)
            taken.append(i)
        if taken:
            slices.append(Slice(owner, tuple(taken)))
        if len(taken) < len(lengths) or budget.full:
            break
    return slices


def kv_fits(groups: Iterable[tuple[int, int]], per_token: int, budget: int) -> bool:
    """Whether decode groups, each (rows, the most positions one of its rows may reach), fit
    the KV budget: a left-padded group never holds more than rows x that many positions."""
    return sum(rows * longest for rows, longest in groups) * per_token <= budget
