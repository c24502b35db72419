"""Delta format v1 on disk: what round-trips exactly, and what `loads`/`load` refuse (and how)."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save
from support import assert_same_delta, delta_meta, file_header

from taskdelta.deltas import (
    FORMAT_VERSION,
    DeltaMeta,
    DeltaRejected,
    Provenance,
    SparseTensor,
    TaskDelta,
    dumps,
    load,
    loads,
    random_delta,
    save,
)
from taskdelta.deltas.format import MAX_HEADER_BYTES, tensor_checksum


def _small_delta() -> TaskDelta:
    return TaskDelta(meta=delta_meta(), tensors={
        "w": SparseTensor(torch.tensor([0, 3, 7], dtype=torch.int32),
                          torch.tensor([1.0, -2.0, 0.5])),
    })


def _raw_meta(flat: dict[str, torch.Tensor], **over: str) -> dict[str, str]:
    """A well-formed metadata dict for `flat`, with the right checksum unless overridden."""
    meta = {"format": "taskdelta", "format_version": str(FORMAT_VERSION),
            "base_fingerprint": "sha256:feed", "base_name": "b", "kind": "embed", "labels": "[]",
            "provenance": json.dumps({"method": "test", "density": 0.5}),
            "checksum": tensor_checksum(flat)}
    meta.update(over)
    return meta


def _with_header(data: bytes, header: dict) -> bytes:
    """Re-encode a safetensors file with a hand-edited JSON header (same data section)."""
    (n,) = struct.unpack("<Q", data[:8])
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


# --- round trips -------------------------------------------------------------------------------


def test_bytes_round_trip_keeps_every_tensor_and_metadata(tiny_bert):
    """loads(dumps(d)) has the same tensors (values and dtypes), heads and metadata as d."""
    delta = random_delta(tiny_bert, 0.05, seed=3, kind="classify", labels=["neg", "pos", "meh"])
    back = loads(dumps(delta))
    assert_same_delta(delta, back)
    assert back.meta.model_dump(exclude={"checksum"}) == delta.meta.model_dump(exclude={"checksum"})
    assert back.meta.checksum.startswith("sha256:")
    assert back.meta.provenance.model_extra == {"seed": 3}  # extra provenance keys survive


def test_path_round_trip_and_no_temp_file_left(tmp_path: Path, tiny_llama):
    """save then load gives the delta back; the write goes through a temp file that is renamed."""
    delta = random_delta(tiny_llama, 0.02, seed=1)
    path = save(delta, tmp_path / "task.safetensors")
    back = load(path)
    assert_same_delta(delta, back)
    assert back.meta.kind == "generate"
    assert [p.name for p in tmp_path.iterdir()] == ["task.safetensors"]


def test_metadata_round_trip_all_fields():
    """Every DeltaMeta field, unicode labels and arbitrary provenance extras survive the trip."""
    meta = DeltaMeta(base_fingerprint="sha256:abc", base_name="minilm", kind="classify",
                     labels=["négatif", "positif", "日本"],
                     provenance=Provenance(method="extract", density=0.01, scope="per-tensor",
                                           target_density=0.01, steps=[1, 2]))
    back = loads(dumps(TaskDelta(meta=meta))).meta
    assert back.model_dump(exclude={"checksum"}) == meta.model_dump(exclude={"checksum"})
    assert back.format_version == FORMAT_VERSION


def test_header_metadata_is_the_documented_string_map():
    """The file's __metadata__ holds exactly the documented keys, all strings."""
    header = file_header(dumps(_small_delta()))
    meta = header["__metadata__"]
    assert set(meta) == {"format", "format_version", "base_fingerprint", "base_name", "kind",
                         "labels", "provenance", "checksum"}
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["format"] == "taskdelta" and meta["format_version"] == "1"
    assert set(header) - {"__metadata__"} == {"w::idx", "w::val"}
    assert header["w::idx"]["dtype"] == "I32" and header["w::val"]["dtype"] == "F32"


_FLOATS = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64])


@settings(max_examples=40, deadline=None)
@given(nnz=st.lists(st.integers(0, 50), min_size=0, max_size=4), val_dtype=_FLOATS,
       idx64=st.booleans(), seed=st.integers(0, 2**16), head_dtype=_FLOATS)
