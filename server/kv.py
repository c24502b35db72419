"""KV caches of live sequences: one left-padded batch per decode group.

A group's rows share one transformers `DynamicCache` whose layers hold keys and values as
[rows, kv_heads, T, head_dim]. Rows are left-padded: row i's real positions are the last
T - pad[i] columns, so every row's next token lands in the same column and one forward decodes
them all (the attention mask hides the pads; positions are given per row). A sequence joins
after its own prefill (its cache padded to the group's length, or the group's to its, then
concatenated along the rows) and leaves by row selection; columns that every row pads are then
cut off. Only the engine's worker thread touches these tensors.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .sequences import Sequence

Owner = tuple[str, Any]  # (task key, its PreparedDelta or None for the base)


def cache_argument(model: torch.nn.Module) -> str:
    """The forward's name for the KV cache: `cache` in newer transformers, else the old one."""
    names = inspect.signature(model.forward).parameters
    return "cache" if "cache" in names else "past_key_values"


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take over all layers."""
    layers = config.num_hidden_layers
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * layers * heads * head_dim * torch.tensor([], dtype=dtype).element_size()


class DecodeGroup:
    """The live rows that decode together in one forward: one task's sequences (its delta swapped
    in), or, with `mixed`, sequences of several tasks on the untouched base, each task's delta
    correcting its own rows. A mixed group keeps each task's rows next to each other."""

    def __init__(self, mixed: bool = False) -> None:
        self.mixed = mixed
        self.rows: list[Sequence] = []
        self.owners: list[Owner] = []  # per row: (task key, its delta or None for the base)
        self.pads: list[int] = []
        self.cache: DynamicCache | None = None
        self.next_ids: list[int] = []  # per row: the token to feed at the next step

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def length(self) -> int:
        """T: the cache's columns (pads included)."""
        return 0 if self.cache is None else self.cache.get_seq_length()

    def deltas(self) -> list[Owner]:
        """The distinct (key, delta) of the rows, in row order."""
        seen: dict[int, Owner] = {}
        for owner in self.owners:
            seen.setdefault(id(owner[1]), owner)
        return list(seen.values())

    def runs(self) -> list[tuple[int, int, Owner]]:
        """(start, end, owner) of each run of rows with the same delta."""
        return owner_runs(self.owners)

    @classmethod
    def of(cls, seqs: list[Sequence], cache: DynamicCache, pads: list[int], next_ids: list[int],
           owners: list[Owner]) -> DecodeGroup:
        """Rows just prefilled together (their cache left-padded by `pads`)."""
        group = cls()
        group.rows, group.cache, group.pads = list(seqs), cache, list(pads)
        group.next_ids, group.owners = list(next_ids), list(owners)
        return group

    def join(self, new: DecodeGroup) -> None:
        """Add another group's rows (prefilled sequences) after ours; they decode from the next
        step on. The narrower cache is padded on the left to the wider one's length."""
        if not new.rows:
            return
        own, old = new.length, self.length
        width = max(old, own)
        if self.cache is None:
            self.cache = new.cache
        else:
            for mine, theirs in zip(self.cache.layers, new.cache.layers, strict=True):
                mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
                mine.values = torch.cat([_pad_left(mine.values, width),
                                         _pad_left(theirs.values, width)])
        self.pads = [p + width - old for p in self.pads] + [p + width - own for p in new.pads]
        self.rows += new.rows
        self.owners += new.owners
        self.next_ids += new.next_ids
        if self.mixed:
            self._regroup()

    def _regroup(self) -> None:
        """Rows of one delta next to each other (new rows move up to their task's rows)."""
        rank: dict[int, int] = {}
        for owner in self.owners:
            rank.setdefault(id(owner[1]), len(rank))
        order = sorted(range(len(self.rows)), key=lambda i: rank[id(self.owners[i][1])])
        self.keep(order)

    def keep(self, keep: list[int]) -> None:
        """Only these rows stay (in this order); columns every row pads are cut."""
        if keep == list(range(len(self.rows))) and (not self.pads or min(self.pads) == 0):
            return
        if not keep:
            self.rows, self.owners, self.pads, self.next_ids, self.cache = [], [], [], [], None
            return
        index = torch.tensor(keep, dtype=torch.long)
        cut = min(self.pads[i] for i in keep)
        for layer in self.cache.layers:  # type: ignore[union-attr]
            index = index.to(layer.keys.device)
            layer.keys = layer.keys[index, :, cut:].contiguous()
            layer.values = layer.values[index, :, cut:].contiguous()
        self.rows = [self.rows[i] for i in keep]
        self.owners = [self.owners[i] for i in keep]
        self.pads = [self.pads[i] - cut for i in keep]
        self.next_ids = [self.next_ids[i] for i in keep]

    def step_inputs(self, device: torch.device, cache_arg: str) -> dict:
        """The forward's arguments for one decode token on every row."""
        width = self.length + 1
        cols = torch.arange(width)
        pads = torch.tensor(self.pads)
        mask = (cols[None, :] >= pads[:, None]).long()  # [rows, T + 1]
        positions = (width - 1 - pads)[:, None]  # [rows, 1]: each row's own position
        return {"input_ids": torch.tensor(self.next_ids, device=device)[:, None],
                "attention_mask": mask.to(device), "position_ids": positions.to(device),
                cache_arg: self.cache, "use_cache": True}


def owner_runs(owners: list[Owner]) -> list[tuple[int, int, Owner]]:
    """(start, end, owner) of each run of consecutive rows with the same delta."""
    out: list[tuple[int, int, Owner]] = []
    for i, owner in enumerate(owners):
        if out and out[-1][2][1] is owner[1]:
            out[-1] = (out[-1][0], i + 1, owner)
        else:
            out.append((i, i + 1, owner))
    return out


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """[rows, heads, T, dim] -> [rows, heads, width, dim], zeros in front."""
    missing = width - t.shape[2]
    return t if missing == 0 else F.pad(t, (0, 0, missing, 0))
