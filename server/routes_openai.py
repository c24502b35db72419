"""OpenAI-compatible routes: `model` names the task (or `base`). Errors in OpenAI's shape.

`n` sequences (and a list of prompts) are separate jobs submitted together, so they share the
continuous batch. Parameters this server does not honour are refused by the request models.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from taskdelta.client.openai_types import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    ModelCard,
    ModelList,
)
from taskdelta.client.types import SamplingParams, StreamChunk, Usage

from .auth import NAME_RE
from .deps import AppState, StateDep, TenantDep
from .errors import BadTaskRequest, TaskNotFound
from .fanout import fan_params, run_many, stream_many
from .http_errors import error_body, error_responses, request_id
from .inference import render_chat
from .jobs import EmbedJob
from .openai_format import chat_choice, chat_delta, completion_choice, text_delta, total_usage
from .registry import BASE_TASK, TaskRef
from .store import StoredTask
from .submit import run_job

router = APIRouter(prefix="/v1", tags=["openai"],
                   responses=error_responses(400, 401, 404, 413, 429, 503, 504, dialect="openai"))
# each event's data: a chunk (or an error) object, then the string [DONE]
SSE = {"text/event-stream": {"schema": {"anyOf": [{"type": "object"},
                                                  {"type": "string", "const": "[DONE]"}]}}}
STREAMED = {200: {"content": SSE, "description": "JSON, or SSE when stream is true"}}


@dataclass(frozen=True)
class _Head:
    """What every stream event of one request repeats."""

    id: str
    object: str
    created: int
    model: str

    def event(self, choices: list[dict], usage: Usage | None = None) -> str:
        body = {"id": self.id, "object": self.object, "created": self.created,
                "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage.model_dump()
        return f"data: {json.dumps(body)}\n\n"


def refuse(param: str, message: str) -> BadTaskRequest:
    """A 400 whose OpenAI body names the parameter."""
    exc = BadTaskRequest(message)
    exc.param = param  # type: ignore[attr-defined]  # read by http_errors
    return exc


# --- models --------------------------------------------------------------------------------------

@router.get("/models", response_model=ModelList)
async def list_models(state: StateDep, tenant: TenantDep) -> ModelList:
    """`base` and the caller's tasks; a task's `parent` is the base its delta applies to."""
    tasks = await state.store.list(tenant.name)
    return ModelList(data=[_base_card(state, tenant.name)]
                     + [_task_card(state, t) for t in sorted(tasks, key=lambda t: t.name)])


@router.get("/models/{model}", response_model=ModelCard)
async def get_model(model: str, state: StateDep, tenant: TenantDep) -> ModelCard:
    if model == BASE_TASK:
        return _base_card(state, tenant.name)
    _check_name(model)
    return _task_card(state, await state.store.get(tenant.name, model))


def _base_card(state: AppState, tenant: str) -> ModelCard:
    return ModelCard(id=BASE_TASK, created=0, owned_by=tenant, root=state.base.name)


def _task_card(state: AppState, task: StoredTask) -> ModelCard:
    created = int(float(task.info.get("created_at", "0")))
    return ModelCard(id=task.name, created=created, owned_by=task.tenant,
                     parent=state.base.name, root=state.base.name)


def _check_name(model: str) -> None:
    if not NAME_RE.match(model):  # no task can have this name (and it must not reach a key)
        raise TaskNotFound(f"model {model!r} not found")


# --- embeddings ----------------------------------------------------------------------------------

@router.post("/embeddings", response_model=EmbeddingResponse)
async def embeddings(body: EmbeddingRequest, request: Request, state: StateDep,
                     tenant: TenantDep) -> EmbeddingResponse:
    """Mean-pooled, L2-normalised embeddings of an embed task (or `base`)."""
    _check_name(body.model)
    ref = await state.registry.resolve(tenant.name, body.model, "embed")
    texts = body.texts
    out = await run_job(request, state, ref, EmbedJob(texts=tuple(texts), normalize=True))
    rows = out.rows
    dim = len(rows[0]) if rows else 0
    if body.dimensions is not None and body.dimensions != dim:
        raise refuse("dimensions", f"this model's embeddings have {dim} dimensions; "
                                   "shortening them is not supported")
    tokens = sum(len(ids) for ids in state.base.tokenizer(texts)["input_ids"])
    data = [Embedding(index=i, embedding=_encoded(row, body.encoding_format))
            for i, row in enumerate(rows)]
    return EmbeddingResponse(data=data, model=body.model,
                             usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))


def _encoded(row: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return row
    import base64

    return base64.b64encode(np.asarray(row, dtype="<f4").tobytes()).decode()


# --- completions ---------------------------------------------------------------------------------

def sampling(body: ChatCompletionRequest | CompletionRequest, logprobs: int | None) -> SamplingParams:
    extra = {"max_new_tokens": body.token_limit} if body.token_limit else {}
    return SamplingParams(temperature=body.temperature, top_p=body.top_p, stop=body.stops,
                          seed=body.seed, logprobs=logprobs, **extra)


async def _resolve(state: AppState, tenant: str, model: str) -> TaskRef:
    _check_name(model)
    return await state.registry.resolve(tenant, model, "generate")


@router.post("/chat/completions", response_model=ChatCompletion, responses=STREAMED)
async def chat_completions(body: ChatCompletionRequest, request: Request, state: StateDep,
                           tenant: TenantDep):
    """Chat with a task: its chat template (the base's) renders the messages."""
    ref = await _resolve(state, tenant.name, body.model)
    prompt = render_chat(state.base.tokenizer, [m.model_dump() for m in body.messages])
    params = sampling(body, body.top_k_logprobs)
    jobs = [(prompt, p) for p in fan_params(params, body.n)]
    head = _Head(f"chatcmpl-{request_id(request) or ''}", "chat.completion", int(time.time()),
                 body.model)
    if body.stream:
        merged = await stream_many(state, ref, jobs)
        events = _chat_events(merged, head, body, request_id(request))
        return StreamingResponse(events, media_type="text/event-stream")
    answers = await run_many(request, state, ref, jobs)
    return ChatCompletion(id=head.id, created=head.created, model=body.model,
                          choices=[chat_choice(i, a, body.logprobs) for i, a in enumerate(answers)],
                          usage=total_usage(answers, body.n))


@router.post("/completions", response_model=Completion, responses=STREAMED)
async def completions(body: CompletionRequest, request: Request, state: StateDep,
                      tenant: TenantDep):
    """Text completion of one prompt or a list of them (choice index = prompt * n + j)."""
    ref = await _resolve(state, tenant.name, body.model)
    params = fan_params(sampling(body, body.logprobs), body.n)
    jobs = [(prompt, p) for prompt in body.prompts for p in params]
    head = _Head(f"cmpl-{request_id(request) or ''}", "text_completion", int(time.time()),
                 body.model)
    if body.stream:
        merged = await stream_many(state, ref, jobs)
        events = _text_events(merged, head, body, request_id(request))
        return StreamingResponse(events, media_type="text/event-stream")
    answers = await run_many(request, state, ref, jobs)
    echoes = [prompt if body.echo else "" for prompt, _ in jobs]
    choices = [completion_choice(i, a, echoes[i], body.logprobs is not None)
               for i, a in enumerate(answers)]
    return Completion(id=head.id, created=head.created, model=body.model, choices=choices,
                      usage=total_usage(answers, body.n))


# --- streams -------------------------------------------------------------------------------------

async def _chat_events(merged: AsyncIterator[tuple[int, StreamChunk]], head: _Head,
                       body: ChatCompletionRequest, rid: str | None) -> AsyncIterator[str]:
    """OpenAI's chunk sequence: each choice opens with the role, then content deltas, then its
    finish reason; with stream_options.include_usage a last chunk with no choices and the usage."""
    head = _Head(head.id, "chat.completion.chunk", head.created, head.model)
    usages: dict[int, Usage] = {}
    try:
        for i in range(body.n):
            yield head.event([chat_delta(i, None, body.logprobs)])
        async for i, chunk in merged:
            if chunk.usage is not None:
                usages[i] = chunk.usage
            if chunk.text or chunk.finish_reason or chunk.logprobs:
                yield head.event([chat_delta(i, chunk, body.logprobs)])
        if body.include_usage:
            yield head.event([], _summed(usages, body.n))
    except Exception as exc:  # the response has started: the error travels as an event
        yield f"data: {json.dumps(error_body(exc, rid, 'openai'))}\n\n"
        return
    yield "data: [DONE]\n\n"


async def _text_events(merged: AsyncIterator[tuple[int, StreamChunk]], head: _Head,
                       body: CompletionRequest, rid: str | None) -> AsyncIterator[str]:
    usages: dict[int, Usage] = {}
    prompts = [p for p in body.prompts for _ in range(body.n)]
    sent = [len(p) if body.echo else 0 for p in prompts]  # characters per choice, for offsets
    want = body.logprobs is not None
    try:
        if body.echo:
            for i, prompt in enumerate(prompts):
                yield head.event([text_delta(i, StreamChunk(text=prompt), 0, False)])
        async for i, chunk in merged:
            if chunk.usage is not None:
                usages[i] = chunk.usage
            if chunk.text or chunk.finish_reason or chunk.logprobs:
                yield head.event([text_delta(i, chunk, sent[i], want)])
                sent[i] += len(chunk.text)
        if body.include_usage:
            yield head.event([], _summed(usages, body.n))
    except Exception as exc:
        yield f"data: {json.dumps(error_body(exc, rid, 'openai'))}\n\n"
        return
    yield "data: [DONE]\n\n"


def _summed(usages: dict[int, Usage], n: int) -> Usage:
    prompt = sum(u.prompt_tokens for i, u in usages.items() if i % n == 0)
    completion = sum(u.completion_tokens for u in usages.values())
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion)
