"""Delta format v1: the in-memory `TaskDelta` and its safetensors encoding.

See docs/delta-format.md for the spec. This module parses and writes files; `validate.py` checks a
delta against a loaded base. Nothing here unpickles: safetensors only, and the header is checked by
hand before the safetensors parser sees the bytes, so a truncated or lying file gets a clear message.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import encoding as codec
from .errors import DeltaRejected

FORMAT_NAME = "taskdelta"
FORMAT_VERSION = 1
IDX_SUFFIX = "::idx"
VAL_SUFFIX = "::val"
HEAD_PREFIX = "head::"
MAX_HEADER_BYTES = 16 * 1024 * 1024  # a header larger than this is hostile, not a delta
# How `NAME::idx` is stored (metadata key `encoding`): "plain" int32/int64 tensors, or
# "gap-varint" uint8 streams (encoding.py); "compact" is the name `dumps` takes for the latter.
PLAIN = "plain"
ENCODINGS: tuple[str, ...] = (PLAIN, codec.GAP_VARINT)
ENCODING_ALIASES = {"compact": codec.GAP_VARINT, "v1": PLAIN}
TaskKind = Literal["classify", "generate", "embed"]
TASK_KINDS: tuple[str, ...] = ("classify", "generate", "embed")

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
    base_fingerprint: str = Field(min_length=1)
    kind: TaskKind
    labels: list[str] = Field(default_factory=list)
    provenance: Provenance
    base_name: str = ""
    checksum: str = ""


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

    verify_checksum=False skips only the content checksum (every form check still runs): for
    bytes whose identity is already verified, e.g. the server's store reading back, under its
    sha256, the very bytes it checked at upload (see docs/delta-format.md, *Trust on load*)."""
    data = bytes(data)
    if max_bytes is not None and len(data) > max_bytes:
        raise DeltaRejected(f"file is {len(data)} bytes, over the limit of {max_bytes} bytes")
    header = read_header(data)
    raw_meta = header.pop("__metadata__", None)
    meta = _parse_meta(raw_meta)
    encoding = _parse_encoding(raw_meta)
    try:
        flat = st_load(data)
    except Exception as exc:  # the safetensors parser's own errors are not one type
        raise DeltaRejected(f"not a valid safetensors file: {exc}") from exc
    if encoding != PLAIN:  # decoded once here: everything after sees plain index tensors
        decoded = codec.decode_all({k[: -len(IDX_SUFFIX)]: v for k, v in flat.items() if _is_idx(k)})
        flat = {k: decoded[k[: -len(IDX_SUFFIX)]] if _is_idx(k) else v for k, v in flat.items()}
    delta = _split(flat, meta)
    if not verify_checksum:
        return delta
    actual = tensor_checksum(flat)
    if meta.checksum != actual:
        raise DeltaRejected(f"checksum mismatch: metadata says {meta.checksum}, tensors hash to {actual}",
                            "__metadata__.checksum")
    return delta


def read_header(data: bytes) -> dict[str, Any]:
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
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeltaRejected(f"malformed header: {exc}") from exc
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
    try:
        version = int(raw.get("format_version", ""))
    except ValueError:
        raise DeltaRejected("metadata 'format_version' missing or not an integer", "__metadata__") from None
    if version != FORMAT_VERSION:
        raise DeltaRejected(f"format version {version} is not supported (this build reads "
                            f"{FORMAT_VERSION})", "__metadata__")
    try:
        fields = {k: raw[k] for k in ("base_fingerprint", "kind", "checksum", "base_name") if k in raw}
        fields["labels"] = json.loads(raw.get("labels", "[]"))
        fields["provenance"] = json.loads(raw["provenance"]) if "provenance" in raw else None
        return DeltaMeta(format_version=version, **fields)
    except (json.JSONDecodeError, ValidationError, TypeError) as exc:
        raise DeltaRejected(f"malformed metadata: {_short(exc)}", "__metadata__") from exc


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
    return str(exc)
