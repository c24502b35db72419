"""Model execution for each task kind: plain torch over a transformers model, no serving logic.

The same functions run a swapped-in task in the server and an offline merged model in the tests,
so "the served output equals the merged model's" compares like with like.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from taskdelta.deltas.mixed import MixedDelta, Mixer, pooled_logits

from .jobs import ClassifyJob, EmbedJob, GenerateJob, Job, ScoreJob
from .kv import cache_argument
from .sequences import Generation, Sequence, eos_ids, prompt_ids

MAX_TOKENS = 512  # classify / embed inputs


@dataclass(frozen=True)
class MixedPart:
    """One task's share of a mixed batch: its corrections, its head (classify, regress) and its
    jobs."""

    mixed: MixedDelta | None  # None: the base itself
    head: torch.nn.Module | None
    labels: tuple[str, ...]
    jobs: list


@torch.no_grad()
def classify(model: torch.nn.Module, tokenizer, labels: tuple[str, ...],
             jobs: list[ClassifyJob | ScoreJob]) -> list[list[dict | float]]:
    """Per job, per text: {"label", "scores"} (a classify task), or the head's one output (a
    `ScoreJob` of a regress task). Single texts and pairs run as separate forwards."""
    items = [(j, k, t) for j, job in enumerate(jobs) for k, t in enumerate(job.texts)]
    out: list[list[dict]] = [[{} for _ in job.texts] for job in jobs]
    singles = [it for it in items if isinstance(it[2], str)]
    pairs = [it for it in items if not isinstance(it[2], str)]
    for group in (singles, pairs):
        if not group:
            continue
        enc = _encode(tokenizer, [it[2] for it in group], group is pairs, max_tokens(model))
        enc = enc.to(_device(model))
        logits = model(**enc).logits.float()  # [batch, labels]
        for (j, k, _), answer in zip(group, _head_answers([jobs[j] for j, _, _ in group], labels, logits),
                                     strict=True):
            out[j][k] = answer
    return out


def score(model: torch.nn.Module, tokenizer, texts: list, batch: int = 64) -> list[float]:
    """A regress task's outputs for many texts (or pairs), `batch` at a time, exactly as the score
    route computes them (`classify` on `ScoreJob`s): what a quality bench scores a delta with."""
    out: list[float] = []
    for start in range(0, len(texts), batch):
        job = ScoreJob(tuple(t if isinstance(t, str) else tuple(t) for t in texts[start:start + batch]))
        (rows,) = classify(model, tokenizer, (), [job])  # a score needs no label names
        out += [float(r) for r in rows]  # type: ignore[arg-type]
    return out


def _head_answers(jobs: list, labels: tuple[str, ...], logits: torch.Tensor) -> list[dict | float]:
    """Each row's answer from its task head's logits ([rows, labels]): a regress task's one output
    as it is, a classify task's labels ranked by softmax probability."""
    probs = logits.softmax(-1).tolist()  # [rows, labels]; for one output, ones (unused)
    return [raw[0] if isinstance(job, ScoreJob) else _scored(labels, p, _top_k(job))
            for job, raw, p in zip(jobs, logits.tolist(), probs, strict=True)]


def _scored(labels: tuple[str, ...], row: list[float], top_k: int | None = None) -> dict:
    """The best label and the scores of all labels, or of the `top_k` best (highest first)."""
    ranked = sorted(range(len(row)), key=row.__getitem__, reverse=True)
    keep = ranked if top_k is None else ranked[:top_k]
    return {"label": labels[ranked[0]], "scores": {labels[i]: row[i] for i in keep}}


def _top_k(job: ClassifyJob | ScoreJob) -> int | None:
    return getattr(job, "top_k", None)


def measure(tokenizer, job: Job, limit: int) -> list[int]:
    """Tokens each text of a classify/embed job will take in a forward (truncated at `limit`)."""
    texts = list(job.texts)  # type: ignore[union-attr]
    singles = [t if isinstance(t, str) else None for t in texts]
    lengths = [0] * len(texts)
    plain = [i for i, t in enumerate(singles) if t is not None]
    pairs = [i for i, t in enumerate(singles) if t is None]
    if plain:
        enc = tokenizer([texts[i] for i in plain], truncation=True, max_length=limit)["input_ids"]
        for i, ids in zip(plain, enc, strict=True):
            lengths[i] = len(ids)
    if pairs:
        enc = tokenizer([texts[i][0] for i in pairs], [texts[i][1] for i in pairs],
                        truncation=True, max_length=limit)["input_ids"]
        for i, ids in zip(pairs, enc, strict=True):
            lengths[i] = len(ids)
    return lengths


