"""The compact encoding (`encoding: gap-varint`): lossless both ways with the plain form, at most
3.5 bytes per nonzero at 1 % density with bf16 values on minilm's tensor shapes, the same
checksum as the plain file, and hostile streams refused with a message naming the tensor."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save
from support import assert_same_delta, delta_meta, file_header

from taskdelta.deltas import (
    DeltaRejected,
    Provenance,
    SparseTensor,
    Swapper,
    TaskDelta,
    dumps,
    loads,
    merge_into,
    prepare,
    random_delta,
    validate,
)
from taskdelta.deltas import encoding as codec
from taskdelta.deltas.format import file_encoding, tensor_checksum

# --- lossless -------------------------------------------------------------------------------------

_FLOATS = st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64])


@st.composite
def sorted_indices(draw, idx64: bool) -> torch.Tensor:
    """Strictly increasing indices with gaps of every varint length (1 to 5 bytes, or 9)."""
    top = 2**62 - 1 if idx64 else 2**31 - 1
    gaps = draw(st.lists(st.one_of(st.integers(0, 127), st.integers(128, 2**14),
                                   st.integers(0, 2**28), st.integers(0, top // 64)),
                         max_size=40))
    idx, at = [], -1
    for g in gaps:
        if at + g + 1 > top:
            break
        at += g + 1
        idx.append(at)
    return torch.tensor(idx, dtype=torch.int64 if idx64 else torch.int32)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), count=st.integers(0, 4), val_dtype=_FLOATS, idx64=st.booleans(),
       head_dtype=_FLOATS, seed=st.integers(0, 2**16))
def test_compact_and_plain_round_trip_exactly(data, count, val_dtype, idx64, head_dtype, seed):
    """plain -> compact -> plain is the identity (dtypes, empty tensors and int64 indices too), and
    both files carry the same checksum."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(count):
        idx = data.draw(sorted_indices(idx64))
        val = torch.randn(idx.numel(), generator=gen, dtype=torch.float64).to(val_dtype)
        tensors[f"layer.{i}.weight"] = SparseTensor(idx, val)
    heads = {"classifier.weight": torch.randn(2, 3, generator=gen).to(head_dtype)}
    delta = TaskDelta(meta=delta_meta(kind="classify", labels=["a", "b"]), tensors=tensors, heads=heads)
    plain, compact = dumps(delta), dumps(delta, encoding="compact")
    assert file_encoding(plain) == "plain" and file_encoding(compact) == "gap-varint"
    back = loads(compact)
    assert_same_delta(delta, back)
    assert_same_delta(delta, loads(dumps(back)))
    assert back.meta == loads(plain).meta  # the checksum included: it names the content


def test_compact_file_layout_is_the_documented_one():
    """`NAME::idx` is a uint8 stream: code byte 4 (int32), then LEB128 gaps (index - previous - 1)."""
    delta = TaskDelta(meta=delta_meta(), tensors={"w": SparseTensor(
        torch.tensor([3, 4, 300, 300 + 2**14 + 1], dtype=torch.int32), torch.ones(4))})
    data = dumps(delta, encoding="compact")
    header = file_header(data)
    assert header["__metadata__"]["encoding"] == "gap-varint"
    assert header["__metadata__"]["format_version"] == "1"
    assert header["w::idx"]["dtype"] == "U8"
    # gaps 3, 0, 295, 16384: 295 = 0b10_0100111 -> 0xA7 0x02; 16384 = 2^14 -> 0x80 0x80 0x01
    assert codec.encode(delta.tensors["w"].idx).tolist() == [4, 3, 0, 0xA7, 0x02, 0x80, 0x80, 0x01]
    assert loads(data).meta.checksum == tensor_checksum(delta.flat_tensors())


def test_compact_delta_swaps_like_the_plain_one(tiny_bert):
    """Served from a compact file, a task's weights are bitwise those of the plain file's."""
    delta = random_delta(tiny_bert, 0.02, seed=5, scale=0.3)
    plain, compact = loads(dumps(delta)), loads(dumps(delta, encoding="compact"))
    validate(compact, tiny_bert)
    merged = {n: p.detach().clone() for n, p in tiny_bert.params.items()}
    merge_into(merged, prepare(plain, tiny_bert))
    sw = Swapper(tiny_bert)
    with sw.swapped(prepare(compact, tiny_bert)):
        assert all(torch.equal(p, merged[n]) for n, p in tiny_bert.params.items())


