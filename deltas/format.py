"""Delta format v1: the in-memory `TaskDelta` and its safetensors encoding.

See docs/delta-format.md for the spec. This module parses and writes files; `validate.py` checks a
delta against a loaded base. Nothing here unpickles: safetensors only, and the header is checked by
hand before the safetensors parser sees the bytes, so a truncated or lying file gets a clear message.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import save as st_save

from . import encoding as codec
from .errors import DeltaRejected

FORMAT_NAME = "taskdelta"
FORMAT_VERSION = 1
IDX_SUFFIX = "::idx"
VAL_SUFFIX = "::val"
HEAD_PREFIX = "head::"
MAX_HEADER_BYTES = 16 * 1024 * 1024  # a header larger than this is hostile, not a delta
# The server stores and returns these with every listing of the task: bounded, so a list of a
# tenant's tasks stays small (labels are bounded by the server's own settings).
MAX_NAME_CHARS = 256  # base_fingerprint, base_name, checksum
MAX_PROVENANCE_CHARS = 64 * 1024  # the provenance JSON
# How `NAME::idx` is stored (metadata key `encoding`): "plain" int32/int64 tensors, or
# "gap-varint" uint8 streams (encoding.py); "compact" is the name `dumps` takes for the latter.
PLAIN = "plain"
ENCODINGS: tuple[str, ...] = (PLAIN, codec.GAP_VARINT)
ENCODING_ALIASES = {"compact": codec.GAP_VARINT, "v1": PLAIN}
TaskKind = Literal["classify", "regress", "generate", "embed"]
TASK_KINDS: tuple[str, ...] = ("classify", "regress", "generate", "embed")
# Kinds whose task model is the base's sequence-classification wrapper: the shared backbone, its
# pooler and a dense head of one output per label. A regress task is that model with one output
# (its single label names the value, e.g. "score"), read raw instead of through a softmax: one
# code path, the head's width taken from the labels for both.
HEAD_KINDS: tuple[str, ...] = ("classify", "regress")

_ST_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL",
              "F8_E4M3", "F8_E5M2", "U16", "U32", "U64"}


class Provenance(BaseModel):
    """How a delta was made. Extra keys (hyper-parameters, scores) are kept as given."""

    model_config = ConfigDict(extra="allow", frozen=True)
    method: str = Field(min_length=1)
    density: float = Field(ge=0.0, le=1.0)


class DeltaMeta(BaseModel):
    """The `__metadata__` of a delta file, typed. `checksum` is filled in by `dumps`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    format_version: int = FORMAT_VERSION
    base_fingerprint: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    kind: TaskKind
    labels: list[str] = Field(default_factory=list)
    provenance: Provenance
    base_name: str = Field("", max_length=MAX_NAME_CHARS)
    checksum: str = Field("", max_length=MAX_NAME_CHARS)


@dataclass(frozen=True)
class SparseTensor:
    """Increments at sorted flat indices of one base tensor."""

    idx: torch.Tensor  # [nnz] int32 (int64 for tensors of 2^31+ entries), strictly increasing
    val: torch.Tensor  # [nnz] float, the base dtype or wider

    @property
    def nnz(self) -> int:
        return int(self.idx.numel())

    @property
    def nbytes(self) -> int:
        return self.idx.numel() * self.idx.element_size() + self.val.numel() * self.val.element_size()


