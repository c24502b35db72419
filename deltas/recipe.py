"""The steps of making a delta from a data file, shared by `taskdelta delta train`, `extract --refit`
and bench/quality.py: read and split the data, tokenize, choose a mask, train, summarise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .base import Base
from .data import (
    carve,
    causal_features,
    classify_features,
    load_classify,
    load_instructions,
    load_regress,
    read_rows,
    subsample,
)
from .format import HEAD_KINDS, TaskDelta
from .masks import MASK_KINDS, Mask, magnitude_mask, mask_from_scores, random_mask
from .train import Progress, TrainConfig, Trained, gradient_scores, task_tensors

DEFAULT_VAL_FRACTION, MAX_DEFAULT_VAL = 0.1, 1000
SPARSE_LR_AT_1PCT, MAX_SPARSE_LR = 1e-3, 1e-2
# dense-extract's sparse phase: the masked entries of matrices at 1 % (scaled like sparse_lr), and
# of 1-D tensors (biases, norms: at the matrices' rate they diverged on QNLI); docs/quality.md
DENSE_EXTRACT_LR, DENSE_EXTRACT_LR_1D = 5e-3, 1e-3


def sparse_lr(density: float, at_1pct: float = SPARSE_LR_AT_1PCT) -> float:
    """The default learning rate of the trained entries: inversely proportional to the density
    (`at_1pct` at 1 %, capped at 1e-2). Fewer entries must each move further; on SST-2 a 0.1 %
    scratch mask at 2e-3 did not learn at all (55 %) and at 5e-3 / 1e-2 reached 80-81 %; the
    dense-extract recipe (`at_1pct` 5e-3) on TREC at 0.5 % / 0.1 %: 90.8 / 86.4 at 1e-2 against
    89.0 / 84.8 at 5e-3."""
    return min(MAX_SPARSE_LR, at_1pct * 0.01 / density)


@dataclass(frozen=True)
class TaskData:
    """Tokenized training and validation features of one task."""

    kind: str
    labels: list[str]
    train: list[dict]
    val: list[dict]
    val_texts: list[Any]  # the raw validation inputs (texts or pairs; prompts for generate)
    val_labels: list[int] | list[float]  # class ids (classify), targets (regress)


def default_kind(path: str | Path) -> str:
    return "generate" if str(path).endswith((".jsonl", ".json")) else "classify"


def load_task_data(base: Base, path: str | Path, kind: str, *, text_col: str = "sentence",
                   label_col: str = "label", pair_col: str | None = None,
                   labels: Sequence[str] | None = None, val_size: int | None = None,
                   train_size: int | None = None, max_length: int = 128, seed: int = 0) -> TaskData:
    """Read, carve a seeded validation split (default 10 %, at most 1000), subsample, tokenize."""
    if kind == "classify":
        data = load_classify(path, text_col, label_col, pair_col, labels=_match_labels(path, label_col,
                                                                                        labels))
        items: list[Any] = data.examples
        label_names = list(labels) if labels is not None else data.labels
    elif kind == "regress":  # one output, named after the file's column unless `labels` names it
        items = load_regress(path, text_col, label_col, pair_col)
        label_names = list(labels or [label_col])
    elif kind == "generate":
        items, label_names = load_instructions(path, base.tokenizer), []
    else:
        raise ValueError(f"training a {kind!r} task is not supported")
    if val_size is None:
        val_size = min(MAX_DEFAULT_VAL, max(1, round(DEFAULT_VAL_FRACTION * len(items))))
    train, val = carve(items, val_size, seed) if val_size > 0 else (list(items), [])
    train = subsample(train, train_size, seed)
    if kind in HEAD_KINDS:
        return TaskData(kind, label_names, classify_features(base.tokenizer, train, max_length),
                        classify_features(base.tokenizer, val, max_length) if val else [],
                        [e.text for e in val], [e.label for e in val])
    eos = eos_id(base)
    return TaskData(kind, [], causal_features(base.tokenizer, train, max_length, eos),
                    causal_features(base.tokenizer, val, max_length, eos), [it.prompt for it in val], [])


def eos_id(base: Base) -> int:
    """The token a response ends with: the tokenizer's EOS, else the model config's."""
    if base.tokenizer.eos_token_id is not None:
        return int(base.tokenizer.eos_token_id)
    found = getattr(base.config, "eos_token_id", None)
    found = found[0] if isinstance(found, list) and found else found
    if not isinstance(found, int):
        raise ValueError(f"base {base.name!r} names no end-of-sequence token")
    return found


def _match_labels(path: str | Path, label_col: str, labels: Sequence[str] | None) -> list[str] | None:
    """A delta's labels for a data file: by name, or by position when the file has label ids
    0..n-1 and the delta generic names (a fine-tune saved without label names, LABEL_0...)."""
    if labels is None:
        return None
    values = {str(r[label_col]) for r in read_rows(path) if label_col in r}
    if values <= set(labels):
        return list(labels)
    if values <= {str(i) for i in range(len(labels))}:
        return [str(i) for i in range(len(labels))]
    raise ValueError(f"{path}: labels {sorted(values)[:5]} do not match the delta's labels {list(labels)}")


def choose_mask(base: Base, data: TaskData, kind: str, density: float, cfg: TrainConfig,
                mask_batches: int = 16, exclude: Sequence[str] = (),
                progress: Progress | None = None,
                heads: dict[str, torch.Tensor] | None = None) -> Mask:
    """The mask; grad / fisher scores are taken with `heads` (e.g. a probed head) or a fresh one."""
    if kind in ("grad", "fisher"):
        scores = gradient_scores(base, data.kind, data.labels, data.train, cfg, mask_batches, progress,
                                 heads=heads)
        return mask_from_scores(kind, scores, density, exclude)
    if exclude:
        raise ValueError("--exclude applies to the grad and fisher masks only")
    if kind == "magnitude":
        return magnitude_mask(task_tensors(base, data.kind), density)
    if kind == "random":
        return random_mask(task_tensors(base, data.kind), density, seed=cfg.seed)
    raise ValueError(f"--mask must be one of {', '.join(MASK_KINDS)}, not {kind!r}")


def provenance(cfg: TrainConfig, trained: Trained, **extra: Any) -> dict[str, Any]:
    """What a delta's metadata records about how it was trained."""
    lr_1d = {} if cfg.lr_1d is None else {"lr_1d": cfg.lr_1d}
    return {**extra, "lr": cfg.lr, **lr_1d, "head_lr": cfg.head_lr, "steps": trained.steps,
            "batch_size": cfg.batch_size, "seed": cfg.seed,
            "train_loss": round(trained.train_loss, 6)}


def describe(delta: TaskDelta, size: int, trained: Trained, metrics: dict[str, float], n_val: int) -> str:
    """The printed summary: density, bytes, train loss, validation score."""
    lines = [f"{delta.nnz} entries in {len(delta.tensors)} tensors, density "
             f"{delta.meta.provenance.density:.4%}, {len(delta.heads)} head tensors, {size} bytes",
             f"train loss {trained.train_loss:.4f} over {trained.steps} steps"]
    if not metrics:
        lines.append("no validation split")
    elif "pearson" in metrics:
        lines.append(f"validation Pearson {metrics['pearson']:.4f}, Spearman {metrics['spearman']:.4f} "
                     f"(mean squared error {metrics['loss']:.4f}) on {n_val} examples")
    elif "accuracy" in metrics:
        lines.append(f"validation accuracy {metrics['accuracy']:.4f} (loss {metrics['loss']:.4f}) "
                     f"on {n_val} examples")
    else:
        lines.append(f"validation loss {metrics['loss']:.4f} per response token (perplexity "
                     f"{metrics['perplexity']:.2f}) on {n_val} examples")
    return "\n".join(lines)
