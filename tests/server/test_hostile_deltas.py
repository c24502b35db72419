"""Hostile deltas through the real HTTP upload: each is refused with a 4xx whose message names the
problem, nothing is stored (no new task, an existing task keeps its version, Redis holds exactly
the keys it held), the base stays bit-identical and the server stays ready. A multi-GB streamed
body is refused at the size limit without the server buffering it."""

from __future__ import annotations

import json
import os
import pickle
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
import torch
from safetensors.torch import save as st_save
from support import assert_bit_identical, rss_bytes, snapshot

from taskdelta.deltas import dumps, random_delta
from taskdelta.deltas.format import tensor_checksum
from taskdelta.server.app import create_app
from taskdelta.server.settings import Settings

KEY = "hostile-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
W = "embeddings.word_embeddings.weight"  # [30522, 32] in the tiny BERT: ~1,000 entries at 0.1 %
LIMIT = 24 * 1024 * 1024  # the upload limit of these tests: above MAX_HEADER_BYTES (16 MiB)


@dataclass(frozen=True)
class Hostile:
    name: str
    body: bytes
    words: tuple[str, ...]  # what the error message must say (lower case)
    status: int = 422


def meta_strings(delta, **over: str) -> dict[str, str]:
    m = delta.meta
    meta = {"format": "taskdelta", "format_version": "1", "base_fingerprint": m.base_fingerprint,
            "base_name": m.base_name, "kind": m.kind, "labels": json.dumps(m.labels),
            "provenance": m.provenance.model_dump_json()}
    return meta | over


def craft(delta, tensors: dict[str, torch.Tensor], **meta_over: str) -> bytes:
    """A well-formed file (right checksum unless overridden) holding exactly `tensors`."""
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    meta = meta_strings(delta, checksum=tensor_checksum(tensors)) | meta_over
    return st_save(tensors, metadata=meta)


def with_header(data: bytes, header: object) -> bytes:
    """The file's data section behind a hand-written JSON header."""
    (n,) = struct.unpack("<Q", data[:8])
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def header_of(data: bytes) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n])


