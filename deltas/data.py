"""Task data for training deltas: read TSV / JSONL files, carve seeded splits, tokenize and batch.

TSVs are read as plain tab-separated text with a header row and no quoting: some rows contain `"`
characters, and a quote-aware reader would merge rows. A validation split is carved from the
training file with a seeded permutation, so every run of every method sees the same split.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")
Text = str | tuple[str, str]  # one text, or a pair (premise, hypothesis)
IGNORE = -100  # label id the loss skips (prompt tokens, padding)


@dataclass(frozen=True)
class Example:
    text: Text
    label: int | float  # a class id (classify), or the target value (regress)


@dataclass(frozen=True)
class ClassifyData:
    labels: list[str]
    examples: list[Example]


@dataclass(frozen=True)
class Instruction:
    prompt: str  # rendered: the chat template applied, ready to continue with the response
    response: str


def read_tsv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a TSV with a header, split on tabs only (no quoting)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if not lines:
        raise ValueError(f"{path}: empty file")
    header = lines[0].split("\t")
    rows = []
    for n, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        cells = line.split("\t")
        if len(cells) != len(header):
            raise ValueError(f"{path}:{n}: {len(cells)} fields, the header has {len(header)}")
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not JSON: {exc}") from None
    return rows


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    return read_jsonl(path) if str(path).endswith((".jsonl", ".json")) else read_tsv(path)


def load_classify(path: str | Path, text_col: str, label_col: str, pair_col: str | None = None,
                  labels: Sequence[str] | None = None) -> ClassifyData:
    """Texts (or pairs) and label ids. Labels default to the file's values, numbers in numeric order."""
    rows = read_rows(path)
    cols = [text_col, label_col] + ([pair_col] if pair_col else [])
    missing = [c for c in cols if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"{path}: no column {missing[0]!r} (columns: {', '.join(rows[0])})")
    values = [str(r[label_col]) for r in rows]
    labels = list(labels) if labels is not None else _label_order(set(values))
    ids = {label: i for i, label in enumerate(labels)}
    unknown = sorted(set(values) - ids.keys())
    if unknown:
        raise ValueError(f"{path}: labels {unknown[:5]} are not among the task's labels {labels}")
    examples = [Example((str(r[text_col]), str(r[pair_col])) if pair_col else str(r[text_col]), ids[v])
                for r, v in zip(rows, values, strict=True)]
    return ClassifyData(labels=labels, examples=examples)


def load_regress(path: str | Path, text_col: str, label_col: str,
                 pair_col: str | None = None) -> list[Example]:
    """Texts (or pairs) and float targets (STS-B's 0-5 similarity), for a regress task."""
    rows = read_rows(path)
    cols = [text_col, label_col] + ([pair_col] if pair_col else [])
    missing = [c for c in cols if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"{path}: no column {missing[0]!r} (columns: {', '.join(rows[0])})")
    examples = []
    for n, r in enumerate(rows, start=2):
        try:
            value = float(r[label_col])
        except (TypeError, ValueError):
            raise ValueError(f"{path}:{n}: {label_col} is {r[label_col]!r}, not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{path}:{n}: {label_col} is {r[label_col]!r}, not a finite number")
        text = (str(r[text_col]), str(r[pair_col])) if pair_col else str(r[text_col])
        examples.append(Example(text, value))
    return examples


def _label_order(values: set[str]) -> list[str]:
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


def load_instructions(path: str | Path, tokenizer: Any) -> list[Instruction]:
    """instruction / input / output rows as (rendered prompt, response) pairs."""
    out = []
    for n, row in enumerate(read_rows(path), start=1):
        if "instruction" not in row or "output" not in row:
            raise ValueError(f"{path}:{n}: needs 'instruction' and 'output' fields")
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        out.append(Instruction(chat_prompt(tokenizer, user), row["output"]))
    return out


