"""The compact index encoding (`encoding: gap-varint`): sorted indices as LEB128 varints of their gaps.

A tensor's strictly increasing indices `i_0 < i_1 < ...` are stored as one uint8 stream: a code
byte (4: the indices decode to int32, 8: to int64), then for each index the gap `i_k - i_{k-1} - 1`
(with `i_{-1} = -1`, so the first gap is `i_0`) as an unsigned LEB128 varint: 7 bits per byte, low
bits first, the high bit set on every byte but a number's last. At 1 % density a gap is about 100,
so most indices take one byte instead of four.

Both directions are vectorised numpy (no per-element Python). `decode` is written for hostile
input: every way a stream can be malformed raises `DeltaRejected` naming the tensor, and only the
shortest form of a number is accepted, so a list of indices has exactly one encoding.

Measured against the alternatives on minilm's tensor shapes (see docs/delta-format.md): block-local
uint16 indices cost 2.0 bytes per index at any density; Elias-Fano is smaller on uniformly random
masks (1.07 vs 1.28 bytes at 1 %) but larger on clustered ones (1.50 vs 1.34 at 0.1 %), as masks of
real fine-tunes are, and decodes at the same speed; gap-varint is also the simplest to write by hand.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import DeltaRejected

GAP_VARINT = "gap-varint"
CODES = {4: torch.int32, 8: torch.int64}  # code byte -> decoded index dtype
CODE_OF = {v: k for k, v in CODES.items()}
MAX_VARINT_BYTES = {torch.int32: 5, torch.int64: 9}  # 9 x 7 = 63 bits: no int64 overflow
_LIMIT = {torch.int32: 2**31, torch.int64: 2**62}  # what an index may reach (int64: headroom)
_GROUP_BYTES = 32 * 1024  # about this many bytes of streams per vectorised pass (decode_all)


def encode(idx: torch.Tensor, name: str = "") -> torch.Tensor:
    """[nnz] int32/int64 strictly increasing, non-negative -> [bytes] uint8 stream."""
    if idx.dtype not in CODE_OF or idx.dim() != 1:
        raise DeltaRejected(f"gap-varint encodes 1-D int32/int64 indices, not {idx.dtype} "
                            f"{tuple(idx.shape)}", name)
    i = idx.detach().cpu().numpy().astype(np.int64)
    gaps = np.diff(i, prepend=-1) - 1
    if gaps.size and int(gaps.min()) < 0:
        at = int(np.flatnonzero(gaps < 0)[0])
        raise DeltaRejected(f"gap-varint needs non-negative, strictly increasing indices; index "
                            f"{int(i[at])} at position {at} is not", name)
    if i.size and int(i[-1]) >= _LIMIT[idx.dtype]:
        raise DeltaRejected(f"index {int(i[-1])} is past what gap-varint reads back", name)
    gaps = gaps.astype(np.uint64)
    sizes = np.ones(gaps.size, dtype=np.int64)
    for k in range(1, 10):
        sizes += gaps >= np.uint64(1 << (7 * k))
    owner = np.repeat(np.arange(gaps.size), sizes)  # which index each byte belongs to
    pos = np.arange(owner.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)  # byte within its number
    out = ((gaps[owner] >> (7 * pos).astype(np.uint64)) & np.uint64(0x7F)).astype(np.uint8)
    out[pos < sizes[owner] - 1] |= 0x80
    code = np.array([CODE_OF[idx.dtype]], dtype=np.uint8)
    return torch.from_numpy(np.concatenate([code, out]))


def count_numbers(stream: torch.Tensor) -> int:
    """How many indices a stream holds (its numbers' last bytes), without decoding it: compared
    with the values' length before a stream is decoded to 4-8 times its size. Counted a slice at
    a time, so counting allocates nothing in proportion to the stream."""
    data = stream.numpy()[1:]
    return sum(int(np.count_nonzero(data[at:at + _GROUP_BYTES] < 0x80))
               for at in range(0, data.size, _GROUP_BYTES))


def decode(stream: torch.Tensor, name: str) -> torch.Tensor:
    """[bytes] uint8 stream -> [nnz] int32/int64 indices, or `DeltaRejected` naming `name`.

    Worked a piece of about `_GROUP_BYTES` at a time into the one output array, so temporaries
    stay small whatever the stream's length: the form is checked over every piece first (each
    kind of fault over the whole stream before the next, so the refusal is the same however the
    stream is cut), then the pieces are decoded."""
    if stream.dtype != torch.uint8 or stream.dim() != 1:
        raise DeltaRejected(f"a gap-varint index stream is 1-D uint8, not {stream.dtype} "
                            f"{tuple(stream.shape)}", name)
    if stream.numel() == 0:
        raise DeltaRejected("empty gap-varint index stream (it starts with a code byte)", name)
    data = stream.numpy()
    code = int(data[0])
    if code not in CODES:
        raise DeltaRejected(f"unknown index code {code} (4: int32, 8: int64)", name)
    dtype, body = CODES[code], data[1:]
    if body.size and body[-1] >= 0x80:
        raise DeltaRejected("malformed varint: the stream ends inside a number", name)
    pieces = _pieces(body)
    for check in (_check_lengths, _check_shortest):
        first = 0
        for piece in pieces:
            first += check(piece, MAX_VARINT_BYTES[dtype], name, first)
    return torch.from_numpy(_decode_pieces(pieces, dtype, count_numbers(stream), name))


def _decode_pieces(pieces: list[np.ndarray], dtype: torch.dtype, count: int,
                   name: str) -> np.ndarray:
    """Well-formed pieces -> [count] indices, refusing any index at or past the dtype's limit."""
    out = np.empty(count, dtype=np.int32 if dtype == torch.int32 else np.int64)
    done, last = 0, -1  # numbers decoded so far; the last index decoded
    for piece in pieces:
        gaps = _varints(piece)
        # each index is below the limit iff their sum is: check before the cumulative sum can wrap
        if float(gaps.sum(dtype=np.float64)) + gaps.size + last >= _LIMIT[dtype]:
            raise DeltaRejected(f"index overflow: the gaps add up past {_LIMIT[dtype]} "
                                f"({'int32' if dtype == torch.int32 else 'int64'} indices)", name)
        gaps += 1
        idx = np.cumsum(gaps, out=gaps)
        idx += last
        out[done:done + idx.size] = idx
        done, last = done + idx.size, int(idx[-1]) if idx.size else last
    return out


