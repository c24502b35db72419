"""The engine's answers in OpenAI's shapes: choices, logprobs and stream chunks.

Plain functions from `Generation` / `StreamChunk` (the engine's contract) to the models of
`client/openai_types.py`; the routes only pick which to call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from taskdelta.client.openai_types import (
    ChatChoice,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionChoice,
    CompletionLogprobs,
)
from taskdelta.client.types import StreamChunk, TokenLogprob, Usage


def logprobs_of(answer: Any) -> list[TokenLogprob] | None:
    """The engine's per-token logprobs (`Generation.logprobs`: models or plain dicts), where it
    gives them."""
    tokens = getattr(answer, "logprobs", None)
    if tokens is None:
        return None
    return [t if isinstance(t, TokenLogprob) else TokenLogprob.model_validate(t) for t in tokens]


def chat_logprobs(tokens: Sequence[TokenLogprob] | None) -> ChatLogprobs | None:
    if tokens is None:
        return None
    return ChatLogprobs(content=[ChatTokenLogprob(
        token=t.token, logprob=t.logprob, bytes=list(t.token.encode()),
        top_logprobs=[ChatTopLogprob(token=a.token, logprob=a.logprob, bytes=list(a.token.encode()))
                      for a in t.top_logprobs]) for t in tokens])


def completion_logprobs(tokens: Sequence[TokenLogprob] | None, offset: int = 0
                        ) -> CompletionLogprobs | None:
    """The legacy completions shape; `text_offset` counts characters from `offset` on."""
    if tokens is None:
        return None
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t.token)
    return CompletionLogprobs(tokens=[t.token for t in tokens],
                              token_logprobs=[t.logprob for t in tokens],
                              top_logprobs=[{a.token: a.logprob for a in t.top_logprobs}
                                            for t in tokens],
                              text_offset=offsets)


def chat_choice(index: int, answer: Any, want_logprobs: bool) -> ChatChoice:
    return ChatChoice(index=index, message=ChatMessageOut(content=answer.text),
                      finish_reason=answer.finish_reason,
                      logprobs=chat_logprobs(logprobs_of(answer)) if want_logprobs else None)


def completion_choice(index: int, answer: Any, echo: str, want_logprobs: bool) -> CompletionChoice:
    return CompletionChoice(
        index=index, text=echo + answer.text, finish_reason=answer.finish_reason,
        logprobs=completion_logprobs(logprobs_of(answer), len(echo)) if want_logprobs else None)


def total_usage(answers: Sequence[Any], per_prompt: int) -> Usage:
    """Prompt tokens once per prompt (its `per_prompt` sequences share it), completions summed."""
    prompt = sum(a.prompt_tokens for a in answers[::per_prompt])
    completion = sum(a.completion_tokens for a in answers)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion)


def chat_delta(index: int, chunk: StreamChunk | None, want_logprobs: bool) -> dict:
    """One choice of a chat.completion.chunk; None: the opening delta with the role."""
    if chunk is None:
        return {"index": index, "delta": {"role": "assistant", "content": ""},
                "logprobs": None, "finish_reason": None}
    delta = {"content": chunk.text} if chunk.text else {}
    logprobs = chat_logprobs(chunk.logprobs) if want_logprobs and chunk.logprobs else None
    return {"index": index, "delta": delta,
            "logprobs": logprobs.model_dump() if logprobs else None,
            "finish_reason": chunk.finish_reason}


def text_delta(index: int, chunk: StreamChunk, offset: int, want_logprobs: bool) -> dict:
    """One choice of a streamed text_completion; `offset`: characters this choice sent so far."""
    logprobs = (completion_logprobs(chunk.logprobs, offset)
                if want_logprobs and chunk.logprobs else None)
    return {"index": index, "text": chunk.text,
            "logprobs": logprobs.model_dump() if logprobs else None,
            "finish_reason": chunk.finish_reason}
