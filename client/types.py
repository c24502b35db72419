"""The wire contract, defined once: the server imports these models, the SDK parses with them.

Request models forbid unknown fields (a typo is a 422, not a silently ignored option); response
models ignore unknown fields, so an older SDK keeps working against a newer server.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TaskKind = Literal["classify", "generate", "embed"]
MAX_TEXTS = 256
MAX_TEXT_CHARS = 20_000


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --- tasks ---------------------------------------------------------------------------------------

class TaskInfo(_Response):
    name: str
    kind: TaskKind
    version: int
    labels: list[str] = Field(default_factory=list)
    nnz: int
    density: float
    bytes: int
    sha256: str
    base_fingerprint: str
    created_at: float  # unix seconds
    provenance: dict[str, Any] = Field(default_factory=dict)
    tenant: str | None = None  # filled in only for the admin's cross-tenant listing


class TaskList(_Response):
    tasks: list[TaskInfo]


class Deleted(_Response):
    name: str
    deleted: bool = True


# --- inference -----------------------------------------------------------------------------------

TextOrPair = str | tuple[str, str]


class ClassifyRequest(_Request):
    texts: list[TextOrPair] = Field(min_length=1, max_length=MAX_TEXTS,
                                    description="Texts, or [text, text_pair] pairs for pair tasks")


class ClassifyResult(_Response):
    label: str
    scores: dict[str, float]


class ClassifyResponse(_Response):
    task: str
    version: int | None = None
    results: list[ClassifyResult]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_TEXT_CHARS * 4)


class SamplingParams(_Request):
    max_new_tokens: int = Field(64, ge=1, le=1024)
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 is greedy decoding")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, max_length=8)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)


class GenerateRequest(SamplingParams):
    # exactly one of `prompt` and `messages` (the server checks it; this states it in the OpenAPI schema)
    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}}]})
    prompt: str | None = Field(None, max_length=MAX_TEXT_CHARS * 4)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=256)
    stream: bool = False


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(_Response):
    task: str
    version: int | None = None
    text: str
    finish_reason: Literal["stop", "length"]
    usage: Usage


class StreamChunk(_Response):
    """One server-sent event of a streamed generate: a piece of text, or the final summary."""

    text: str = ""
    finish_reason: Literal["stop", "length"] | None = None
    usage: Usage | None = None


class EmbedRequest(_Request):
    texts: list[str] = Field(min_length=1, max_length=MAX_TEXTS)
    normalize: bool = True


class EmbedResponse(_Response):
    task: str
    version: int | None = None
    dim: int
    embeddings: list[list[float]]


# --- service -------------------------------------------------------------------------------------

class Health(_Response):
    status: Literal["ok"] = "ok"


class Ready(_Response):
    ready: bool
    model_loaded: bool
    redis: bool
    base: str | None = None
    base_fingerprint: str | None = None


class ErrorDetail(_Response):
    type: str
    message: str
    request_id: str | None = None


class ErrorBody(_Response):
    error: ErrorDetail


# --- OpenAI-compatible ---------------------------------------------------------------------------

class _OpenAIRequest(BaseModel):
    # OpenAI clients send fields we do not use (user, n=1, ...): ignored, not refused
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, description="The task name (or `base`)")
    max_tokens: int = Field(64, ge=1, le=1024)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    stream: bool = False


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)


class CompletionRequest(_OpenAIRequest):
    prompt: str = Field(max_length=MAX_TEXT_CHARS * 4)
