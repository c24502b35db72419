"""OpenAI-compatible completions: `model` names the task (or `base`)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from taskdelta.client.types import ChatCompletionRequest, CompletionRequest, SamplingParams

from .auth import valid_name
from .deps import StateDep, TenantDep
from .errors import TaskNotFound
from .http_errors import error_responses, request_id
from .inference import Generation, render_chat, usage_of
from .jobs import GenerateJob
from .routes_infer import SSE, error_event
from .submit import run_job, start_stream

router = APIRouter(prefix="/v1", tags=["openai"],
                   responses=error_responses(400, 401, 404, 413, 422, 429, 503, 504))
STREAMED = {200: {"content": SSE, "description": "JSON, or SSE when stream is true"}}


def _params(body: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(max_new_tokens=body.max_tokens, temperature=body.temperature,
                          top_p=body.top_p, stop=stop, seed=body.seed)


@router.post("/chat/completions", responses=STREAMED)
async def chat_completions(body: ChatCompletionRequest, request: Request, state: StateDep,
                           tenant: TenantDep):
    prompt = render_chat(state.base.tokenizer, [m.model_dump() for m in body.messages])
    return await _complete(body, prompt, "chat.completion", request, state, tenant.name)


@router.post("/completions", responses=STREAMED)
async def completions(body: CompletionRequest, request: Request, state: StateDep,
                      tenant: TenantDep):
    return await _complete(body, body.prompt, "text_completion", request, state, tenant.name)


async def _complete(body, prompt: str, obj: str, request: Request, state, tenant: str):
    if not valid_name(body.model):  # no task can have this name (and it must not reach a key)
        raise TaskNotFound(f"task {body.model!r} not found")
    ref = await state.engine.resolve(tenant, body.model, "generate")
    params = _params(body)
    rid = request_id(request) or ""
    created = int(time.time())
    if body.stream:
        chunks = await start_stream(state, ref, {"prompt": prompt, "params": params})
        return StreamingResponse(_events(chunks, obj, body.model, rid, created),
                                 media_type="text/event-stream")
    g: Generation = await run_job(request, state, ref, GenerateJob(prompt=prompt, params=params))
    choice = ({"index": 0, "message": {"role": "assistant", "content": g.text},
               "finish_reason": g.finish_reason} if obj == "chat.completion"
              else {"index": 0, "text": g.text, "finish_reason": g.finish_reason})
    return {"id": f"cmpl-{rid}", "object": obj, "created": created, "model": body.model,
            "choices": [choice], "usage": usage_of(g).model_dump()}


async def _events(chunks, obj: str, model: str, rid: str, created: int) -> AsyncIterator[str]:
    kind = "chat.completion.chunk" if obj == "chat.completion" else "text_completion"
    try:
        async for c in chunks:
            piece = ({"delta": {"content": c.text} if c.text else {}} if kind.startswith("chat")
                     else {"text": c.text})
            event = {"id": f"cmpl-{rid}", "object": kind, "created": created, "model": model,
                     "choices": [{"index": 0, **piece, "finish_reason": c.finish_reason}]}
            if c.usage is not None:
                event["usage"] = c.usage.model_dump()
            yield f"data: {json.dumps(event)}\n\n"
    except Exception as exc:
        yield error_event(exc, rid)
        return
    yield "data: [DONE]\n\n"
