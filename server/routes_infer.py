"""Per-task inference routes: classify, score (regress tasks), generate (optionally streamed), embed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from taskdelta.client.types import (
    ClassifyRequest,
    ClassifyResponse,
    ClassifyResult,
    EmbedRequest,
    EmbedResponse,
    ErrorBody,
    ErrorDetail,
    GenerateRequest,
    GenerateResponse,
    SamplingParams,
    ScoreRequest,
    ScoreResponse,
    StreamChunk,
)

from .deps import StateDep, TaskName, TenantDep
from .errors import BadTaskRequest
from .http_errors import error_responses, request_id, status_of
from .inference import render_chat
from .jobs import ClassifyJob, EmbedJob, GenerateJob, ScoreJob
from .limits import check_texts
from .sequences import usage_of
from .submit import run_job, start_stream

router = APIRouter(prefix="/v1/tasks", tags=["inference"],
                   responses=error_responses(400, 401, 404, 413, 422, 429, 503, 504))
SSE = {"text/event-stream": {"schema": {"type": "string"}}}


@router.post("/{task}/classify", response_model=ClassifyResponse)
async def classify(task: TaskName, body: ClassifyRequest, request: Request, state: StateDep,
                   tenant: TenantDep) -> ClassifyResponse:
    """Labels and per-label probabilities; an item is a text or a [text, text_pair] pair."""
    check_texts(body.texts, state.settings)
    ref = await state.registry.resolve(tenant.name, task, "classify")
    job = ClassifyJob(texts=tuple(t if isinstance(t, str) else tuple(t) for t in body.texts),
                      top_k=body.top_k)
    out = await run_job(request, state, ref, job)
    return ClassifyResponse(task=task, version=out.version,
                            results=[ClassifyResult(**r) for r in out.rows])


@router.post("/{task}/score", response_model=ScoreResponse)
async def score(task: TaskName, body: ScoreRequest, request: Request, state: StateDep,
                tenant: TenantDep) -> ScoreResponse:
    """A regress task's value for each text or [text, text_pair] pair (its head's one output)."""
    check_texts(body.texts, state.settings)
    ref = await state.registry.resolve(tenant.name, task, "regress")
    job = ScoreJob(texts=tuple(t if isinstance(t, str) else tuple(t) for t in body.texts))
    out = await run_job(request, state, ref, job)
    return ScoreResponse(task=task, version=out.version, scores=out.rows)


@router.post("/{task}/embed", response_model=EmbedResponse)
async def embed(task: TaskName, body: EmbedRequest, request: Request, state: StateDep,
                tenant: TenantDep) -> EmbedResponse:
    """Mean-pooled sentence embeddings (L2-normalised unless `normalize` is false)."""
    check_texts(body.texts, state.settings)
    ref = await state.registry.resolve(tenant.name, task, "embed")
    out = await run_job(request, state, ref, EmbedJob(texts=tuple(body.texts),
                                                      normalize=body.normalize))
    rows = out.rows
    return EmbedResponse(task=task, version=out.version, dim=len(rows[0]) if rows else 0,
                         embeddings=rows)


@router.post("/{task}/generate", response_model=GenerateResponse,
             responses={200: {"content": SSE, "description": "JSON, or SSE when stream is true"}})
async def generate(task: TaskName, body: GenerateRequest, request: Request, state: StateDep,
                   tenant: TenantDep):
    """Text from a prompt or chat messages; `"stream": true` answers with server-sent events."""
    if (body.prompt is None) == (body.messages is None):
        raise BadTaskRequest("give exactly one of `prompt` or `messages`")
    ref = await state.registry.resolve(tenant.name, task, "generate")
    prompt = body.prompt if body.prompt is not None else render_chat(
        state.base.tokenizer, [m.model_dump() for m in body.messages or []])
    params = SamplingParams(**body.model_dump(include=set(SamplingParams.model_fields)))
    if body.stream:
        chunks = await start_stream(state, ref, {"prompt": prompt, "params": params})
        return StreamingResponse(sse(chunks, request_id(request)), media_type="text/event-stream")
    g = await run_job(request, state, ref, GenerateJob(prompt=prompt, params=params))
    return GenerateResponse(task=task, version=g.version, text=g.text,
                            finish_reason=g.finish_reason, usage=usage_of(g), logprobs=g.logprobs)


async def sse(chunks: AsyncIterator[StreamChunk], rid: str | None) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"
    except Exception as exc:  # the response has started: the error travels as an event
        yield error_event(exc, rid)
        return
    yield "data: [DONE]\n\n"


def error_event(exc: Exception, rid: str | None) -> str:
    _, type_ = status_of(exc)
    message = str(exc) if type_ != "internal_error" else "internal error"
    body = ErrorBody(error=ErrorDetail(type=type_, message=message, request_id=rid))
    return f"event: error\ndata: {json.dumps(body.model_dump())}\n\n"
