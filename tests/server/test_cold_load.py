"""Loading a stored delta (a cold task): bytes that passed the upload's full check against this
base, under these rules, are not checked in content again; anything else is checked in full; and
even stamped bytes that are wrong cannot corrupt the base (the swap checks every index itself)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from taskdelta.deltas import (
    DeltaMeta,
    DeltaRejected,
    Provenance,
    SparseTensor,
    TaskDelta,
    dumps,
    loads,
    prepare,
    random_delta,
    validate,
)
from taskdelta.deltas.validate import stamp
from taskdelta.server.cache import DeltaCache
from taskdelta.server.executor import EncodePart, Executor
from taskdelta.server.jobs import EmbedJob
from taskdelta.server.registry import TaskRef, TaskRegistry
from taskdelta.server.store import StoredTask


class OneBlobStore:
    """The part of a DeltaStore the load path uses, holding one task. A real store also checks
    the blob against its recorded sha256 (tests/test_store.py); this one hands it over as given."""

    def __init__(self, blob: bytes, info: dict[str, str]) -> None:
        self.blob, self.info = blob, info

    async def get_blob(self, tenant: str, name: str,
                       version: int | None = None) -> tuple[StoredTask, bytes]:
        return StoredTask(tenant, name, 1, self.info), self.blob


def load(base, blob: bytes, info: dict[str, str]):
    registry = TaskRegistry(base, store=OneBlobStore(blob, info), cache=DeltaCache(1 << 26))
    loaded = asyncio.run(registry.load(TaskRef("t", "task", info.get("kind", "embed"), 1)))
    return registry, loaded.prepared


def edited(delta: TaskDelta, **change) -> TaskDelta:
    """The delta with its first tensor's idx or val replaced (a function of the old one)."""
    name = next(iter(delta.tensors))
    sp = delta.tensors[name]
    new = SparseTensor(change.get("idx", lambda i: i)(sp.idx.clone()),
                       change.get("val", lambda v: v)(sp.val.clone()))
    return TaskDelta(meta=delta.meta, tensors=delta.tensors | {name: new}, heads=delta.heads)


def with_nan(v: torch.Tensor) -> torch.Tensor:
    v[0] = float("nan")
    return v


def test_an_upload_records_what_it_was_validated_against(tiny_bert):
    registry = TaskRegistry(tiny_bert, store=None, cache=DeltaCache(0))
    checked = asyncio.run(registry.check_upload(dumps(random_delta(tiny_bert, 0.01, seed=1)), 1 << 24))
    assert checked.info["validated_for"] == stamp(tiny_bert)
    assert tiny_bert.fingerprint in stamp(tiny_bert)


@pytest.mark.parametrize("record", ["none", "older rules", "another base"])
def test_bytes_not_stamped_for_this_base_and_rules_are_checked_in_full_on_load(tiny_bert, record):
    """A NaN increment (well-formed, wrong in content) is refused on load unless the record says
    these bytes passed the full check against this base under the current rules."""
    blob = dumps(edited(random_delta(tiny_bert, 0.01, seed=2), val=with_nan))
    info = {"none": {},
            "older rules": {"validated_for": "rules-0:" + tiny_bert.fingerprint},
            "another base": {"validated_for": stamp(tiny_bert).replace("sha256:", "sha256:0")},
            }[record]
    with pytest.raises(DeltaRejected, match="non-finite"):
        load(tiny_bert, blob, info)


def test_stamped_bytes_skip_the_content_checks_but_not_the_form_checks(tiny_bert):
    delta = random_delta(tiny_bert, 0.01, seed=3)
    stamped = {"validated_for": stamp(tiny_bert)}
    _, prepared = load(tiny_bert, dumps(edited(delta, val=with_nan)), stamped)  # not looked at
    assert prepared.nnz == delta.nnz
    wrong_name = TaskDelta(meta=delta.meta, tensors={"no.such.tensor": next(iter(delta.tensors.values()))})
    with pytest.raises(DeltaRejected, match="not a tensor of base"):
        load(tiny_bert, dumps(wrong_name), stamped)
    short = edited(delta, val=lambda v: v[:-1])
    with pytest.raises(DeltaRejected, match="entries but val has"):
        load(tiny_bert, dumps(short), stamped)


def test_stamped_bytes_with_a_bad_index_are_refused_on_load_and_by_the_swap_leaving_the_base_intact(
        tiny_bert):
    """The index checks run on every load, stamped or not; and past them (a delta prepared
    without validate), the swap catches the bad index as it writes."""
    saved = {n: p.detach().clone() for n, p in tiny_bert.params.items()}
    delta = random_delta(tiny_bert, 0.01, seed=4, kind="embed")
    name = next(iter(delta.tensors))

    def past_the_end(i: torch.Tensor) -> torch.Tensor:
        i[-1] = tiny_bert.params[name].numel()
        return i

    blob = dumps(edited(delta, idx=past_the_end))
    with pytest.raises(DeltaRejected, match="out of range"):
        load(tiny_bert, blob, {"validated_for": stamp(tiny_bert)})
    prepared = prepare(loads(blob), tiny_bert, name="t/task")
    executor = Executor(tiny_bert)
    with pytest.raises(IndexError, match="out of range"):
        executor.encode([EncodePart("t/task", prepared, (), [EmbedJob(texts=("a sentence",))])])
    assert executor.swapper.active is None
    for n, p in tiny_bert.params.items():
        assert torch.equal(p.view(torch.int32), saved[n].view(torch.int32)), n


def test_skipping_the_checksum_skips_nothing_else():
    """loads(verify_checksum=False) accepts a wrong checksum and still refuses a malformed file."""
    meta = DeltaMeta(base_fingerprint="sha256:feed", kind="embed",
                     provenance=Provenance(method="test", density=0.5))
    good = TaskDelta(meta=meta, tensors={"w": SparseTensor(torch.tensor([1, 4], dtype=torch.int32),
                                                           torch.ones(2))})
    data = bytearray(dumps(good))
    data[-1] ^= 0x01  # an increment's last byte: the checksum no longer matches
    with pytest.raises(DeltaRejected, match="checksum mismatch"):
        loads(bytes(data))
    assert loads(bytes(data), verify_checksum=False).nnz == 2
    with pytest.raises(DeltaRejected, match="truncated"):
        loads(bytes(data[:-3]), verify_checksum=False)


def test_validate_without_contents_still_checks_the_metadata(tiny_bert):
    delta = random_delta(tiny_bert, 0.01, seed=5)
    other = TaskDelta(meta=delta.meta.model_copy(update={"base_fingerprint": "sha256:other"}),
                      tensors=delta.tensors, heads=delta.heads)
    with pytest.raises(DeltaRejected, match="made for base"):
        validate(other, tiny_bert, contents=False)