def test_compact_needs_sorted_indices():
    delta = TaskDelta(meta=delta_meta(), tensors={"w": SparseTensor(
        torch.tensor([5, 2], dtype=torch.int32), torch.ones(2))})
    with pytest.raises(DeltaRejected, match="strictly increasing") as err:
        dumps(delta, encoding="compact")
    assert err.value.tensor == "w"
    with pytest.raises(ValueError, match="encoding must be one of"):
        dumps(delta, encoding="zip")


# --- size -------------------------------------------------------------------------------------------

def minilm_shapes() -> dict[str, tuple[int, ...]]:
    """all-MiniLM-L6-v2's parameter shapes (22.7 M entries), as `AutoModel` names them."""
    h, ffn = 384, 1536
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (30522, h),
        "embeddings.position_embeddings.weight": (512, h),
        "embeddings.token_type_embeddings.weight": (2, h),
        "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,),
    }
    for i in range(6):
        p = f"encoder.layer.{i}."
        for m in ("attention.self.query", "attention.self.key", "attention.self.value",
                  "attention.output.dense"):
            shapes |= {p + m + ".weight": (h, h), p + m + ".bias": (h,)}
        shapes |= {p + "intermediate.dense.weight": (ffn, h), p + "intermediate.dense.bias": (ffn,),
                   p + "output.dense.weight": (h, ffn), p + "output.dense.bias": (h,)}
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes |= {p + ln + ".weight": (h,), p + ln + ".bias": (h,)}
    return shapes | {"pooler.dense.weight": (h, h), "pooler.dense.bias": (h,)}


