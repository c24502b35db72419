"""Live generations: one `Sequence` per request, and the text it may show so far.

A sequence owns its tokens, its sampler (temperature, top-p, its own seeded generator) and its
stop rules. The scheduler's executor feeds it one token at a time (`push`); the sequence decides
whether it has finished and emits to its stream only text that can no longer change: a tail that
could still begin a stop string, or an incomplete UTF-8 character, is held back until the next
token settles it, so a stream's text always equals the non-streamed answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from taskdelta.client.types import SamplingParams, StreamChunk, Usage

from .jobs import GenerateJob

MAX_PROMPT_TOKENS = 4096  # prompts longer than this (or than the model's positions) keep their tail


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict] | None = None  # per token: {"token", "logprob", "top_logprobs"}
    version: int | None = None  # the task version that generated it


def usage_of(g: Generation) -> Usage:
    return Usage(prompt_tokens=g.prompt_tokens, completion_tokens=g.completion_tokens,
                 total_tokens=g.prompt_tokens + g.completion_tokens)


def prompt_ids(tokenizer, prompt: str, positions: int) -> list[int]:
    """The prompt's token ids, cut to its tail where it alone would fill the model's positions."""
    ids = tokenizer(prompt)["input_ids"]
    keep = min(MAX_PROMPT_TOKENS, positions - 1)
    return list(ids[-keep:]) if len(ids) > keep else list(ids)


class Sequence:
    """One generation in flight. Driven by one thread (the engine's worker) at a time."""

    def __init__(self, job: GenerateJob, prompt: list[int], positions: int, tokenizer,
                 eos: set[int], device: torch.device | str = "cpu") -> None:
        self.job = job
        self.params: SamplingParams = job.params
        self.prompt = prompt
        self.tokens: list[int] = []
        self.budget = max(0, min(self.params.max_new_tokens, positions - len(prompt)))
        self.finish: str | None = None if self.budget > 0 else "length"
        self.prefilled = 0  # prompt tokens already in its KV cache
        self._tokenizer = tokenizer
        self._eos = eos
        self._sent = ""  # text already emitted
        self._logprobs: list[dict] | None = [] if _wants_logprobs(self.params) else None
        self._unsent_logprobs = 0
        self._gen = torch.Generator(device=device)
        seed = self.params.seed
        self._gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, ())))

    @property
    def done(self) -> bool:
        return self.finish is not None

    @property
    def reserved_tokens(self) -> int:
        """The most KV positions it can ever hold: its prompt and every new token."""
        return len(self.prompt) + self.budget

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from this sequence's logits [vocab] (float32)."""
        p = self.params
        nxt = int(logits.argmax()) if p.temperature == 0.0 else _sample(logits, p, self._gen)
        if self._logprobs is not None:
            self._logprobs.append(self._token_logprob(logits, nxt))
        return nxt

    def push(self, token: int) -> None:
        """Take the token just picked: finish at EOS, a stop string or the budget; emit text."""
        if token in self._eos:
            if self._logprobs:
                self._logprobs.pop()  # the EOS token is not part of the answer
            self.finish = "stop"
        else:
            self.tokens.append(token)
            if len(self.tokens) >= self.budget:
                self.finish = "length"
        text, cut = self._text()
        if cut:
            self.finish = "stop"
        self._emit(text, final=self.done)

    def cancel_requested(self) -> bool:
        return self.job.cancelled.is_set()

    def result(self, version: int | None = None) -> Generation:
        text, _ = self._text()
        return Generation(text=text, finish_reason=self.finish or "length",
                          prompt_tokens=len(self.prompt), completion_tokens=len(self.tokens),
                          logprobs=self._logprobs, version=version)

    # -- text and streaming -------------------------------------------------------------------

    def _text(self) -> tuple[str, bool]:
        """The answer so far, cut at the first stop string; and whether one was found."""
        text = self._tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = stop_at(text, self.params.stop)
        return (text, False) if cut is None else (text[:cut], True)

    def _emit(self, text: str, final: bool) -> None:
        if self.job.emit is None:
            return
        shown = text if final else text[:settled_length(text, self.params.stop)]
        piece = shown[len(self._sent):] if shown.startswith(self._sent) else ""
        logprobs = self._take_logprobs(final)
        if piece or logprobs:
            self.job.emit(StreamChunk(text=piece, logprobs=logprobs) if logprobs is not None
                          else StreamChunk(text=piece))
            self._sent += piece
        if final:
            result = self.result()
            self.job.emit(StreamChunk(finish_reason=result.finish_reason,  # type: ignore[arg-type]
                                      usage=usage_of(result)))

    def _take_logprobs(self, final: bool) -> list[dict] | None:
        if self._logprobs is None or not _streams_logprobs():
            return None
        fresh = self._logprobs[self._unsent_logprobs:]
        self._unsent_logprobs = len(self._logprobs)
        return fresh or None

    def _token_logprob(self, logits: torch.Tensor, token: int) -> dict:
        logp = logits.float().log_softmax(-1)
        k = int(self.params.logprobs or 0)  # type: ignore[attr-defined]
        top = logp.topk(k) if k > 0 else None
        decode = self._tokenizer.decode
        return {"token": decode([token]), "logprob": float(logp[token]),
                "top_logprobs": [] if top is None else
                [{"token": decode([int(i)]), "logprob": float(v)}
                 for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)]}


def _wants_logprobs(p: SamplingParams) -> bool:
    return getattr(p, "logprobs", None) is not None


def _streams_logprobs() -> bool:
    """Whether the wire contract's stream chunks carry logprobs (a newer SDK field)."""
    return "logprobs" in StreamChunk.model_fields


def _sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    scaled = logits / p.temperature
    if bool((scaled.isnan() | scaled.isposinf()).any()):
        # a temperature so small (e.g. 1e-320) that logits / t overflow: softmax would be NaN;
        # sampling at t -> 0 tends to the most likely token, which is what it gets
        return int(logits.argmax())
    probs = scaled.softmax(-1)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < p.top_p
        keep[0] = True  # the most likely token, whatever top_p (a float32 5e-324 is 0)
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


def stop_at(text: str, stops: list[str]) -> int | None:
    """Where the first stop string begins in `text`, or None."""
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None


def settled_length(text: str, stops: list[str]) -> int:
    """How much of `text` can be shown now: all but a tail that could still grow into a stop
    string (its longest suffix that is a proper prefix of one) and an incomplete character."""
    end = len(text)
    if text.endswith("\ufffd"):  # the decoder's mark for bytes of a character still to come
        end = len(text.rstrip("\ufffd"))
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, end), 0, -1):
            if text[end - n:end] == stop[:n]:
                hold = max(hold, n)
                break
    return end - hold


def eos_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return ids