def chat_prompt(tokenizer: Any, user: str) -> str:
    """The prompt the server's chat endpoint renders for one user message (same fallback format)."""
    messages = [{"role": "user", "content": user}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"user: {user}\nassistant:"


def carve(items: Sequence[T], val_size: int, seed: int = 0) -> tuple[list[T], list[T]]:
    """(train, validation): a seeded permutation, the first `val_size` items held out."""
    if not 0 < val_size < len(items):
        raise ValueError(f"validation size {val_size} must be between 1 and {len(items) - 1}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order[val_size:]], [items[i] for i in order[:val_size]]


def subsample(items: Sequence[T], n: int | None, seed: int = 0) -> list[T]:
    """At most n items, a seeded random subset in the original order."""
    if n is None or n >= len(items):
        return list(items)
    keep = sorted(random.Random(seed + 1).sample(range(len(items)), n))
    return [items[i] for i in keep]


# ---- tokenized features and batches -------------------------------------------------------------

def classify_features(tokenizer: Any, examples: Sequence[Example], max_length: int) -> list[dict]:
    singles = [e.text for e in examples if isinstance(e.text, str)]
    if singles and len(singles) != len(examples):
        raise ValueError("a task's examples must be all single texts or all pairs")
    if singles:
        enc = tokenizer(singles, truncation=True, max_length=max_length)
    else:
        enc = tokenizer([e.text[0] for e in examples], [e.text[1] for e in examples],
                        truncation=True, max_length=max_length)
    keys = list(enc.keys())
    return [{**{k: enc[k][i] for k in keys}, "labels": e.label} for i, e in enumerate(examples)]


def causal_features(tokenizer: Any, items: Sequence[Instruction], max_length: int,
                    eos_id: int | None = None) -> list[dict]:
    """input_ids = prompt + response + EOS; labels mask the prompt, so the loss is the response's."""
    eos = eos_id if eos_id is not None else tokenizer.eos_token_id
    if eos is None:
        raise ValueError("no end-of-sequence token: pass eos_id")
    out = []
    for it in items:
        prompt = tokenizer(it.prompt)["input_ids"]  # special tokens as the server's generate adds them
        response = tokenizer(it.response, add_special_tokens=False)["input_ids"] + [eos]
        ids = (prompt + response)[:max_length]
        labels = ([IGNORE] * len(prompt) + response)[:max_length]
        if all(t == IGNORE for t in labels):
            continue  # the prompt alone fills max_length: nothing to learn from
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return out


def collate(features: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest in the batch; `labels` is a [batch] class id (int64) or target
    (float32, regress), or padded with IGNORE."""
    width = max(len(f["input_ids"]) for f in features)
    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        if key == "labels" and isinstance(features[0]["labels"], int | float):
            batch[key] = torch.tensor([f["labels"] for f in features])  # [batch]
            continue
        fill = {"input_ids": pad_id, "labels": IGNORE}.get(key, 0)
        batch[key] = torch.tensor([f[key] + [fill] * (width - len(f[key])) for f in features])
    return batch  # each [batch, width] except class labels


def batches(features: Sequence[dict], batch_size: int, seed: int | None = None,
            pad_id: int = 0, group: int = 16) -> Iterator[dict[str, torch.Tensor]]:
    """Batches in a seeded random order (None: in order); with a seed, items of similar length
    share a batch (sorted within windows of `group` batches), which cuts padding a lot."""
    order = list(range(len(features)))
    if seed is not None:
        rng = random.Random(seed)
        rng.shuffle(order)
        window = batch_size * group
        order = [i for s in range(0, len(order), window)
                 for i in sorted(order[s:s + window], key=lambda i: len(features[i]["input_ids"]))]
        chunks = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        rng.shuffle(chunks)
    else:
        chunks = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    for chunk in chunks:
        yield collate([features[i] for i in chunk], pad_id)


def n_batches(n_items: int, batch_size: int) -> int:
    return -(-n_items // batch_size)
