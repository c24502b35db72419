"""Compact index streams are compared with their values before they are decoded, and parsing a
delta held in a bytearray copies nothing: what a hostile upload can make the parser allocate is
bounded by its own size (issue 14, item 5)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from taskdelta.deltas import DeltaRejected, loads
from taskdelta.deltas import encoding as codec


def compact_file(flat: dict[str, torch.Tensor]) -> bytes:
    meta = {"format": "taskdelta", "format_version": "1", "base_fingerprint": "fp", "kind": "embed",
            "labels": "[]", "provenance": '{"method": "t", "density": 0.1}', "checksum": "x",
            "encoding": codec.GAP_VARINT}
    return st_save(flat, metadata=meta)


def one_byte_numbers(count: int) -> torch.Tensor:
    """A well-formed int32 stream of `count` indices 0, 1, 2, ... (every gap 0: one byte each)."""
    return torch.from_numpy(np.concatenate([[4], np.zeros(count, dtype=np.uint8)]).astype(np.uint8))


@pytest.fixture
def no_decoding(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("a stream was decoded before its length was compared with its values")

    monkeypatch.setattr(codec, "decode_all", refuse)
    monkeypatch.setattr(codec, "decode", refuse)


def test_a_stream_far_longer_than_its_values_is_refused_from_the_header(no_decoding):
    """8 MB of one-byte numbers for one value: decoding would allocate 32-64 MB first."""
    data = bytearray(compact_file({"w::idx": one_byte_numbers(8 * 1024 * 1024),
                                   "w::val": torch.ones(1)}))
    tracemalloc.start()
    try:
        with pytest.raises(DeltaRejected, match="cannot hold exactly the 1 indices") as err:
            loads(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.value.tensor == "w"
    assert peak < len(data) // 4  # nothing in proportion to the stream was allocated


def test_a_stream_with_more_numbers_than_values_is_counted_not_decoded(no_decoding):
    """Twice as many numbers as values, within the header's slack: the count, not a decode,
    refuses it."""
    data = compact_file({"w::idx": one_byte_numbers(2000), "w::val": torch.ones(1000)})
    with pytest.raises(DeltaRejected, match="idx has 2000 entries but val has 1000") as err:
        loads(bytearray(data))
    assert err.value.tensor == "w"


def test_a_bytearray_is_parsed_without_a_copy_and_decoding_is_bounded():
    """A 8 MB plain delta parses with no copy of its tensors; a compact one allocates its decoded
    indices (4 bytes per index) and a fixed amount per piece, not int64 temporaries over the
    whole stream nor a second copy of the indices."""
    n = 1024 * 1024
    plain = st_save({"w::idx": torch.arange(n, dtype=torch.int32), "w::val": torch.ones(n)})
    compact = compact_file({"w::idx": one_byte_numbers(n), "w::val": torch.ones(n)})
    for data, allowed in ((plain, 64 * 1024), (compact, 4 * n + 2 * 1024 * 1024)):
        buffer = bytearray(_with_meta(data) if data is plain else data)
        tracemalloc.start()
        try:
            with pytest.raises(DeltaRejected, match="checksum mismatch"):
                loads(buffer)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < allowed, (len(buffer), peak)


def test_a_long_stream_decodes_exactly_as_the_short_path_does():
    """The piecewise decode gives the indices `encode` was given, across piece seams."""
    gen = torch.Generator().manual_seed(0)
    idx = torch.unique(torch.randint(0, 2**31 - 1, (200_000,), generator=gen)).to(torch.int32)
    stream = codec.encode(idx)
    assert stream.numel() > 4 * codec._GROUP_BYTES  # several pieces
    assert torch.equal(codec.decode(stream, "w"), idx)
    assert codec.count_numbers(stream) == idx.numel()


def _with_meta(data: bytes) -> bytes:
    """Plain safetensors bytes -> the same tensors with taskdelta metadata."""
    from safetensors.torch import load as st_load

    flat = st_load(data)
    meta = {"format": "taskdelta", "format_version": "1", "base_fingerprint": "fp", "kind": "embed",
            "labels": "[]", "provenance": '{"method": "t", "density": 0.1}', "checksum": "x"}
    return st_save(flat, metadata=meta)