def _pieces(body: np.ndarray) -> list[np.ndarray]:
    """A stream's numbers (its last byte ends one) in pieces of about `_GROUP_BYTES`, each
    ending where a number does, however long that number is."""
    pieces, at = [], 0
    while body.size - at > _GROUP_BYTES:
        cut, reach = at + _GROUP_BYTES - 1, 16
        while True:  # the next number end at or after `cut` (a window that grows: O(bytes))
            ends = np.flatnonzero(body[cut:cut + reach] < 0x80)
            if ends.size:
                break
            cut, reach = cut + reach, reach * 2
        cut += int(ends[0]) + 1
        pieces.append(body[at:cut])
        at = cut
    return [*pieces, body[at:]]


def _check_lengths(piece: np.ndarray, max_bytes: int, name: str, first: int) -> int:
    """Refuse a number longer than the index type allows; returns the piece's number count."""
    ends = np.flatnonzero(piece < 0x80)
    sizes = np.diff(ends, prepend=-1)
    if sizes.size and int(sizes.max()) > max_bytes:
        at = int(np.flatnonzero(sizes > max_bytes)[0])
        raise DeltaRejected(f"malformed varint: number {first + at} takes {int(sizes[at])} bytes, "
                            f"more than the {max_bytes} its index type allows", name)
    return int(ends.size)


def _check_shortest(piece: np.ndarray, max_bytes: int, name: str, first: int) -> int:
    """Refuse a number not in its shortest form; returns the piece's number count."""
    ends = np.flatnonzero(piece < 0x80)
    padded = (np.diff(ends, prepend=-1) > 1) & (piece[ends] == 0)  # 0x80 0x00 is 0 in two bytes
    if padded.any():
        at = int(np.flatnonzero(padded)[0])
        raise DeltaRejected(f"malformed varint: number {first + at} ends in a zero byte (not the "
                            "shortest form)", name)
    return int(ends.size)