def test_round_trip_is_exact_for_any_content(nnz, val_dtype, idx64, seed, head_dtype):
    """Whatever the sizes and dtypes (empty tensors included), bytes round-trip bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, k in enumerate(nnz):
        idx = torch.randperm(1000, generator=gen)[:k].sort().values
        tensors[f"layer.{i}.weight"] = SparseTensor(
            idx.to(torch.int64 if idx64 else torch.int32),
            torch.randn(k, generator=gen, dtype=torch.float64).to(val_dtype))
    heads = {"classifier.weight": torch.randn(2, 3, generator=gen).to(head_dtype)}
    delta = TaskDelta(meta=delta_meta(kind="classify", labels=["a", "b"]), tensors=tensors, heads=heads)
    data = dumps(delta)
    back = loads(data)
    assert_same_delta(delta, back)
    assert_same_delta(back, loads(dumps(back)))


# --- refusals: integrity ---------------------------------------------------------------------


def test_checksum_mismatch_when_a_value_byte_changes():
    """Flipping one bit of an increment (header intact) is caught by the checksum."""
    data = bytearray(dumps(_small_delta()))
    data[-1] ^= 0x01  # the last byte belongs to the last tensor's data (idx or val)
    with pytest.raises(DeltaRejected, match="checksum mismatch") as err:
        loads(bytes(data))
    assert err.value.tensor == "__metadata__.checksum"


def test_checksum_mismatch_when_the_stamp_is_wrong_or_missing():
    """A checksum that does not hash the tensors, or none at all, is refused."""
    flat = _small_delta().flat_tensors()
    with pytest.raises(DeltaRejected, match="checksum mismatch"):
        loads(st_save(flat, metadata=_raw_meta(flat, checksum="sha256:" + "0" * 64)))
    meta = _raw_meta(flat)
    del meta["checksum"]
    with pytest.raises(DeltaRejected, match="checksum mismatch"):
        loads(st_save(flat, metadata=meta))
    loads(st_save(flat, metadata=_raw_meta(flat)))  # the same file with the right stamp loads


def test_checksum_covers_names_and_dtypes_not_only_bytes():
    """Renaming a tensor or reinterpreting its bytes changes the checksum."""
    a = {"w::idx": torch.tensor([1], dtype=torch.int32), "w::val": torch.tensor([1.0])}
    renamed = {"v::idx": a["w::idx"], "v::val": a["w::val"]}
    retyped = {"w::idx": a["w::idx"], "w::val": a["w::val"].view(torch.int32)}
    assert len({tensor_checksum(a), tensor_checksum(renamed), tensor_checksum(retyped)}) == 3


@pytest.mark.parametrize("cut", [0, 3, 7, 8, 20, -1, -5])
def test_truncated_file_is_refused(cut: int):
    """Any prefix of a valid file is refused as truncated (or as not a taskdelta file)."""
    data = dumps(_small_delta())
    with pytest.raises(DeltaRejected, match="truncated"):
        loads(data[:cut])


def test_empty_bytes_are_refused():
    with pytest.raises(DeltaRejected, match="truncated file: 0 bytes"):
        loads(b"")


def test_header_claiming_more_bytes_than_exist():
    """An 8-byte length larger than the rest of the file is refused before any parsing."""
    data = dumps(_small_delta())
    lying = struct.pack("<Q", len(data)) + data[8:]
    with pytest.raises(DeltaRejected, match="truncated file: header claims"):
        loads(lying)


def test_tensor_offsets_past_the_end_are_refused():
    """A header whose tensors need more data bytes than the file has is refused as truncated."""
    data = dumps(_small_delta())
    header = file_header(data)
    last = max(("w::idx", "w::val"), key=lambda k: header[k]["data_offsets"][1])
    header[last]["data_offsets"][1] += 4
    header[last]["shape"] = [4]
    with pytest.raises(DeltaRejected, match="truncated file: tensors need"):
        loads(_with_header(data, header))


def test_huge_header_is_refused_without_reading_it():
    """A header length over the limit is refused even if the bytes are there."""
    n = MAX_HEADER_BYTES + 8
    data = struct.pack("<Q", n) + b" " * n
    with pytest.raises(DeltaRejected, match="over the limit"):
        loads(data)
    with pytest.raises(DeltaRejected, match="over the limit"):
        loads(struct.pack("<Q", 2**63) + b"{}")


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe\x00", b"[1, 2]", b'"text"'])
def test_malformed_header_is_refused(body: bytes):
    with pytest.raises(DeltaRejected, match="malformed header"):
        loads(struct.pack("<Q", len(body)) + body)


@pytest.mark.parametrize("entry", [
    {"dtype": "PICKLE", "shape": [1], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]},
    {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]},
    {"dtype": "F32", "shape": [1], "data_offsets": "0-4"},
    "not an entry",
])
def test_malformed_header_entry_names_the_tensor(entry: object):
    data = dumps(_small_delta())
    header = file_header(data)
    header["w::val"] = entry
    with pytest.raises(DeltaRejected, match="malformed header entry") as err:
        loads(_with_header(data, header))
    assert err.value.tensor == "w::val"


def test_oversize_file_is_refused(tmp_path: Path):
    """max_bytes is enforced on bytes and on files; a file exactly at the limit loads."""
    data = dumps(_small_delta())
    limit = len(data) - 1
    with pytest.raises(DeltaRejected, match=f"{len(data)} bytes, over the limit of {limit}"):
        loads(data, max_bytes=len(data) - 1)
    path = tmp_path / "d.safetensors"
    path.write_bytes(data)
    with pytest.raises(DeltaRejected, match="over the limit"):
        load(path, max_bytes=len(data) - 1)
    assert load(path, max_bytes=len(data)).nnz == 3
    assert loads(data, max_bytes=len(data)).nnz == 3


# --- refusals: not a taskdelta file ----------------------------------------------------------


def test_plain_safetensors_without_metadata_is_refused():
    flat = _small_delta().flat_tensors()
    with pytest.raises(DeltaRejected, match="missing metadata") as err:
        loads(st_save(flat))
    assert err.value.tensor == "__metadata__"


def test_a_model_checkpoint_is_not_a_delta(tiny_bert_dir: Path):
    """A real safetensors model file (metadata format 'pt') is refused as not a taskdelta file."""
    with pytest.raises(DeltaRejected, match="'format' is 'pt'"):
        load(tiny_bert_dir / "model.safetensors")


@pytest.mark.parametrize(("key", "value", "message"), [
    ("format", "safetensors", "'format' is 'safetensors'"),
    ("format_version", "one", "format_version' missing or not an integer"),
    ("format_version", " 1", "format_version' missing or not an integer"),
    ("format_version", "+1", "format_version' missing or not an integer"),
    ("format_version", "0_1", "format_version' missing or not an integer"),
    ("format_version", "\u0661", "format_version' missing or not an integer"),  # Arabic-Indic one
    ("format_version", "2", "format version 2 is not supported"),
    ("kind", "summarize", "malformed metadata: kind"),
    ("labels", "[not json", "malformed metadata"),
    ("labels", '{"a": 1}', "malformed metadata: labels"),
    ("labels", "[1, 2]", "malformed metadata: labels"),
    ("provenance", "nope", "malformed metadata"),
    ("provenance", '{"method": "x"}', "malformed metadata: provenance.density"),
    ("provenance", '{"method": "x", "density": 2.0}', "malformed metadata: provenance.density"),
    ("base_fingerprint", "", "malformed metadata: base_fingerprint"),
])
def test_malformed_metadata_is_refused(key: str, value: str, message: str):
    """Each bad metadata value is refused with a message naming the key (never a crash)."""
    flat = _small_delta().flat_tensors()
    with pytest.raises(DeltaRejected, match=message) as err:
        loads(st_save(flat, metadata=_raw_meta(flat, **{key: value})))
    assert err.value.tensor == "__metadata__"


@pytest.mark.parametrize("key", ["base_fingerprint", "kind", "provenance", "format_version"])
def test_missing_metadata_key_is_refused(key: str):
    flat = _small_delta().flat_tensors()
    meta = _raw_meta(flat)
    del meta[key]
    with pytest.raises(DeltaRejected) as err:
        loads(st_save(flat, metadata=meta))
    assert err.value.tensor == "__metadata__"


def test_non_string_metadata_value_is_refused():
    """A hand-written header with a JSON list as a metadata value is refused, not a TypeError."""
    data = dumps(_small_delta())
    header = file_header(data)
    header["__metadata__"]["format_version"] = [1]
    with pytest.raises(DeltaRejected, match="values must be strings") as err:
        loads(_with_header(data, header))
    assert err.value.tensor == "__metadata__"


@pytest.mark.parametrize(("flat", "tensor", "message"), [
    ({"w": torch.zeros(2)}, "w", "not a delta tensor name"),
    ({"w::idx": torch.tensor([1], dtype=torch.int32)}, "w", "no matching w::val"),
    ({"w::val": torch.tensor([1.0])}, "w", "no matching w::idx"),
    ({"w::idx": torch.tensor([1, 2], dtype=torch.int32), "w::val": torch.tensor([1.0])}, "w",
     "idx has 2 entries but val has 1"),
    ({"w::idx": torch.tensor([[1]], dtype=torch.int32), "w::val": torch.tensor([1.0])}, "w",
     "must be 1-D"),
])
def test_bad_tensor_layout_in_a_file_names_the_tensor(flat, tensor: str, message: str):
    with pytest.raises(DeltaRejected, match=message) as err:
        loads(st_save(flat, metadata=_raw_meta(flat)))
    assert err.value.tensor == tensor


class _Payload:
    """Unpickling this creates the file at `path`: proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickle_renamed_safetensors_is_refused_unopened(tmp_path: Path, how: str):
    """A pickle under a .safetensors name is refused, and its payload never runs."""
    marker = tmp_path / "unpickled"
    path = tmp_path / "task.safetensors"
    if how == "pickle":
        path.write_bytes(pickle.dumps({"w::idx": _Payload(marker)}))
    else:
        torch.save({"w::idx": _Payload(marker)}, path)
    with pytest.raises(DeltaRejected):
        load(path)
    with pytest.raises(DeltaRejected):
        loads(path.read_bytes())
    assert not marker.exists()
    if how == "pickle":  # the payload is live: unpickling it does create the marker
        pickle.loads(path.read_bytes())  # noqa: S301 - our own bytes, to prove the test can fail
        assert marker.exists()
