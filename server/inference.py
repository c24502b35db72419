"""Model execution for each task kind: plain torch over a transformers model, no serving logic.

The same functions run a swapped-in task in the server and an offline merged model in the tests,
so "the served output equals the merged model's" compares like with like.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from taskdelta.client.types import SamplingParams, StreamChunk, Usage
from taskdelta.deltas.mixed import MixedDelta, Mixer, pooled_logits

from .jobs import ClassifyJob, EmbedJob, GenerateJob

MAX_TOKENS = 512  # classify / embed inputs
MAX_PROMPT_TOKENS = 4096  # generate prompts (tail kept)


@dataclass(frozen=True)
class MixedPart:
    """One task's share of a mixed batch: its corrections, its head (classify) and its jobs."""

    mixed: MixedDelta | None  # None: the base itself
    head: torch.nn.Module | None
    labels: tuple[str, ...]
    jobs: list


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


@torch.no_grad()
def classify(model: torch.nn.Module, tokenizer, labels: tuple[str, ...],
             jobs: list[ClassifyJob]) -> list[list[dict]]:
    """Per job, per text: {"label", "scores"}. Single texts and pairs run as separate forwards."""
    items = [(j, k, t) for j, job in enumerate(jobs) for k, t in enumerate(job.texts)]
    out: list[list[dict]] = [[{} for _ in job.texts] for job in jobs]
    singles = [it for it in items if isinstance(it[2], str)]
    pairs = [it for it in items if not isinstance(it[2], str)]
    for group in (singles, pairs):
        if not group:
            continue
        enc = _encode(tokenizer, [it[2] for it in group], group is pairs, max_tokens(model))
        enc = enc.to(_device(model))
        probs = model(**enc).logits.float().softmax(-1)  # [batch, labels]
        for (j, k, _), row in zip(group, probs.tolist(), strict=True):
            out[j][k] = _scored(labels, row)
    return out


def _scored(labels: tuple[str, ...], row: list[float]) -> dict:
    best = max(range(len(row)), key=row.__getitem__)
    return {"label": labels[best], "scores": dict(zip(labels, row, strict=True))}


@torch.no_grad()
def classify_mixed(mixer: Mixer, backbone: torch.nn.Module, tokenizer,
                   parts: list[MixedPart]) -> list[list[list[dict]]]:
    """`classify` for several tasks at once: per input shape (single texts, pairs) one forward of
    the shared backbone with each task's corrections on its rows, then each task's head."""
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
            probs = pooled_logits(parts[p].head, pooled[a:b]).float().softmax(-1)  # [rows, labels]
            for (_, j, k, _), row in zip(group[a:b], probs.tolist(), strict=True):
                out[p][j][k] = _scored(parts[p].labels, row)
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


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer, job: GenerateJob) -> Generation:
    """Token-by-token decoding with a KV cache: greedy at temperature 0, else top-p sampling.

    Streams through `job.emit` and stops at EOS, a stop string, max_new_tokens, or cancellation.
    """
    p: SamplingParams = job.params
    device = _device(model)
    # the prompt is cut (its tail kept) only where it alone fills the model's positions; the new
    # tokens then get what room is left, and running out of room finishes with "length"
    ids = tokenizer(job.prompt, return_tensors="pt")["input_ids"]  # [1, prompt]
    positions = getattr(model.config, "max_position_embeddings", None) or MAX_PROMPT_TOKENS
    ids = ids[:, -min(MAX_PROMPT_TOKENS, positions - 1):].to(device)
    budget = min(p.max_new_tokens, positions - int(ids.shape[1]))
    gen = torch.Generator(device=device)
    gen.manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
    eos = _eos_ids(model, tokenizer)
    tokens: list[int] = []
    sent, finish, past, step_ids = "", "length", None, ids
    for _ in range(budget):
        out = model(input_ids=step_ids, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = _pick(out.logits[0, -1].float(), p, gen)
        if nxt in eos:
            finish = "stop"
            break
        tokens.append(nxt)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        cut = _stop_at(text, p.stop)
        if cut is not None:
            text, finish = text[:cut], "stop"
        if job.emit is not None and not text.endswith("\ufffd") and len(text) > len(sent):
            job.emit(StreamChunk(text=text[len(sent):]))
            sent = text
        if finish == "stop" or job.cancelled.is_set():
            break
        step_ids = torch.tensor([[nxt]], device=device)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    cut = _stop_at(text, p.stop)
    text = text if cut is None else text[:cut]
    result = Generation(text=text, finish_reason=finish, prompt_tokens=int(ids.shape[1]),
                        completion_tokens=len(tokens))
    if job.emit is not None:
        if len(text) > len(sent):
            job.emit(StreamChunk(text=text[len(sent):]))
        job.emit(StreamChunk(finish_reason=finish, usage=usage_of(result)))  # type: ignore[arg-type]
    return result


def usage_of(g: Generation) -> Usage:
    return Usage(prompt_tokens=g.prompt_tokens, completion_tokens=g.completion_tokens,
                 total_tokens=g.prompt_tokens + g.completion_tokens)


def render_chat(tokenizer, messages: list[dict[str, str]]) -> str:
    """The tokenizer's chat template where it has one, else a plain role-prefixed transcript."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


def _pick(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    if p.temperature == 0.0:
        return int(logits.argmax())
    probs = (logits / p.temperature).softmax(-1)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < p.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


def _stop_at(text: str, stops: list[str]) -> int | None:
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None


def _eos_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def max_tokens(model: torch.nn.Module) -> int:
    """Input tokens a text is cut to: the model's positions, at most MAX_TOKENS."""
    positions = getattr(model.config, "max_position_embeddings", None) or MAX_TOKENS
    return min(MAX_TOKENS, positions)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
