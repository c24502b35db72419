"""Property-based fuzz of the delta parser and validator: whatever the bytes, the upload path
(`loads` then `validate`, as the engine runs it) either accepts the delta or raises DeltaRejected,
never another exception; and a delta it accepts can be prepared and swapped in and out, leaving
the base bit-identical."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from taskdelta.deltas import DeltaRejected, Swapper, dumps, loads, prepare, random_delta, validate

SEED = 8
FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "U64",
          "F128", "", "i32"]
SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
         "BOOL": 1, "F8_E4M3": 1, "U64": 8}
SWAPPED = {"count": 0}


def upload_path(data: bytes, base) -> None:
    """What an upload goes through; anything accepted must also prepare, apply and restore."""
    try:
        delta = loads(data, max_bytes=1 << 22)
        validate(delta, base)
    except DeltaRejected:
        return
    saved = {n: p.detach().clone() for n, p in base.params.items()}
    swapper = Swapper(base)
    with swapper.swapped(prepare(delta, base, name="fuzzed")):
        pass
    SWAPPED["count"] += 1
    for n, p in base.params.items():
        assert torch.equal(p.view(torch.int32), saved[n].view(torch.int32)), n


@pytest.fixture(scope="module")
def valid(tiny_bert) -> list[bytes]:
    return [dumps(random_delta(tiny_bert, 0.0005, seed=i, kind=kind, labels=labels))
            for i, (kind, labels) in enumerate([("classify", ["n", "p"]), ("embed", None)])]


@seed(SEED)
@settings(FUZZ, max_examples=400)
@given(data=st.binary(max_size=4096))
def test_random_bytes_only_ever_raise_delta_rejected(tiny_bert, data):
    upload_path(data, tiny_bert)


@seed(SEED)
@settings(FUZZ, max_examples=400)
@given(which=st.integers(0, 1), edits=st.lists(st.tuples(
    st.sampled_from(["flip", "set", "cut", "insert", "delete", "length"]),
    st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6))
def test_mutated_valid_files_only_ever_raise_delta_rejected(tiny_bert, valid, which, edits):
    data = bytearray(valid[which])
    for op, where, byte in edits:
        at = int(where * len(data)) if data else 0
        if op == "flip" and data:
            data[at] ^= 1 << (byte % 8)
        elif op == "set" and data:
            data[at] = byte
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = bytes([byte]) * (1 + byte % 16)
        elif op == "delete" and data:
            del data[at:at + 1 + byte % 64]
        elif op == "length" and len(data) >= 8:  # the header length field, nudged or wild
            (n,) = struct.unpack("<Q", data[:8])
            wild = (byte << (byte % 64)) % 2**64
            data[:8] = struct.pack("<Q", (n + byte - 128) % 2**64 if byte % 2 else wild)
    upload_path(bytes(data), tiny_bert)


entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(DTYPES),
    "shape": st.lists(st.one_of(st.integers(0, 64), st.integers(-2, 2**63)), max_size=3),
    "data_offsets": st.one_of(st.lists(st.integers(0, 4096), min_size=2, max_size=2).map(sorted),
                              st.lists(st.integers(-5, 2**64), max_size=3)),
}) | st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2))


@seed(SEED)
@settings(FUZZ, max_examples=400)
@given(raw=st.data())
def test_hand_made_headers_only_ever_raise_delta_rejected(tiny_bert, valid, raw):
    """Well-formed JSON headers with arbitrary entries (dtypes, shapes, offsets, names, metadata)
    over arbitrary data: the safetensors layer is reached, and its errors become DeltaRejected."""
    meta = json.loads(valid[0][8:8 + struct.unpack("<Q", valid[0][:8])[0]])["__metadata__"]
    names = st.sampled_from(["embeddings.word_embeddings.weight::idx",
                             "embeddings.word_embeddings.weight::val", "head::classifier.bias",
                             "x::idx", "x::val", "plain", "__metadata__"])
    header = raw.draw(st.dictionaries(names, entries, max_size=4))
    if raw.draw(st.booleans()):
        header["__metadata__"] = raw.draw(st.one_of(
            st.just(meta), st.dictionaries(st.sampled_from(list(meta)), st.one_of(
                st.text(max_size=8), st.integers(), st.sampled_from(list(meta.values()))))))
    blob = json.dumps(header).encode()
    data = raw.draw(st.binary(max_size=512))
    if raw.draw(st.booleans()):  # data sized as the header's entries claim
        need = max((e["data_offsets"][1] for e in header.values() if isinstance(e, dict)
                    and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
                    and isinstance(e["data_offsets"][1], int) and 0 <= e["data_offsets"][1] < 8192),
                   default=0)
        data = (data * (need // max(1, len(data)) + 1))[:need] if data else bytes(need)
    upload_path(struct.pack("<Q", len(blob)) + blob + data, tiny_bert)


@seed(SEED)
@settings(FUZZ, max_examples=300)
@given(idx=st.lists(st.integers(-2**31, 2**31 - 1), max_size=12),
       val=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=12),
       idx_dtype=st.sampled_from([torch.int32, torch.int64, torch.int16, torch.float32]),
       val_dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int32]))
def test_well_formed_files_with_arbitrary_tensors_only_ever_raise_delta_rejected(
        tiny_bert, idx, val, idx_dtype, val_dtype):
    """A file that parses, with arbitrary indices and values: the validator decides."""
    good = random_delta(tiny_bert, 0.0, kind="embed")
    from safetensors.torch import save as st_save

    from taskdelta.deltas.format import tensor_checksum

    name = "encoder.layer.1.output.dense.weight"
    tensors = {f"{name}::idx": torch.tensor(idx, dtype=torch.int64).to(idx_dtype),
               f"{name}::val": torch.tensor(val, dtype=torch.float32).to(val_dtype)}
    meta = {"format": "taskdelta", "format_version": "1", "kind": "embed", "labels": "[]",
            "base_fingerprint": good.meta.base_fingerprint, "base_name": "",
            "provenance": json.dumps({"method": "fuzz", "density": 0.0}),
            "checksum": tensor_checksum(tensors)}
    upload_path(st_save(tensors, metadata=meta), tiny_bert)


def test_the_fuzz_reaches_acceptance(tiny_bert, valid):
    """The harness accepts what it should: valid files go all the way through a swap."""
    before = SWAPPED["count"]
    for data in valid:
        upload_path(data, tiny_bert)
    assert SWAPPED["count"] == before + len(valid)