@dataclass(frozen=True)
class TaskDelta:
    """One task: sparse increments per base tensor plus dense head tensors (names without `head::`)."""

    meta: DeltaMeta
    tensors: dict[str, SparseTensor] = field(default_factory=dict)
    heads: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nnz(self) -> int:
        return sum(t.nnz for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        heads = sum(h.numel() * h.element_size() for h in self.heads.values())
        return sum(t.nbytes for t in self.tensors.values()) + heads

    def flat_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors as the file stores them, keyed by file name."""
        out: dict[str, torch.Tensor] = {}
        for name, sp in self.tensors.items():
            out[name + IDX_SUFFIX] = sp.idx
            out[name + VAL_SUFFIX] = sp.val
        for name, h in self.heads.items():
            out[HEAD_PREFIX + name] = h
        return out


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return "sha256:" + h.hexdigest()


def dumps(delta: TaskDelta, encoding: str = PLAIN) -> bytes:
    """Encode a delta as safetensors bytes, stamping the checksum into the metadata.

    encoding: "plain" (int32 index tensors) or "compact" / "gap-varint" (about a quarter of the
    index bytes; indices must be strictly increasing). The checksum is the same for both: it
    hashes the plain tensors, whatever the file stores."""
    encoding = resolve_encoding(encoding)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in delta.flat_tensors().items()}
    meta = delta.meta.model_copy(update={"checksum": tensor_checksum(tensors)})
    if encoding != PLAIN:
        tensors = {k: codec.encode(v, k[: -len(IDX_SUFFIX)]) if _is_idx(k) else v
                   for k, v in tensors.items()}
    return st_save(tensors, metadata=_meta_to_strings(meta, encoding))


def resolve_encoding(encoding: str) -> str:
    name = ENCODING_ALIASES.get(encoding, encoding)
    if name not in ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join([*ENCODINGS, *ENCODING_ALIASES])}, "
                         f"not {encoding!r}")
    return name


def save(delta: TaskDelta, path: str | Path, encoding: str = PLAIN) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(dumps(delta, encoding))
    tmp.replace(path)  # never leave a half-written delta under the final name
    return path


def load(path: str | Path, max_bytes: int | None = None) -> TaskDelta:
    path = Path(path)
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise DeltaRejected(f"file is {size} bytes, over the limit of {max_bytes} bytes")
    return loads(path.read_bytes(), max_bytes=max_bytes)


def loads(data: bytes | bytearray | memoryview, max_bytes: int | None = None, *,
          verify_checksum: bool = True) -> TaskDelta:
    """Parse delta bytes. Raises `DeltaRejected` naming the problem; never unpickles.

    A `bytearray` is not copied: the delta's tensors are views of it (the server's upload path,
    whose peak memory is bounded by twice the body). Other inputs are copied once.

    verify_checksum=False skips only the content checksum (every form check still runs): for
    bytes whose identity is already verified, e.g. the server's store reading back, under its
    sha256, the very bytes it checked at upload (see docs/delta-format.md, *Trust on load*)."""
    if not isinstance(data, bytearray):
        data = bytearray(data)  # writable: tensors may be views of it
    if max_bytes is not None and len(data) > max_bytes:
        raise DeltaRejected(f"file is {len(data)} bytes, over the limit of {max_bytes} bytes")
    header = read_header(data)
    raw_meta = header.pop("__metadata__", None)
    meta = _parse_meta(raw_meta)
    encoding = _parse_encoding(raw_meta)
    if encoding != PLAIN:
        _check_stream_lengths(header)  # before anything is decoded, from the header alone
    flat = tensor_views(data, header)
    if encoding != PLAIN:  # decoded once here: everything after sees plain index tensors
        streams = {k[: -len(IDX_SUFFIX)]: v for k, v in flat.items() if _is_idx(k)}
        _check_stream_counts(streams, flat)
        decoded = codec.decode_all(streams)
        flat = {k: decoded[k[: -len(IDX_SUFFIX)]] if _is_idx(k) else v for k, v in flat.items()}
    delta = _split(flat, meta)
    if not verify_checksum:
        return delta
    actual = tensor_checksum(flat)
    if meta.checksum != actual:
        raise DeltaRejected(f"checksum mismatch: metadata says {meta.checksum}, tensors hash to {actual}",
                            "__metadata__.checksum")
    return delta


_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                 "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                 "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
                 "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
                 "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}


def tensor_views(data: bytearray, header: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors a checked header (`read_header`, without `__metadata__`) describes, as views
    of `data` (no copy; one misaligned for its dtype is copied). Refused as safetensors refuses:
    a shape that does not match its bytes, or data regions that leave gaps or overlap."""
    start = 8 + struct.unpack("<Q", data[:8])[0]
    spans = sorted((e["data_offsets"][0], e["data_offsets"][1], k) for k, e in header.items())
    expected = 0
    for begin, end, key in spans:
        if begin != expected:
            raise DeltaRejected("not a valid safetensors file: data regions overlap or leave a "
                                f"gap at byte {begin}", key)
        expected = end
    if expected != len(data) - start:
        raise DeltaRejected(f"not a valid safetensors file: the tensors cover {expected} of the "
                            f"{len(data) - start} data bytes")
    return {key: _view(data, start, key, header[key]) for key in header}