@torch.no_grad()
def classify_mixed(mixer: Mixer, backbone: torch.nn.Module, tokenizer,
                   parts: list[MixedPart]) -> list[list[list[dict | float]]]:
    """`classify` for several tasks at once (classify and regress alike): per input shape (single
    texts, pairs) one forward of the shared backbone with each task's corrections on its rows,
    then each task's head."""
    items = [(p, j, k, t) for p, part in enumerate(parts) for j, job in enumerate(part.jobs)
             for k, t in enumerate(job.texts)]  # grouped by task: its rows are contiguous
    out = [[[{} for _ in job.texts] for job in part.jobs] for part in parts]
    singles = [it for it in items if isinstance(it[3], str)]
    pairs = [it for it in items if not isinstance(it[3], str)]
    limit = max_tokens(backbone)
    for group in (singles, pairs):
        if not group:
            continue
        enc = _encode(tokenizer, [it[3] for it in group], group is pairs, limit)
        segments = _segments([it[0] for it in group])
        with mixer.mixing([(a, b, parts[p].mixed) for p, a, b in segments], len(group)):
            pooled = backbone(**enc.to(_device(backbone))).pooler_output  # [batch, hidden]
        for p, a, b in segments:
            logits = pooled_logits(parts[p].head, pooled[a:b]).float()  # [rows, labels]
            jobs = [parts[p].jobs[j] for _, j, _, _ in group[a:b]]
            for (_, j, k, _), answer in zip(group[a:b], _head_answers(jobs, parts[p].labels, logits),
                                            strict=True):
                out[p][j][k] = answer
    return out


@torch.no_grad()
def embed_mixed(mixer: Mixer, backbone: torch.nn.Module, tokenizer,
                parts: list[MixedPart]) -> list[list[list[list[float]]]]:
    """`embed` for several tasks in one forward, each task's corrections on its rows."""
    owners = [p for p, part in enumerate(parts) for job in part.jobs for _ in job.texts]
    texts = [t for part in parts for job in part.jobs for t in job.texts]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens(backbone),
                    return_tensors="pt").to(_device(backbone))
    segments = _segments(owners)
    with mixer.mixing([(a, b, parts[p].mixed) for p, a, b in segments], len(texts)):
        hidden = backbone(**enc).last_hidden_state.float()  # [batch, seq, hidden]
    pooled = _mean_pool(hidden, enc["attention_mask"])
    out, start = [], 0
    for part in parts:
        out.append(_split(pooled[start:], part.jobs))
        start += sum(len(job.texts) for job in part.jobs)
    return out


def _encode(tokenizer, texts: list, pairs: bool, limit: int):
    """One padded batch: single texts, or (first, second) pairs encoded as pairs."""
    if pairs:
        return tokenizer([a for a, _ in texts], [b for _, b in texts], padding=True,
                         truncation=True, max_length=limit, return_tensors="pt")
    return tokenizer(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt")


def _segments(owners: list[int]) -> list[tuple[int, int, int]]:
    """(owner, start, end) of each run of equal owners."""
    runs: list[tuple[int, int, int]] = []
    for i, p in enumerate(owners):
        if runs and runs[-1][0] == p:
            runs[-1] = (p, runs[-1][1], i + 1)
        else:
            runs.append((p, i, i + 1))
    return runs


@torch.no_grad()
def embed(backbone: torch.nn.Module, tokenizer, jobs: list[EmbedJob]) -> list[list[list[float]]]:
    """Mean-pooled last hidden states over real tokens, L2-normalised where asked."""
    texts = [t for job in jobs for t in job.texts]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens(backbone),
                    return_tensors="pt").to(_device(backbone))
    hidden = backbone(**enc).last_hidden_state.float()  # [batch, seq, hidden]
    return _split(_mean_pool(hidden, enc["attention_mask"]), jobs)


def _mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).float()  # [batch, seq, 1]
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # [batch, hidden]


def _split(pooled: torch.Tensor, jobs: list[EmbedJob]) -> list[list[list[float]]]:
    """Each job's rows of `pooled` (from the first row on), L2-normalised where asked."""
    out, start = [], 0
    for job in jobs:
        rows = pooled[start : start + len(job.texts)]
        if job.normalize:
            rows = torch.nn.functional.normalize(rows, dim=-1)
        out.append(rows.tolist())
        start += len(job.texts)
    return out


def render_chat(tokenizer, messages: list[dict[str, str]]) -> str:
    """The tokenizer's chat template where it has one, else a plain role-prefixed transcript."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


def max_tokens(model: torch.nn.Module) -> int:
    """Input tokens a text is cut to: the model's positions, at most MAX_TOKENS."""
    positions = getattr(model.config, "max_position_embeddings", None) or MAX_TOKENS
    return min(MAX_TOKENS, positions)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer, job: GenerateJob) -> Generation:
    """One sequence alone, token by token with its own KV cache: the offline reference that a
    served generation (in a continuous batch) is compared with."""
    positions = getattr(model.config, "max_position_embeddings", None) or 4096
    seq = Sequence(job, prompt_ids(tokenizer, job.prompt, positions), positions, tokenizer,
                   eos_ids(model, tokenizer), _device(model))
    cache_arg = cache_argument(model)
    ids = torch.tensor([seq.prompt], device=_device(model))
    kwargs = {cache_arg: DynamicCache(config=model.config), "use_cache": True}
    while not seq.done and not seq.cancel_requested():
        out = model(input_ids=ids, logits_to_keep=1, **kwargs)
        token = seq.pick(out.logits[0, -1].float())
        seq.push(token)
        ids = torch.tensor([[token]], device=ids.device)
    return seq.result()