class Mkdir:
    """Unpickling this creates a directory: the proof that something unpickled an upload."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def hostile_corpus(base, marker: Path) -> list[Hostile]:
    good = random_delta(base, 0.001, seed=11, kind="classify", labels=["neg", "pos"], scale=0.1)
    flat = {k: v.contiguous() for k, v in good.flat_tensors().items()}
    data = dumps(good)
    (n,) = struct.unpack("<Q", data[:8])
    idx, val = flat[f"{W}::idx"], flat[f"{W}::val"]
    numel = base.params[W].numel()

    def swap(name: str, tensor: torch.Tensor, **meta: str) -> bytes:
        return craft(good, flat | {name: tensor}, **meta)

    def edit(fn) -> bytes:  # a change to one tensor's values, checksum kept right
        v = val.clone()
        fn(v)
        return swap(f"{W}::val", v)

    def index(fn) -> bytes:
        i = idx.clone()
        fn(i)
        return swap(f"{W}::idx", i)

    without = {k: v for k, v in flat.items() if k != f"{W}::val"}
    header = header_of(data)
    first = next(k for k in header if k != "__metadata__")
    torch_zip = Path(marker.parent / "model.pt")
    torch.save({"w": torch.zeros(4)}, torch_zip)
    return [
        # -- framing: empty, truncated, lying or huge headers, enormous claimed sizes ----------
        Hostile("empty body", b"", ("truncated", "0 bytes")),
        Hostile("4 bytes", data[:4], ("truncated",)),
        Hostile("cut in the header", data[:8 + n // 2], ("truncated", "header claims")),
        Hostile("cut in the data", data[:len(data) // 2 + n // 2], ("truncated",)),
        Hostile("one byte short", data[:-1], ("truncated",)),
        Hostile("header claims more bytes than exist", struct.pack("<Q", len(data)) + data[8:],
                ("truncated", "header claims")),
        Hostile("header length 2^63", struct.pack("<Q", 2**63) + data[8:], ("header claims", "limit")),
        Hostile("header length 2^64-1", b"\xff" * 8 + data[8:], ("header claims", "limit")),
        Hostile("an actual 17 MiB header", with_header(data, header | {
            "__metadata__": header["__metadata__"] | {"pad": "x" * (17 * 1024 * 1024)}}),
            ("header claims", "limit")),
        Hostile("header not UTF-8 JSON", struct.pack("<Q", 4) + b"\xff\xfe\x00{" + data[8 + n:],
                ("malformed header",)),
        Hostile("header a JSON array", with_header(data, [1, 2]), ("malformed header", "json object")),
        Hostile("unknown dtype in the header", with_header(data, header | {
            first: header[first] | {"dtype": "F128"}}), ("malformed header entry", first)),
        Hostile("negative data offsets", with_header(data, header | {
            first: header[first] | {"data_offsets": [-8, 0]}}), ("data_offsets", first)),
        Hostile("enormous claimed tensor", with_header(data, header | {
            first: {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}),
            ("truncated", "tensors need")),
        Hostile("enormous shape on few bytes", with_header(data, header | {
            first: header[first] | {"shape": [2**31, 2**31, 2**31]}}), ("not a valid safetensors",)),
        Hostile("pickle renamed .safetensors", pickle.dumps(Mkdir(str(marker))),
                ("header claims",)),
        Hostile("torch.save zip renamed .safetensors", torch_zip.read_bytes(), ("header claims",)),
        Hostile("random bytes", bytes(range(256)) * 64, ("header claims",)),
        # -- metadata: missing or lying ---------------------------------------------------------
        Hostile("no metadata", st_save(flat), ("missing metadata",)),
        Hostile("not a taskdelta file", swap(f"{W}::idx", idx, format="other"), ("format",)),
        Hostile("format version 2", swap(f"{W}::idx", idx, format_version="2"), ("format version 2",)),
        Hostile("format version not a number", swap(f"{W}::idx", idx, format_version="one"),
                ("format_version",)),
        Hostile("wrong fingerprint", swap(f"{W}::idx", idx, base_fingerprint="sha256:" + "0" * 64),
                ("base_fingerprint", "made for base")),
        Hostile("wrong checksum", swap(f"{W}::idx", idx, checksum="sha256:" + "1" * 64),
                ("checksum mismatch",)),
        Hostile("missing checksum", with_header(data, header | {"__metadata__": {
            k: v for k, v in header["__metadata__"].items() if k != "checksum"}}),
            ("checksum mismatch",)),
        Hostile("values edited, checksum of the original", with_header(
            craft(good, flat | {f"{W}::val": val + 1}), header_of(craft(good, flat | {
                f"{W}::val": val + 1})) | {"__metadata__": header["__metadata__"]}),
            ("checksum mismatch",)),
        Hostile("unknown kind", swap(f"{W}::idx", idx, kind="rank"), ("malformed metadata", "kind")),
        Hostile("a kind the base cannot serve", swap(f"{W}::idx", idx, kind="generate"),
                ("generate", "not served")),
        Hostile("labels not JSON", swap(f"{W}::idx", idx, labels="[neg"), ("malformed metadata",)),
        Hostile("labels repeated", swap(f"{W}::idx", idx, labels='["a", "a"]'), ("not unique",)),
        Hostile("one label for classify", swap(f"{W}::idx", idx, labels='["a"]'), ("2 labels",)),
        Hostile("no provenance", with_header(data, header | {"__metadata__": {
            k: v for k, v in header["__metadata__"].items() if k != "provenance"}}),
            ("malformed metadata", "provenance")),
        Hostile("density over 1", swap(f"{W}::idx", idx, provenance='{"method": "x", "density": 7}'),
                ("malformed metadata", "density")),
        Hostile("metadata value not a string", with_header(data, header | {"__metadata__": header[
            "__metadata__"] | {"format_version": 1}}), ("must be strings",)),
        # -- tensors: dtypes, values, indices, shapes, names --------------------------------------
        Hostile("idx as float32", swap(f"{W}::idx", idx.float()), ("idx dtype", W)),
        Hostile("idx as int64 on a small tensor", swap(f"{W}::idx", idx.long()), ("idx dtype", "int32")),
        Hostile("idx as int16", swap(f"{W}::idx", idx.short()), ("idx dtype",)),
        Hostile("val as int32", swap(f"{W}::val", val.int()), ("val dtype", W)),
        Hostile("val as bool", swap(f"{W}::val", val > 0), ("val dtype",)),
        Hostile("val float16 on a float32 base", swap(f"{W}::val", val.half()), ("val dtype", "wider")),
        Hostile("NaN value", edit(lambda v: v.__setitem__(0, float("nan"))), ("non-finite", "nan", W)),
        Hostile("+Inf value", edit(lambda v: v.__setitem__(-1, float("inf"))), ("non-finite", "inf")),
        Hostile("-Inf value", edit(lambda v: v.__setitem__(0, float("-inf"))), ("non-finite", "-inf")),
        Hostile("float64 value that overflows float32", swap(f"{W}::val", val.double().index_fill(
            0, torch.tensor([0]), 1e300)), ("overflows",)),
        Hostile("index out of range", index(lambda i: i.__setitem__(-1, numel)),
                ("out of range", str(numel), W)),
        Hostile("index far out of range", index(lambda i: i.__setitem__(-1, 2**31 - 1)),
                ("out of range",)),
        Hostile("negative index", index(lambda i: i.__setitem__(0, -1)), ("negative index", W)),
        Hostile("repeated index", index(lambda i: i.__setitem__(1, int(i[0]))), ("repeated index",)),
        Hostile("unsorted indices", index(lambda i: i.copy_(i.flip(0))), ("unsorted",)),
        Hostile("idx longer than val", swap(f"{W}::val", val[:-1]), ("idx has", "val has", W)),
        Hostile("2-D idx", craft(good, flat | {f"{W}::idx": idx.reshape(1, -1),
                                               f"{W}::val": val.reshape(1, -1)}), ("1-d",)),
        Hostile("idx without val", craft(good, without), ("no matching", W)),
        Hostile("unknown tensor", craft(good, flat | {"evil.weight::idx": idx, "evil.weight::val": val}),
                ("not a tensor of base", "evil.weight")),
        Hostile("name without a suffix", craft(good, flat | {"evil": val}), ("not a delta tensor name",)),
        Hostile("head of the wrong shape", swap("head::classifier.weight", torch.zeros(3, 32)),
                ("shape", "classifier.weight")),
        Hostile("head sized for other labels", swap("head::classifier.bias", torch.zeros(5)),
                ("shape", "classifier.bias")),
        Hostile("unknown head", swap("head::evil", torch.zeros(2)), ("no head tensor", "head::evil")),
        Hostile("missing head", craft(good, {k: v for k, v in flat.items()
                                             if k != "head::classifier.bias"}),
                ("needs head tensors", "classifier.bias")),
        Hostile("NaN in the head", swap("head::classifier.bias", torch.tensor([0.0, float("nan")])),
                ("non-finite", "head::classifier.bias")),
        Hostile("head on an embed task", swap("head::classifier.bias", torch.zeros(2), kind="embed",
                                              labels="[]"), ("no head tensor",)),
        # -- size -------------------------------------------------------------------------------
        Hostile("one byte over the limit", b"\0" * (LIMIT + 1), ("over the limit",), 413),
    ]


def redis_state(r: redis.Redis) -> dict[bytes, object]:
    """Every key and its value (hashes and sets read whole): what 'nothing stored' compares."""
    out: dict[bytes, object] = {}
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        out[key] = {b"hash": r.hgetall, b"set": r.smembers, b"string": r.get}[kind](key)
    return out


def test_hostile_uploads_are_refused_naming_the_problem_and_leave_no_trace(
        tiny_bert, redis_proc, tmp_path, live_server):
    marker = tmp_path / "unpickled"
    corpus = hostile_corpus(tiny_bert, marker)
    assert len({h.name for h in corpus}) == len(corpus) >= 60
    keep = dumps(random_delta(tiny_bert, 0.001, seed=3, kind="classify", labels=["x", "y"]))
    s = Settings(redis_url=redis_proc.url, data_dir=tmp_path / "data", api_keys=f"t:{KEY}",
                 max_delta_bytes=LIMIT)
    saved = snapshot(tiny_bert)
    r = redis.Redis.from_url(redis_proc.url)
    wrong: list[str] = []
    with live_server(create_app(s, base=tiny_bert)) as srv, \
            httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as c:
        assert c.put("/v1/tasks/keep", content=keep).status_code == 201
        before = c.post("/v1/tasks/keep/classify", json={"texts": ["a probe"]}).json()
        stored = redis_state(r)
        for i, h in enumerate(corpus):
            for target in ("keep", f"fresh{i}"):  # over an existing task, and as a new one
                resp = c.put(f"/v1/tasks/{target}", content=h.body)
                message = resp.json().get("error", {}).get("message", "").lower()
                if resp.status_code != h.status or not all(w.lower() in message for w in h.words):
                    wrong.append(f"{h.name} -> {target}: {resp.status_code} {message!r}")
            if i % 8 == 0:
                assert c.get("/readyz").status_code == 200
        assert not wrong, "\n".join(wrong)
        assert redis_state(r) == stored  # not a key added, changed or removed
        assert [t["name"] for t in c.get("/v1/tasks").json()["tasks"]] == ["keep"]
        assert c.get("/v1/tasks/keep").json()["version"] == 1
        assert c.post("/v1/tasks/keep/classify", json={"texts": ["a probe"]}).json() == before
        assert c.post("/v1/tasks/base/embed", json={"texts": ["x"]}).status_code == 200
        assert c.get("/readyz").status_code == 200
        rejected = [ln for ln in c.get("/metrics").text.splitlines()
                    if ln.startswith('taskdelta_uploads_total{outcome="rejected"}')]
        assert float(rejected[0].split()[-1]) == 2 * sum(h.status == 422 for h in corpus)
    assert not marker.exists(), "an upload was unpickled"
    assert_bit_identical(tiny_bert, saved)


class RSSPeak:
    """This process' peak resident memory while the block runs, sampled every few ms."""

    def __enter__(self) -> RSSPeak:
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.start