def synthetic_delta(density: float, dtype: torch.dtype, seed: int = 0) -> TaskDelta:
    """A random delta on minilm's shapes: round(density x numel) entries in every tensor."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in minilm_shapes().items():
        numel = torch.Size(shape).numel()
        k = round(density * numel)
        if k:
            idx = torch.randperm(numel, generator=gen)[:k].sort().values.to(torch.int32)
            tensors[name] = SparseTensor(idx, (torch.randn(k, generator=gen) * 1e-3).to(dtype))
    return TaskDelta(meta=delta_meta(provenance=Provenance(method="random", density=density)),
                     tensors=tensors)


def test_compact_is_under_3_5_bytes_per_nonzero_at_1_percent_in_bf16():
    """The whole file (header, metadata and values included) over the nonzeros, against the plain
    file of the same delta (6 bytes per nonzero and a little)."""
    delta = synthetic_delta(0.01, torch.bfloat16)
    assert delta.nnz > 200_000
    plain = len(dumps(delta)) / delta.nnz
    compact = len(dumps(delta, encoding="compact")) / delta.nnz
    print(f"\nminilm shapes, 1 %, bf16: plain {plain:.3f}, compact {compact:.3f} bytes per nonzero")
    assert plain > 6.0
    assert compact <= 3.5


# --- hostile streams ----------------------------------------------------------------------------

def _compact_file(flat: dict[str, torch.Tensor], checksum: str | None = None, **meta: str) -> bytes:
    fields = {"format": "taskdelta", "format_version": "1", "base_fingerprint": "sha256:feed",
              "base_name": "b", "kind": "embed", "labels": "[]",
              "provenance": json.dumps({"method": "test", "density": 0.5}),
              "encoding": "gap-varint", "checksum": checksum or "sha256:" + "0" * 64}
    return st_save(flat, metadata=fields | meta)


def _stream(*data: int) -> torch.Tensor:
    return torch.tensor(data, dtype=torch.uint8)


@pytest.mark.parametrize(("stream", "message"), [
    (_stream(4, 1, 0x85), "stream ends inside a number"),
    (_stream(4, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01), "takes 6 bytes, more than the 5"),
    (_stream(8, *([0x80] * 9), 0x01), "takes 10 bytes, more than the 9"),
    (_stream(4, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F), "index overflow"),  # 2^32 - 1: past int32
    (_stream(4, 0xFF, 0xFF, 0xFF, 0xFF, 0x07, 0x00), "index overflow"),
    (_stream(8, *([0xFF] * 8), 0x7F, *([0xFF] * 8), 0x7F), "index overflow"),
    (_stream(4, 0x85, 0x00), "ends in a zero byte"),
    (_stream(7, 1), "unknown index code 7"),
    (_stream(), "empty gap-varint index stream"),
    (torch.tensor([1, 2], dtype=torch.int32), "1-D uint8, not torch.int32"),
    (torch.zeros(2, 2, dtype=torch.uint8), "1-D uint8"),
])
def test_malformed_streams_are_refused_naming_the_tensor(stream: torch.Tensor, message: str):
    numbers = int((stream[1:] < 0x80).sum()) if stream.dtype == torch.uint8 and stream.dim() == 1 else 1
    flat = {"w::idx": stream, "w::val": torch.ones(max(1, numbers))}  # as many values as numbers
    with pytest.raises(DeltaRejected, match=message) as err:
        loads(_compact_file(flat))
    assert err.value.tensor == "w"


def test_stream_with_more_numbers_than_values_is_refused():
    flat = {"w::idx": _stream(4, 1, 2, 3), "w::val": torch.ones(2)}
    with pytest.raises(DeltaRejected, match="idx has 3 entries but val has 2") as err:
        loads(_compact_file(flat))
    assert err.value.tensor == "w"


def test_unknown_encoding_is_refused():
    flat = {"w::idx": _stream(4, 1), "w::val": torch.ones(1)}
    with pytest.raises(DeltaRejected, match="'encoding' is 'zstd'") as err:
        loads(_compact_file(flat, encoding="zstd"))
    assert err.value.tensor == "__metadata__"


def test_a_changed_stream_byte_fails_the_checksum():
    """The checksum hashes the decoded tensors, so a stream edited to other valid gaps is caught."""
    delta = TaskDelta(meta=delta_meta(), tensors={"w": SparseTensor(
        torch.tensor([1, 5, 9], dtype=torch.int32), torch.ones(3))})
    data = bytearray(dumps(delta, encoding="compact"))
    header = file_header(bytes(data))
    (n,) = struct.unpack("<Q", data[:8])
    start = 8 + n + header["w::idx"]["data_offsets"][0]
    assert data[start : start + 4] == bytes([4, 1, 3, 3])
    data[start + 2] = 2  # gap 3 -> 2: indices 1, 4, 8, still sorted
    with pytest.raises(DeltaRejected, match="checksum mismatch"):
        loads(bytes(data))


def test_a_reader_that_ignores_the_encoding_never_accepts_a_compact_file():
    """Dropping the `encoding` key (what a reader unaware of it does) leaves uint8 streams that
    fail the checksum, so a compact file is refused, never misread, by such a reader."""
    delta = synthetic_delta(0.05, torch.float32)
    data = dumps(delta, encoding="compact")
    header = file_header(data)
    header["__metadata__"].pop("encoding")
    raw = json.dumps(header).encode()
    (n,) = struct.unpack("<Q", data[:8])
    with pytest.raises(DeltaRejected):
        loads(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_out_of_range_compact_indices_are_refused_by_validate(tiny_bert):
    """A well-formed stream whose indices run past the tensor: loads decodes it, validate names it."""
    name = "encoder.layer.0.attention.self.query.weight"
    n = tiny_bert.params[name].numel()
    delta = random_delta(tiny_bert, 0.01, seed=1)
    idx = torch.tensor([0, n], dtype=torch.int32)
    delta = TaskDelta(meta=delta.meta, tensors={name: SparseTensor(idx, torch.ones(2))})
    back = loads(dumps(delta, encoding="compact"))
    with pytest.raises(DeltaRejected, match=f"index {n} out of range") as err:
        validate(back, tiny_bert)
    assert err.value.tensor == name


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=64), code=st.sampled_from([4, 8, 0, 255]))
def test_any_bytes_decode_to_sorted_indices_or_a_named_refusal(raw: bytes, code: int):
    """Fuzz: whatever follows the code byte, decode returns strictly increasing in-range indices
    of the code's dtype or raises DeltaRejected naming the tensor; nothing else escapes."""
    stream = torch.tensor([code, *raw], dtype=torch.uint8)
    try:
        idx = codec.decode(stream, "w")
    except DeltaRejected as exc:
        assert exc.tensor == "w"
        return
    assert idx.dtype == codec.CODES[code]
    assert idx.numel() == sum(b < 0x80 for b in raw)
    if idx.numel():
        assert int(idx[0]) >= 0 and bool((idx[1:] > idx[:-1]).all())
        assert torch.equal(codec.encode(idx), stream)  # and the encoding is canonical


