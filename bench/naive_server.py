"""The route a user takes without taskdelta: a merged full copy of the model per task, saved as its
own model folder, loaded with `from_pretrained` when a request needs it, an LRU of --lru copies
resident.

It answers the same wire contract (`POST /v1/tasks/{task}/classify`) with the same inference code.
Two ways to run requests:
- `--mode batched` (default): taskdelta's own scheduler (one queue per task, batches of one task,
  the next tasks' models prefetched): only the way a task's weights reach the model differs. This
  is more than a user's server usually does, so it flatters the baseline.
- `--mode fifo`: one request at a time in arrival order, the plain server a user writes.
The tokenizer is loaded once and shared (a user's folders would each carry one: flatters it too).
With `--evict`, a folder's files are dropped from the OS page cache once loaded, so every load reads
the storage device: the case of copies that do not all fit in memory.

    python bench/naive_server.py --folders DIR --tokenizer MODEL_FOLDER --port 8001 --lru 4
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from taskdelta.client.types import ClassifyRequest, ClassifyResponse, ClassifyResult  # noqa: E402
from taskdelta.deltas import Swapper, loads, prepare  # noqa: E402
from taskdelta.server.inference import classify  # noqa: E402
from taskdelta.server.jobs import ClassifyJob  # noqa: E402
from taskdelta.server.settings import Settings  # noqa: E402


class ModelLRU:
    """Task -> its merged model, at most `size` resident; a miss loads the folder from disk."""

    def __init__(self, folders: Path, size: int, evict: bool = False) -> None:
        self.folders, self.size, self.evict = folders, size, evict
        self.models: OrderedDict[str, torch.nn.Module] = OrderedDict()
        self.loading: dict[str, asyncio.Future] = {}
        self.hits = self.loads = 0
        self.load_seconds = 0.0

    async def get(self, task: str) -> torch.nn.Module:
        if task in self.models:
            self.models.move_to_end(task)
            self.hits += 1
            return self.models[task]
        pending = self.loading.get(task)
        if pending is None:
            pending = asyncio.ensure_future(asyncio.to_thread(self._load, task))
            self.loading[task] = pending
            pending.add_done_callback(lambda _f: self.loading.pop(task, None))
        model = await asyncio.shield(pending)
        self.models[task] = model
        self.models.move_to_end(task)
        while len(self.models) > self.size:
            self.models.popitem(last=False)
        return model

    def _load(self, task: str) -> torch.nn.Module:
        started = time.perf_counter()
        model = AutoModelForSequenceClassification.from_pretrained(self.folders / task)
        model.eval().requires_grad_(False)
        if self.evict:
            for f in (self.folders / task).iterdir():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        self.loads += 1
        self.load_seconds += time.perf_counter() - started
        return model

    def state_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for m in self.models.values()
                   for p in m.parameters())


class TaskBatcher:
    """The naive route's batching: requests queue per task; one worker runs the task whose oldest
    request waited longest, up to `max_batch` of its requests, on that task's merged model."""

    def __init__(self, lru: ModelLRU, execute, max_batch: int = 16) -> None:
        self.lru, self.execute, self.max_batch = lru, execute, max_batch
        self.queues: OrderedDict[str, list[tuple[Any, asyncio.Future]]] = OrderedDict()
        self.wake = asyncio.Event()
        self.batches = self.swaps = 0
        self._last: str | None = None

    async def submit(self, task: str, job: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.queues.setdefault(task, []).append((job, future))
        self.wake.set()
        return await future

    async def run(self) -> None:
        while True:
            while not self.queues:
                self.wake.clear()
                await self.wake.wait()
            task, waiting = next(iter(self.queues.items()))
            batch, rest = waiting[: self.max_batch], waiting[self.max_batch:]
            if rest:
                self.queues[task] = rest
                self.queues.move_to_end(task)
            else:
                del self.queues[task]
            self.batches += 1
            self.swaps += task != self._last
            self._last = task
            try:
                model = await self.lru.get(task)
                rows = await asyncio.to_thread(self.execute, task, model, [j for j, _ in batch])
                for (_, future), row in zip(batch, rows, strict=True):
                    future.set_result(row)
            except Exception as exc:
                for _, future in batch:
                    future.set_exception(exc)


def create_app(folders: Path, tokenizer_dir: Path, lru_size: int, mode: str = "batched",
               evict: bool = False) -> FastAPI:
    settings = Settings()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    lru = ModelLRU(folders, lru_size, evict)

    def execute(task: str, model: Any, jobs: list[Any]) -> list[Any]:
        labels = tuple(model.config.id2label[i] for i in range(model.config.num_labels))
        return classify(model, tokenizer, labels, jobs)

    one_at_a_time = asyncio.Lock()

    async def run_fifo(task: str, job: ClassifyJob) -> list:
        async with one_at_a_time:  # asyncio's lock is FIFO: arrival order
            model = await lru.get(task)
            return (await asyncio.to_thread(execute, task, model, [job]))[0]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler = TaskBatcher(lru, execute, settings.max_batch)
        worker = asyncio.create_task(scheduler.run()) if mode == "batched" else None
        app.state.scheduler = scheduler
        yield
        if worker is not None:
            worker.cancel()

    app = FastAPI(lifespan=lifespan)

    @app.post("/v1/tasks/{task}/classify", response_model=ClassifyResponse)
    async def classify_route(task: str, body: ClassifyRequest) -> ClassifyResponse:
        if not (folders / task).is_dir():
            from fastapi import HTTPException  # noqa: PLC0415

            raise HTTPException(404, f"task {task!r} not found")
        job = ClassifyJob(texts=tuple(t if isinstance(t, str) else tuple(t) for t in body.texts))
        if mode == "fifo":
            rows = await run_fifo(task, job)
        else:
            rows = await app.state.scheduler.submit(task, job)
        return ClassifyResponse(task=task, results=[ClassifyResult(**r) for r in rows])

    @app.get("/readyz")
    async def readyz() -> dict:
        return {"ready": True}

    @app.get("/stats")
    async def stats() -> dict:
        return {"hits": lru.hits, "loads": lru.loads, "load_seconds": lru.load_seconds,
                "resident": len(lru.models), "state_bytes": lru.state_bytes(),
                "swaps": app.state.scheduler.swaps, "batches": app.state.scheduler.batches,
                "mode": mode, "evict": evict}

    return app


def build_merged(base, blobs: dict[str, bytes], names: list[str], folders: Path) -> None:
    """The naive route's storage: each task's merged model saved as a full model folder."""
    started = time.perf_counter()
    swapper = Swapper(base)
    for name in names:
        if (folders / name / "model.safetensors").exists():
            continue
        prepared = prepare(loads(blobs[name]), base, name=name)
        with swapper.swapped(prepared) as model:  # the backbone holds base + delta meanwhile
            # own copies: the live weights are views into one buffer, which safetensors refuses
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        (folders / name).mkdir(parents=True, exist_ok=True)
        save_file(state, folders / name / "model.safetensors", metadata={"format": "pt"})
        model.config.save_pretrained(folders / name)
    size = sum(f.stat().st_size for f in folders.rglob("*") if f.is_file())
    print(f"  saved {len(names)} merged model folders ({size / 1e9:.1f} GB) in "
          f"{time.perf_counter() - started:.0f} s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--folders", type=Path, required=True, help="one merged model folder per task")
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--lru", type=int, default=4, help="resident model copies")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--mode", choices=("batched", "fifo"), default="batched")
    p.add_argument("--evict", action="store_true", help="drop loaded files from the page cache")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    uvicorn.run(create_app(args.folders, args.tokenizer, args.lru, args.mode, args.evict),
                host="127.0.0.1",
                port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