@pytest.mark.parametrize("declared", [False, True], ids=["chunked", "content-length"])
def test_multi_gb_streamed_body_is_refused_at_the_limit_without_buffering(
        tiny_bert, redis_proc, tmp_path, live_server, declared):
    """The client would send 8 GiB; the server answers 413 once the limit is passed and this
    process (server and client both) never holds more than a few limits' worth of memory."""
    limit, total, piece = 8 * 1024 * 1024, 8 * 1024**3, b"\xab" * (1024 * 1024)
    sent = [0]

    def body():
        while sent[0] < total:
            sent[0] += len(piece)
            yield piece  # the same object every time: the client allocates nothing

    s = Settings(redis_url=redis_proc.url, data_dir=tmp_path / "data", api_keys=f"t:{KEY}",
                 max_delta_bytes=limit)
    headers = AUTH | ({"Content-Length": str(total)} if declared else {})
    with live_server(create_app(s, base=tiny_bert)) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        with RSSPeak() as mem:
            resp = c.put("/v1/tasks/huge", content=body(), headers=headers)
        assert resp.status_code == 413, resp.text
        assert resp.json()["error"]["type"] == "payload_too_large"
        assert "limit" in resp.json()["error"]["message"]
        assert sent[0] < total / 8, f"the server read {sent[0]} bytes instead of stopping"
        if not declared:
            assert sent[0] > limit  # it did read up to the limit, then stopped
        assert mem.growth < 64 * 1024 * 1024 + 4 * limit, f"RSS grew by {mem.growth} bytes"
        assert c.get("/v1/tasks", headers=AUTH).json()["tasks"] == []
        assert c.get("/readyz").status_code == 200
