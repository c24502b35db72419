"""LoRAX/TGI-compatible generation: `POST /generate`, `/generate_stream`, and `POST /` (TGI's
compat route, which `lorax-client` calls: a list answer, or a stream when `stream` is true).

`parameters.adapter_id` names the caller's task; empty or absent is the base. Tenant-scoped like
every route. Errors in LoRAX's shape ({"error", "error_type"}), which its client maps to classes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from taskdelta.client.lorax_types import (
    AlternativeToken,
    LoraxDetails,
    LoraxRequest,
    LoraxResponse,
    LoraxStreamDetails,
    LoraxStreamResponse,
    LoraxToken,
)
from taskdelta.client.types import SamplingParams, StreamChunk, TokenLogprob

from .auth import NAME_RE
from .deps import AppState, StateDep, TenantDep
from .errors import TaskNotFound
from .http_errors import error_body, error_responses, request_id
from .jobs import GenerateJob
from .openai_format import logprobs_of
from .registry import BASE_TASK, TaskRef
from .submit import run_job, start_stream

router = APIRouter(tags=["lorax"],
                   responses=error_responses(400, 401, 404, 413, 422, 429, 503, 504, dialect="lorax"))
# each event's data: a token (the last one with the whole text and details), or an error
SSE = {"text/event-stream": {"schema": {"type": "object"}}}
NO_ID = -1  # the engine reports token text, not ids


def sampling(body: LoraxRequest) -> SamplingParams:
    """LoRAX's parameters as ours: greedy unless do_sample or a temperature asks to sample."""
    p = body.parameters
    temperature = p.temperature if p.temperature is not None else (1.0 if p.do_sample else 0.0)
    extra = {"max_new_tokens": p.max_new_tokens} if p.max_new_tokens else {}
    # logprobs always asked for: every TGI token carries one, details or not
    return SamplingParams(temperature=temperature, top_p=p.top_p or 1.0, stop=p.stop, seed=p.seed,
                          logprobs=p.return_k_alternatives or 0, **extra)


async def _resolve(state: AppState, tenant: str, body: LoraxRequest) -> TaskRef:
    name = body.parameters.adapter_id or BASE_TASK
    if not NAME_RE.match(name):
        raise TaskNotFound(f"adapter {name!r} not found")
    return await state.registry.resolve(tenant, name, "generate")


@router.post("/generate", response_model=LoraxResponse)
async def generate(body: LoraxRequest, request: Request, state: StateDep,
                   tenant: TenantDep) -> LoraxResponse:
    """Text from `inputs` with the task `parameters.adapter_id` (the base when empty)."""
    ref = await _resolve(state, tenant.name, body)
    params = sampling(body)
    g = await run_job(request, state, ref, GenerateJob(prompt=body.inputs, params=params))
    details = _details(g, params) if body.parameters.details else None
    return LoraxResponse(generated_text=g.text, details=details)


@router.post("/generate_stream", responses={200: {"content": SSE}})
async def generate_stream(body: LoraxRequest, request: Request, state: StateDep,
                          tenant: TenantDep) -> StreamingResponse:
    """Server-sent events, one per piece of text; the last carries the whole text and details."""
    ref = await _resolve(state, tenant.name, body)
    params = sampling(body)
    chunks = await start_stream(state, ref, {"prompt": body.inputs, "params": params})
    return StreamingResponse(_events(chunks, params, request_id(request)),
                             media_type="text/event-stream")


@router.post("/", response_model=list[LoraxResponse], responses={200: {"content": SSE}})
async def compat_generate(body: LoraxRequest, request: Request, state: StateDep,
                          tenant: TenantDep) -> Any:
    """TGI's compat route: `stream` false answers a one-item list, true a stream."""
    if body.stream:
        return await generate_stream(body, request, state, tenant)
    return [await generate(body, request, state, tenant)]


def _reason(finish: str, params: SamplingParams) -> str:
    """TGI's finish reason. The engine says "stop" for both EOS and a stop string; with stop
    strings asked for, a stop is reported as theirs (the closest TGI reason)."""
    if finish == "length":
        return "length"
    return "stop_sequence" if params.stop else "eos_token"


def _token(t: TokenLogprob) -> LoraxToken:
    alts = [AlternativeToken(id=NO_ID, text=a.token, logprob=a.logprob) for a in t.top_logprobs]
    return LoraxToken(id=NO_ID, text=t.token, logprob=t.logprob, alternative_tokens=alts or None)


def _details(g: Any, params: SamplingParams) -> LoraxDetails:
    return LoraxDetails(finish_reason=_reason(g.finish_reason, params),
                        prompt_tokens=g.prompt_tokens, generated_tokens=g.completion_tokens,
                        seed=params.seed, tokens=[_token(t) for t in logprobs_of(g) or []])


def _piece(chunk: StreamChunk) -> LoraxToken:
    """A stream event's token: the piece of text, its logprob the sum over its tokens."""
    logprob = sum(t.logprob for t in chunk.logprobs) if chunk.logprobs else 0.0
    alts = None
    if chunk.logprobs and len(chunk.logprobs) == 1:
        alts = _token(chunk.logprobs[0]).alternative_tokens
    return LoraxToken(id=NO_ID, text=chunk.text, logprob=logprob, alternative_tokens=alts)


async def _events(chunks: AsyncIterator[StreamChunk], params: SamplingParams,
                  rid: str | None) -> AsyncIterator[str]:
    text = ""
    try:
        async for chunk in chunks:
            text += chunk.text
            event = LoraxStreamResponse(token=_piece(chunk))
            if chunk.finish_reason is not None:
                usage = chunk.usage
                event.generated_text = text
                event.details = LoraxStreamDetails(
                    finish_reason=_reason(chunk.finish_reason, params), seed=params.seed,
                    prompt_tokens=usage.prompt_tokens if usage else 0,
                    generated_tokens=usage.completion_tokens if usage else 0)
            yield f"data: {event.model_dump_json(exclude_none=True)}\n\n"
    except Exception as exc:  # the response has started: the error travels as an event
        yield f"data: {json.dumps(error_body(exc, rid, 'lorax'))}\n\n"