def _view(data: bytearray, start: int, key: str, entry: dict[str, Any]) -> torch.Tensor:
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise DeltaRejected("malformed header entry (shape)", key)
    dtype = _TORCH_DTYPES[entry["dtype"]]
    begin, end = entry["data_offsets"]
    numel = math.prod(shape)
    if numel * dtype.itemsize != end - begin:
        raise DeltaRejected(f"not a valid safetensors file: shape {shape} of {entry['dtype']} "
                            f"needs {numel * dtype.itemsize} bytes, the offsets give {end - begin}",
                            key)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(data, dtype=dtype, count=numel, offset=start + begin)
    if (start + begin) % dtype.itemsize:
        flat = flat.clone()  # kernels may assume aligned elements
    return flat.view(shape)


def _check_stream_lengths(header: dict[str, Any]) -> None:
    """A gap-varint stream of B bytes holds between (B - 1) / 9 and B - 1 indices: refuse, from
    the header alone, a stream far longer or shorter than its values need (one number's slack
    is left, so that a single malformed number gets `decode`'s precise message). The exact count
    is compared before decoding (`_check_stream_counts`)."""
    longest = max(codec.MAX_VARINT_BYTES.values())
    for key, entry in header.items():
        if not _is_idx(key) or not isinstance(entry, dict) or entry.get("dtype") != "U8":
            continue  # not a stream: refused with its own message by `decode`
        val = header.get(key[: -len(IDX_SUFFIX)] + VAL_SUFFIX)
        name, stream, values = key[: -len(IDX_SUFFIX)], _numel(entry), _numel(val)
        if not stream or values is None:
            continue  # empty, malformed or unpaired: refused with its own message later
        if not values <= stream - 1 <= (values + 1) * longest:
            raise DeltaRejected(f"an index stream of {stream} bytes cannot hold exactly the "
                                f"{values} indices its values need", name)


def _numel(entry: object) -> int | None:
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    return math.prod(shape)


def _check_stream_counts(streams: dict[str, torch.Tensor], flat: dict[str, torch.Tensor]) -> None:
    """Each stream holds exactly as many indices as its values, counted without decoding."""
    for name, stream in streams.items():
        val = flat.get(name + VAL_SUFFIX)
        if val is None or stream.dtype != torch.uint8 or stream.dim() != 1 or not stream.numel():
            continue  # refused with its own message by `decode` or `_split`
        count = codec.count_numbers(stream)
        if count != val.numel():
            raise DeltaRejected(f"idx has {count} entries but val has {val.numel()}", name)


def read_header(data: bytes | bytearray) -> dict[str, Any]:
    """The safetensors JSON header, checked against the file's real length."""
    if len(data) < 8:
        raise DeltaRejected(f"truncated file: {len(data)} bytes, a safetensors header needs 8")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES:
        raise DeltaRejected(f"header claims {n} bytes, over the limit of {MAX_HEADER_BYTES}")
    if 8 + n > len(data):
        raise DeltaRejected(f"truncated file: header claims {n} bytes but only {len(data) - 8} follow")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSON, huge ints
        raise DeltaRejected(f"malformed header: {_short(exc)}") from exc
    if not isinstance(header, dict):
        raise DeltaRejected("malformed header: not a JSON object")
    body = len(data) - 8 - n
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in _ST_DTYPES:
            raise DeltaRejected("malformed header entry (dtype)", key)
        offsets = entry.get("data_offsets")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
            raise DeltaRejected("malformed header entry (data_offsets)", key)
        end = max(end, offsets[1])
    if end > body:
        raise DeltaRejected(f"truncated file: tensors need {end} data bytes, file has {body}")
    return header