_RAW_STREAM = st.tuples(st.sampled_from([4, 4, 4, 8, 0]), st.binary(max_size=24)).map(
    lambda cr: torch.tensor([cr[0], *cr[1]], dtype=torch.uint8))
_GOOD_STREAM = st.builds(codec.encode, sorted_indices(False))


@settings(max_examples=300, deadline=None)
@given(streams=st.lists(st.one_of(_GOOD_STREAM, _GOOD_STREAM, _RAW_STREAM), max_size=6),
       group=st.sampled_from([1, 2, 7, 32 * 1024]))
def test_decode_all_gives_what_decode_gives_stream_by_stream(streams, group):
    """`decode_all` (what `loads` runs: streams cut into pieces at number ends and decoded
    `group` bytes at a time) returns exactly what `decode` returns for each stream, or raises
    exactly its refusal for the first stream that `decode` refuses."""
    named = {f"t{i}": s for i, s in enumerate(streams)}
    try:
        expected = {name: codec.decode(s, name) for name, s in named.items()}
    except DeltaRejected as exc:
        expected = exc
    kept, codec._GROUP_BYTES = codec._GROUP_BYTES, group
    try:
        got = codec.decode_all(named)
    except DeltaRejected as exc:
        assert isinstance(expected, DeltaRejected)
        assert (str(exc), exc.tensor) == (str(expected), expected.tensor)
        return
    finally:
        codec._GROUP_BYTES = kept
    assert isinstance(expected, dict) and got.keys() == expected.keys()
    for name, idx in expected.items():
        assert got[name].dtype == idx.dtype and torch.equal(got[name], idx), name


def test_decode_all_cuts_a_long_stream_anywhere_and_decodes_it_whole():
    """A stream much longer than a group, with numbers of every int32 length, decodes the same
    however it is cut (group sizes that land a cut inside numbers of 1 to 5 bytes)."""
    gen = torch.Generator().manual_seed(0)
    gaps = torch.randint(0, 2**21, (4000,), generator=gen) >> torch.randint(0, 21, (4000,),
                                                                             generator=gen)
    idx = (torch.cumsum(gaps + 1, 0) - 1).to(torch.int32)
    streams = {"a": codec.encode(idx[:1000]), "b": codec.encode(idx), "c": codec.encode(idx[:3])}
    kept = codec._GROUP_BYTES
    try:
        for group in (1, 3, 5, 64, 1000, 4099):
            codec._GROUP_BYTES = group
            got = codec.decode_all(streams)
            assert [torch.equal(got[k], v) for k, v in
                    (("a", idx[:1000]), ("b", idx), ("c", idx[:3]))] == [True] * 3, group
    finally:
        codec._GROUP_BYTES = kept


def test_cli_writes_compact_by_default_and_plain_on_request(tiny_bert_dir, tmp_path):
    """`taskdelta delta random` writes gap-varint unless --encoding plain; both hold the same delta
    and `inspect --json` reports the encoding; an unknown encoding is one line of error."""
    from typer.testing import CliRunner

    from taskdelta.deltas import load
    from taskdelta.deltas.cli import app

    runner = CliRunner()
    paths = {}
    for enc in ("default", "plain", "compact"):
        paths[enc] = tmp_path / f"{enc}.safetensors"
        args = ["random", "--base", str(tiny_bert_dir), "-o", str(paths[enc]), "--density", "0.05"]
        result = runner.invoke(app, args + ([] if enc == "default" else ["--encoding", enc]))
        assert result.exit_code == 0, result.output
    data = {k: p.read_bytes() for k, p in paths.items()}
    assert file_encoding(data["default"]) == file_encoding(data["compact"]) == "gap-varint"
    assert file_encoding(data["plain"]) == "plain"
    assert len(data["compact"]) < 0.7 * len(data["plain"])
    assert_same_delta(load(paths["plain"]), load(paths["compact"]))
    info = json.loads(runner.invoke(app, ["inspect", str(paths["compact"]), "--json"]).stdout)
    assert info["encoding"] == "gap-varint" and info["bytes"] == len(data["compact"])
    bad = runner.invoke(app, ["random", "--base", str(tiny_bert_dir), "-o", str(tmp_path / "x"),
                              "--encoding", "zip"])
    assert bad.exit_code == 2 and "encoding must be one of" in bad.stderr