def decode_all(streams: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Many streams (name -> [bytes] uint8) -> the same names -> indices, as `decode` gives them.

    The int32 streams are cut at number boundaries into pieces and decoded a group of pieces at
    a time, one vectorised pass over each group's concatenation. A file has ~100 streams, most of
    a few KB, where a `decode` each pays numpy's per-call overhead many times over; and a pass
    over much more than `_GROUP_BYTES` allocates temporaries that the C allocator takes from fresh
    pages every time (measured: the page faults made one whole-file pass slower than one pass per
    stream). If a pass finds anything malformed, every stream goes back through `decode`, in
    order, so the refusal is exactly the one `decode` gives, naming the first bad tensor."""
    try:
        return _decode_int32(streams)
    except _OneByOne:
        return {name: decode(s, name) for name, s in streams.items()}


class _OneByOne(Exception):
    """Something is not a well-formed int32 stream (or is an int64 one): decode one by one."""


def _decode_int32(streams: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    outs: dict[str, np.ndarray] = {}  # [numbers] int32 per stream, allocated once at its count
    filled = dict.fromkeys(streams, 0)  # numbers written so far, per stream
    sums = dict.fromkeys(streams, 0)  # the steps (gap + 1) decoded so far, per stream

    def flush(group: list[tuple[str, np.ndarray]]) -> None:
        if not group:
            return
        total, bounds = _running_steps([p for _, p in group])
        for (name, _), a, b in zip(group, bounds, bounds[1:], strict=False):
            if b == a:
                continue
            before = int(total[a - 1]) if a else 0  # the steps of the group's earlier pieces
            if sums[name] + int(total[b - 1]) - before > _LIMIT[torch.int32]:
                raise _OneByOne  # an index at or past 2^31
            at = filled[name]  # the piece's indices, all < 2^31, into their place
            np.subtract(total[a:b], before - sums[name] + 1, out=outs[name][at:at + b - a],
                        casting="unsafe")
            filled[name] += b - a
            sums[name] += int(total[b - 1]) - before

    group: list[tuple[str, np.ndarray]] = []
    size = 0
    for name, s in streams.items():
        if s.dtype != torch.uint8 or s.dim() != 1 or s.numel() == 0:
            raise _OneByOne
        data = s.numpy()
        if data[0] != CODE_OF[torch.int32]:
            raise _OneByOne
        outs[name] = np.empty(count_numbers(s), dtype=np.int32)
        for piece in _cut(data[1:]):
            group.append((name, piece))
            size += piece.size
            if size >= _GROUP_BYTES:
                flush(group)
                group, size = [], 0
    flush(group)
    return {name: torch.from_numpy(out) for name, out in outs.items()}


def _cut(body: np.ndarray) -> list[np.ndarray]:
    """A stream's numbers in pieces of about `_GROUP_BYTES`, each ending where a number does."""
    pieces, at = [], 0
    while body.size - at > _GROUP_BYTES:
        window = body[at + _GROUP_BYTES - 1:at + _GROUP_BYTES - 1 + MAX_VARINT_BYTES[torch.int32]]
        ends = np.flatnonzero(window < 0x80)
        if not ends.size:
            raise _OneByOne  # a number longer than any int32 index takes
        cut = at + _GROUP_BYTES + int(ends[0])
        pieces.append(body[at:cut])
        at = cut
    return [*pieces, body[at:]]


def _running_steps(pieces: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """Pieces of LEB128 numbers -> the running sum of (number + 1) over all of them, int64, and
    where each piece's numbers are in it: piece i's are [bounds[i], bounds[i + 1])."""
    data = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)  # [bytes] uint8
    lengths = np.array([p.size for p in pieces])
    stops = np.cumsum(lengths)  # one past each piece's last byte
    last = data < 0x80  # the last byte of each number
    if not last[stops[lengths > 0] - 1].all():
        raise _OneByOne  # a stream ends inside a number (so no number straddles two pieces)
    ends = np.flatnonzero(last)
    sizes = np.diff(ends, prepend=-1)  # [numbers] bytes of each
    longest = int(sizes.max()) if sizes.size else 1
    if longest > MAX_VARINT_BYTES[torch.int32] or bool(((sizes > 1) & (data[ends] == 0)).any()):
        raise _OneByOne  # too long, or not the shortest form
    low = data & 0x7F
    steps = low[ends].astype(np.int64)  # gap + 1 of each index, from its top 7 bits down
    for back in range(1, longest):
        more = np.flatnonzero(sizes > back)
        steps[more] = (steps[more] << 7) | low[ends[more] - back]
    steps += 1
    total = np.cumsum(steps, out=steps)  # < 2^17 steps (bytes) of < 2^35 each: no wrap
    return total, [0, *np.searchsorted(ends, stops).tolist()]


def _varints(data: np.ndarray) -> np.ndarray:
    """Well-formed LEB128 numbers (`_check_lengths`, `_check_shortest`) of a uint8 array, each
    ending inside it -> int64 array."""
    if data.size == 0:
        return np.zeros(0, dtype=np.int64)
    last = data < 0x80  # the last byte of each number
    if last.all():  # every gap below 128: one byte each
        return data.astype(np.int64)
    ends = np.flatnonzero(last)
    sizes = np.diff(ends, prepend=-1)
    low = (data & 0x7F).astype(np.int64)
    out = low[ends]  # the most significant 7 bits of each number...
    for back in range(1, int(sizes.max())):  # ...then the bytes before it, high to low
        more = np.flatnonzero(sizes > back)
        out[more] = (out[more] << 7) | low[ends[more] - back]
    return out