def _parse_meta(raw: object) -> DeltaMeta:
    if not isinstance(raw, dict):
        raise DeltaRejected("missing metadata: not a taskdelta file", "__metadata__")
    # safetensors metadata maps strings to strings; a hand-made header may not
    odd = sorted(k for k, v in raw.items() if not isinstance(v, str))
    if odd:
        raise DeltaRejected(f"malformed metadata: values must be strings, not for {odd}",
                            "__metadata__")
    if raw.get("format") != FORMAT_NAME:
        raise DeltaRejected(f"metadata 'format' is {raw.get('format')!r}, expected {FORMAT_NAME!r}",
                            "__metadata__")
    written = raw.get("format_version", "")
    if not (written.isascii() and written.isdigit()):  # what the writer writes: no sign, space or "_"
        raise DeltaRejected("metadata 'format_version' missing or not an integer", "__metadata__")
    version = int(written)
    if version != FORMAT_VERSION:
        raise DeltaRejected(f"format version {version} is not supported (this build reads "
                            f"{FORMAT_VERSION})", "__metadata__")
    try:
        fields = {k: raw[k] for k in ("base_fingerprint", "kind", "checksum", "base_name") if k in raw}
        fields["labels"] = _strict_json(raw.get("labels", "[]"))
        if len(raw.get("provenance", "")) > MAX_PROVENANCE_CHARS:
            raise ValueError(f"provenance is {len(raw['provenance'])} characters, over the limit "
                             f"of {MAX_PROVENANCE_CHARS}")
        fields["provenance"] = _strict_json(raw["provenance"]) if "provenance" in raw else None
        return DeltaMeta(format_version=version, **fields)
    except (ValueError, ValidationError, TypeError, RecursionError) as exc:
        # ValueError: not JSON, or an integer of more digits than Python converts;
        # RecursionError: JSON nested deeper than the parser recurses
        raise DeltaRejected(f"malformed metadata: {_short(exc)}", "__metadata__") from exc


def _strict_json(text: str) -> Any:
    """JSON without NaN or Infinity (Python's json reads them; they are not JSON, and the server
    would hand them back to clients whose parsers refuse them), nor numbers past a double's range
    (1e400 reads as inf and would be handed back as null)."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not a JSON value")

    def finite(number: str) -> float:
        if math.isinf(value := float(number)):
            raise ValueError(f"{number[:40]} is beyond a double's range")
        return value
    return json.loads(text, parse_constant=refuse, parse_float=finite)


def _is_idx(key: str) -> bool:
    return key.endswith(IDX_SUFFIX) and not key.startswith(HEAD_PREFIX)


def file_encoding(data: bytes) -> str:
    """The index encoding a delta file declares (its header only; nothing decoded or checked)."""
    raw = read_header(data).get("__metadata__")
    return raw.get("encoding", PLAIN) if isinstance(raw, dict) else PLAIN


def _parse_encoding(raw: dict[str, str]) -> str:
    encoding = raw.get("encoding", PLAIN)
    if encoding not in ENCODINGS:
        raise DeltaRejected(f"metadata 'encoding' is {encoding!r}; this build reads "
                            f"{', '.join(ENCODINGS)}", "__metadata__")
    return encoding


def _meta_to_strings(meta: DeltaMeta, encoding: str = PLAIN) -> dict[str, str]:
    extra = {} if encoding == PLAIN else {"encoding": encoding}
    return extra | {
        "format": FORMAT_NAME,
        "format_version": str(meta.format_version),
        "base_fingerprint": meta.base_fingerprint,
        "base_name": meta.base_name,
        "kind": meta.kind,
        "labels": json.dumps(meta.labels),
        "provenance": meta.provenance.model_dump_json(),
        "checksum": meta.checksum,
    }


def _split(flat: dict[str, torch.Tensor], meta: DeltaMeta) -> TaskDelta:
    idx: dict[str, torch.Tensor] = {}
    val: dict[str, torch.Tensor] = {}
    heads: dict[str, torch.Tensor] = {}
    for key, t in flat.items():
        if key.startswith(HEAD_PREFIX):
            heads[key[len(HEAD_PREFIX):]] = t
        elif key.endswith(IDX_SUFFIX):
            idx[key[: -len(IDX_SUFFIX)]] = t
        elif key.endswith(VAL_SUFFIX):
            val[key[: -len(VAL_SUFFIX)]] = t
        else:
            raise DeltaRejected("not a delta tensor name (expected NAME::idx, NAME::val or head::NAME)",
                                key)
    for name in sorted(idx.keys() ^ val.keys()):
        missing = VAL_SUFFIX if name in idx else IDX_SUFFIX
        raise DeltaRejected(f"has no matching {name}{missing}", name)
    tensors = {}
    for name in sorted(idx):
        i, v = idx[name], val[name]
        if i.dim() != 1 or v.dim() != 1:
            raise DeltaRejected(f"idx and val must be 1-D, got shapes {tuple(i.shape)} and "
                                f"{tuple(v.shape)}", name)
        if i.numel() != v.numel():
            raise DeltaRejected(f"idx has {i.numel()} entries but val has {v.numel()}", name)
        tensors[name] = SparseTensor(i, v)
    return TaskDelta(meta=meta, tensors=tensors, heads=heads)


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply"
    return str(exc)[:200]
