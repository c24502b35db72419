"""Quality of a 1 % sparse delta on a causal LM: `taskdelta delta train` vs PEFT LoRA vs full fine-tuning.

smollm2-135m on the shared instructions file (797 examples): a seeded validation split is carved
from it (as `load_task_data` carves it), and every method trains on the same examples with the
same budget (steps, batch size, max_length, warm-up, clipping, seed):
- `base`: the untrained base, the floor;
- `full`: dense fine-tuning (`train_full`), served as a delta of every changed entry;
- `lora`: PEFT LoRA on every attention and MLP linear, its rank chosen so that its trainable
  entries come closest to the sparse delta's entries; trained by the same loop (`fit`), imported
  as a delta by `deltas/peft_io.py` (the merged update B·A·alpha/r of each linear) and served so;
- `sparse`: the `taskdelta delta train` command itself at 1 % (whatever its default recipe is
  now), run as a subprocess with the budget's flags.

Every trained model is scored through the serving path: the delta's bytes are parsed and
validated, `prepare`d, swapped into the shared base by `Swapper`, and the swapped model gives
(1) the held-out loss: mean NLL per response token of the validation split (perplexity beside it),
(2) greedy generations by the server's `generate` (the offline reference of a served request):
exact match after whitespace strip, a normalized match (case, inner whitespace and surrounding
punctuation / quotes ignored), the exact match on the references short enough to be generated
whole, and the prefix match (mean share of the reference's first max_new_tokens tokens generated
before the first difference). Writes docs/quality-lm.json and docs/quality-lm.md (the table; a
`## Findings` section already in the file is kept).

    python bench/quality_lm.py            # the documented table (~50 min, 1 thread)
    python bench/quality_lm.py --steps 2 --val-size 4 --max-new-tokens 4 --out /tmp/qlm  # a smoke run
    python bench/quality_lm.py --report-only              # re-render docs/quality-lm.md from its json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from taskdelta.client.types import SamplingParams  # noqa: E402
from taskdelta.deltas import Base, Swapper, TaskDelta, dumps, extract, load_base, loads, prepare, validate  # noqa: E402
from taskdelta.deltas.data import batches  # noqa: E402
from taskdelta.deltas.peft_io import import_peft  # noqa: E402
from taskdelta.deltas.recipe import load_task_data  # noqa: E402
from taskdelta.deltas.train import TrainConfig, causal_nll, fit, train_full  # noqa: E402
from taskdelta.server.inference import generate  # noqa: E402
from taskdelta.server.jobs import GenerateJob  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "instructions" / "train.jsonl"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RECIPE_FILES = ("deltas/train.py", "deltas/recipe.py", "deltas/masks.py", "deltas/cli_train.py")


@dataclass
class Row:
    method: str
    entries: int  # trainable entries (sparse: the delta's nonzeros; full: every base entry)
    served_nnz: int  # entries of the delta the server swaps in
    stored_bytes: int  # what one task costs to store (full: an fp32 checkpoint; lora: the adapter)
    served_bytes: int  # the delta file that was served
    train_s: float
    train_loss: float | None
    loss: float  # mean NLL per response token, validation split
    perplexity: float
    exact: float  # % of the validation split
    normalized: float
    exact_short: float  # % of the references that fit in max_new_tokens
    prefix: float  # mean % of the reference's first max_new_tokens tokens generated
    eval_s: float


# ---- LoRA at a matched size ----------------------------------------------------------------------

def lora_shapes(model: torch.nn.Module, targets: Sequence[str] = LORA_TARGETS) -> list[tuple[int, int]]:
    """(out, in) of every linear LoRA would adapt: the module names ending in a target."""
    return [(m.out_features, m.in_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets]


def lora_entries(shapes: Sequence[tuple[int, int]], rank: int) -> int:
    """Trainable entries of LoRA at `rank`: A is [rank, in], B is [out, rank] per linear."""
    return rank * sum(o + i for o, i in shapes)


def matched_rank(shapes: Sequence[tuple[int, int]], entries: int) -> int:
    """The rank whose LoRA entries come closest to `entries` (at least 1)."""
    return max(1, round(entries / lora_entries(shapes, 1)))


class LoraTaskModel:
    """A PEFT LoRA model on a private copy of the base, shaped for `train.fit` (same loop, same
    schedule, same batches as the other methods)."""

    def __init__(self, base: Base, rank: int, alpha: float, targets: Sequence[str] = LORA_TARGETS) -> None:
        from peft import LoraConfig, get_peft_model

        self.base, self.kind, self.labels = base, "generate", []
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets),
                            task_type="CAUSAL_LM")
        self.net = get_peft_model(copy.deepcopy(base.model), config)
        self.trainable = [p for p in self.net.parameters() if p.requires_grad]

    def __call__(self, **inputs: torch.Tensor):
        return self.net(**inputs)

    def param_groups(self, cfg: TrainConfig) -> list[dict]:
        return [{"params": self.trainable, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]

    def train(self, mode: bool) -> None:
        self.net.train(mode)

    def to_delta(self, folder: Path) -> tuple[TaskDelta, int]:
        """(the adapter imported as a delta of every nonzero of its merged update, adapter bytes)."""
        self.net.save_pretrained(folder)
        delta = import_peft(self.base, folder, density=None, kind="generate").delta
        return delta, (folder / "adapter_model.safetensors").stat().st_size


# ---- scoring through the serving path ------------------------------------------------------------

@contextlib.contextmanager
def served(base: Base, delta: TaskDelta | None) -> Iterator[torch.nn.Module]:
    """The model a served request of this task runs: the (parsed) delta validated, prepared and
    swapped into the shared base (None: the base itself, the `base` task)."""
    if delta is None:
        yield base.model
        return
    validate(delta, base)
    prepared = prepare(delta, base, name="bench")
    with Swapper(base).swapped(prepared) as model:
        yield model


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, features: Sequence[dict], pad_id: int, batch_size: int = 8) -> float:
    """Mean NLL per response token (prompt tokens and padding are not scored)."""
    total, count = 0.0, 0
    for batch in batches(features, batch_size, pad_id=pad_id):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        s, c = causal_nll(logits, batch["labels"])
        total, count = total + s, count + c
    return total / max(1, count)


def greedy(model: torch.nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations by the server's generate(), one request each."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    return [generate(model, tokenizer, GenerateJob(prompt=p, params=params)).text for p in prompts]


def normalize(text: str) -> str:
    """Lower case, inner whitespace collapsed, surrounding punctuation and quotes dropped."""
    return re.sub(r"\s+", " ", text.lower()).strip().strip(".,;:!?\"'`").strip()


def match_scores(generated: Sequence[str], references: Sequence[str], tokenizer,
                 max_new_tokens: int) -> dict[str, float]:
    """Exact, normalized and short-reference exact match, and the token prefix match, in %."""
    n = len(references)
    exact = sum(g.strip() == r.strip() for g, r in zip(generated, references, strict=True))
    norm = sum(normalize(g) == normalize(r) for g, r in zip(generated, references, strict=True))
    short, short_hits, prefix = 0, 0, 0.0
    for g, r in zip(generated, references, strict=True):
        ref = tokenizer(r.strip(), add_special_tokens=False)["input_ids"]
        gen = tokenizer(g.strip(), add_special_tokens=False)["input_ids"]
        if len(ref) < max_new_tokens:  # room for the end-of-sequence token too
            short += 1
            short_hits += g.strip() == r.strip()
        want = ref[:max_new_tokens]
        same = next((i for i, (a, b) in enumerate(zip(gen, want, strict=False)) if a != b),
                    min(len(gen), len(want)))
        prefix += same / max(1, len(want))
    return {"exact": 100 * exact / n, "normalized": 100 * norm / n,
            "exact_short": 100 * short_hits / max(1, short), "short": short, "prefix": 100 * prefix / n}


def score(base: Base, data: bytes | None, features: Sequence[dict], prompts: Sequence[str],
          references: Sequence[str], max_new_tokens: int) -> dict[str, float]:
    """Held-out loss and generation matches of one task, through the serving path: its bytes
    as uploaded, parsed here."""
    delta = loads(data) if data is not None else None
    with served(base, delta) as model:
        loss = heldout_loss(model, features, _pad_id(base))
        texts = greedy(model, base.tokenizer, prompts, max_new_tokens)
    return {"loss": loss, "perplexity": float(torch.tensor(loss).exp()), "generated": texts,
            "nnz": delta.nnz if delta is not None else 0,
            **match_scores(texts, references, base.tokenizer, max_new_tokens)}


def _pad_id(base: Base) -> int:
    tok = base.tokenizer
    return int(tok.pad_token_id if tok.pad_token_id is not None else 0)


# ---- the methods -------------------------------------------------------------------------------

def run_full(base: Base, train: Sequence[dict], cfg: TrainConfig) -> tuple[bytes, int, int, float]:
    """(served delta bytes, stored bytes, trainable entries, train loss) of full fine-tuning."""
    trained = train_full(base, "generate", [], train, cfg)
    dense = extract(base, trained.model.net, 1.0, kind="generate")  # every changed entry
    checkpoint = 4 * base.numel  # what a task costs as its own fp32 copy (tied tensors once)
    return dumps(dense), checkpoint, base.numel, trained.train_loss


def run_lora(base: Base, train: Sequence[dict], cfg: TrainConfig, rank: int, alpha: float,
             check: Sequence[dict]) -> tuple[bytes, int, int, float, float]:
    """(served delta bytes, adapter bytes, trainable entries, train loss, the unmerged PEFT
    model's held-out loss on `check`: the served one must equal it)."""
    model = LoraTaskModel(base, rank, alpha)
    trained = fit(model, train, cfg)
    own = heldout_loss(model.net, check, _pad_id(base))
    with tempfile.TemporaryDirectory() as tmp:
        delta, stored = model.to_delta(Path(tmp))
    entries = sum(p.numel() for p in model.trainable)
    return dumps(delta), stored, entries, trained.train_loss, own


def run_sparse(args: argparse.Namespace, val_size: int) -> tuple[bytes, list[str], float]:
    """(delta file bytes, the command, train loss) of `taskdelta delta train` at --density."""
    exe = shutil.which("taskdelta") or str(Path(sys.executable).with_name("taskdelta"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sparse.delta"
        argv = [exe, "delta", "train", "--base", args.base, "--data", str(args.data), "--output", str(out),
                "--density", str(args.density), "--max-steps", str(args.steps),
                "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                "--val-size", str(val_size), "--seed", str(args.seed)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"taskdelta delta train failed ({done.returncode}):\n"
                             f"{done.stdout}\n{done.stderr}")
        log(done.stdout.strip())
        data = out.read_bytes()
    shown = ["taskdelta", *argv[1:]]
    shown[shown.index("--output") + 1] = "sparse.delta"
    return data, shown, float(getattr(loads(data).meta.provenance, "train_loss", float("nan")))


# ---- the report ---------------------------------------------------------------------------------

def recipe_state() -> dict[str, str]:
    """The commit, and the recipe files' last commit and whether they had uncommitted edits."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    state = {"head": git("log", "-1", "--format=%h %ci")}
    for f in RECIPE_FILES:
        state[f] = git("log", "-1", "--format=%h", "--", f) + (" + uncommitted edits" if git(
            "status", "--porcelain", "--", f) else "")
    return state


def table(rows: Sequence[Row]) -> str:
    head = ("| method | trainable entries | stored per task | served delta | train s | train loss | "
            "held-out loss | perplexity | exact % | normalized % | exact (short refs) % | prefix % |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    lines = [head]
    for r in rows:
        tl = f"{r.train_loss:.3f}" if r.train_loss is not None else "-"
        lines.append(f"| {r.method} | {r.entries:,} | {_mb(r.stored_bytes)} | {_mb(r.served_bytes)} | "
                     f"{r.train_s:.0f} | {tl} | {r.loss:.4f} | {r.perplexity:.2f} | {r.exact:.1f} | "
                     f"{r.normalized:.1f} | {r.exact_short:.1f} | {r.prefix:.1f} |")
    return "\n".join(lines)


def _mb(n: int) -> str:
    return "0" if n == 0 else f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def write_report(out: Path, rows: Sequence[Row], info: dict) -> None:
    """quality-lm.json (everything, with the generations) and quality-lm.md (a kept Findings section)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality-lm.json").write_text(json.dumps({**info, "rows": [asdict(r) for r in rows]}, indent=1))
    md = out / "quality-lm.md"
    kept = ""
    if md.exists() and "\n## Findings" in md.read_text():
        kept = md.read_text()[md.read_text().index("\n## Findings"):]
    b = info["budget"]
    text = f"""# Causal-LM quality: sparse `train` at 1 % vs LoRA vs full fine-tuning (smollm2-135m)

Measured {info["date"]} on {info["machine"]}, {info["threads"]} torch thread(s), {info["minutes"]:.0f} min
in all. Command: `{info["command"]}` (bench/quality_lm.py; sparse: `{" ".join(info["sparse_command"])}`).

Data: the shared instructions file ({info["n_items"]} examples), a seeded validation split of
{info["n_val"]} carved by `load_task_data` (seed {b["seed"]}), {info["n_train"]} of the rest for training
(`causal_features` drops an example whose prompt alone fills max_length).
Budget, the same for every method: {b["steps"]} optimizer steps of {b["batch_size"]} examples
({b["steps"] * b["batch_size"] / info["n_train"]:.2f} epochs), max_length {b["max_length"]} tokens
(prompt + response, cut there for training and for the held-out loss), AdamW, {b["warmup"]:.0%}
linear warm-up then linear decay, clip 1.0, seed {b["seed"]}. Learning rates: full {b["full_lr"]},
LoRA {b["lora_lr"]} (rank {b["lora_rank"]}, alpha {b["lora_alpha"]}, on {", ".join(LORA_TARGETS)}),
sparse: the `taskdelta delta train` default at density {b["density"]}.

LoRA's size: rank {b["lora_rank"]} gives {info["lora_entries"]:,} trainable entries (rank 1:
{info["lora_per_rank"]:,}); the sparse delta has {info["sparse_nnz"]:,} entries
({info["sparse_nnz"] / info["base_numel"]:.2%} of the base's {info["base_numel"]:,}, over every
tensor `train` may touch: embeddings / LM head, attention, MLP, norms).

Scores, all through the serving path (delta bytes -> loads -> validate -> prepare -> Swapper swap
into the shared base -> forward / the server's `generate`): held-out loss = mean NLL per response
token of the validation split; greedy generations of at most {info["max_new_tokens"]} new tokens:
exact = generated text == reference after stripping whitespace; normalized = also ignoring case,
inner whitespace runs and surrounding punctuation / quotes; exact (short refs) = exact match on the
{info["n_short"]} references shorter than {info["max_new_tokens"]} tokens (only those can be
generated whole); prefix = mean share of the reference's first {info["max_new_tokens"]} tokens
generated before the first difference. LoRA is served as `deltas/peft_io.py` imports it (every
entry of B·A·alpha/r of each adapted linear); its unmerged PEFT model's held-out loss is
{info["lora_own_loss"]}. Stored per task: the sparse delta file (compact encoding), the LoRA
adapter file (fp32), an fp32 copy of the model for full fine-tuning; served delta = the file swapped in.

Recipe state when run: {json.dumps(info["recipe_state"])}

{table(rows)}
"""
    md.write_text(text + (kept or "\n## Findings\n\n(not written yet)\n"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- main ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--val-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--full-lr", type=float, default=2e-5)
    p.add_argument("--lora-lr", type=float, default=5e-4)
    p.add_argument("--lora-rank", type=int, default=None, help="default: matched to the sparse delta")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--methods", default="base,sparse,lora,full")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--report-only", action="store_true", help="render OUT/quality-lm.md from its json")
    args = p.parse_args(argv)
    if args.report_only:
        report_only(args.out)
        return
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    t0 = time.perf_counter()
    base = load_base(args.base, device="cpu")
    data = load_task_data(base, args.data, "generate", val_size=args.val_size, max_length=args.max_length,
                          seed=args.seed)
    n_items, refs = validation_references(base, args)
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                      seed=args.seed)
    log(f"{len(data.train)} train / {len(data.val)} validation; {args.steps} steps of {args.batch_size}")
    shapes = lora_shapes(base.model)
    rows: list[Row] = []
    command = " ".join(["python bench/quality_lm.py", *(argv if argv is not None else sys.argv[1:])])
    info: dict = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                  "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                  "threads": args.threads, "command": command,
                  "recipe_state": recipe_state(), "n_items": n_items,
                  "n_train": len(data.train), "n_val": len(data.val), "base_numel": base.numel,
                  "max_new_tokens": args.max_new_tokens, "lora_per_rank": lora_entries(shapes, 1),
                  "sparse_nnz": 0, "lora_entries": 0, "lora_own_loss": "not measured",
                  "sparse_command": [], "minutes": 0.0, "n_short": 0, "generations": {}}

    def record(method: str, blob: bytes | None, stored: int, entries: int, train_s: float,
               train_loss: float | None) -> None:
        t = time.perf_counter()
        s = score(base, blob, data.val, data.val_texts, refs, args.max_new_tokens)
        rows.append(Row(method, entries, s["nnz"], stored, len(blob) if blob else 0, round(train_s, 1),
                        train_loss, s["loss"], s["perplexity"], s["exact"], s["normalized"],
                        s["exact_short"], s["prefix"], round(time.perf_counter() - t, 1)))
        info["n_short"], info["generations"][method] = s["short"], s["generated"]
        info["minutes"] = (time.perf_counter() - t0) / 60
        write_report(args.out, rows, {**info, "budget": budget})
        log(f"{method}: loss {s['loss']:.4f} ppl {s['perplexity']:.2f} exact {s['exact']:.1f} "
            f"norm {s['normalized']:.1f} short {s['exact_short']:.1f}/{s['short']} prefix {s['prefix']:.1f} "
            f"(train {train_s:.0f} s, score {time.perf_counter() - t:.0f} s)")

    budget = {"steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
              "warmup": cfg.warmup, "seed": args.seed, "full_lr": args.full_lr, "lora_lr": args.lora_lr,
              "lora_rank": args.lora_rank, "lora_alpha": None, "density": args.density}
    if "base" in methods:
        record("base (untrained)", None, 0, 0, 0.0, None)
    if "sparse" in methods:
        t = time.perf_counter()
        blob, info["sparse_command"], tl = run_sparse(args, args.val_size)
        info["sparse_nnz"] = loads(blob).nnz
        record(f"sparse train {args.density:.0%}", blob, len(blob), info["sparse_nnz"],
               time.perf_counter() - t, tl)
    if "lora" in methods:
        target = info["sparse_nnz"] or round(args.density * base.numel)
        rank = args.lora_rank or matched_rank(shapes, target)
        budget.update(lora_rank=rank, lora_alpha=2 * rank)
        info["lora_entries"] = lora_entries(shapes, rank)
        t = time.perf_counter()
        blob, stored, entries, tl, own = run_lora(base, data.train, replace(cfg, lr=args.lora_lr), rank,
                                                  2 * rank, data.val)
        info["lora_own_loss"] = f"{own:.4f}"
        record(f"LoRA r{rank}", blob, stored, entries, time.perf_counter() - t, tl)
    if "full" in methods:
        t = time.perf_counter()
        blob, stored, entries, tl = run_full(base, data.train, replace(cfg, lr=args.full_lr))
        record("full", blob, stored, entries, time.perf_counter() - t, tl)
    print(table(rows))
    log(f"wrote {args.out}/quality-lm.md and quality-lm.json in {(time.perf_counter() - t0) / 60:.1f} min")


def validation_references(base: Base, args: argparse.Namespace) -> tuple[int, list[str]]:
    """(examples in the file, the responses of the carved validation split in its order, as
    `load_task_data` carves it)."""
    from taskdelta.deltas.data import carve, load_instructions

    items = load_instructions(args.data, base.tokenizer)
    return len(items), [it.response for it in carve(items, args.val_size, args.seed)[1]]


def report_only(out: Path) -> None:
    """Render quality-lm.md again from quality-lm.json (nothing trained)."""
    saved = json.loads((out / "quality-lm.json").read_text())
    rows = [Row(**r) for r in saved.pop("rows")]
    write_report(out, rows, saved)


if __name__ == "__main__":
    main()
