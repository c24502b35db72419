"""The wire contract, defined once: the server imports these models, the SDK parses with them.

Request models forbid unknown fields (a typo is a 422, not a silently ignored option); response
models ignore unknown fields, so an older SDK keeps working against a newer server.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

TaskKind = Literal["classify", "regress", "generate", "embed"]  # what this build's server serves
MAX_TEXTS = 256
MAX_TEXT_CHARS = 20_000
MAX_TOP_LOGPROBS = 20


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --- tasks ---------------------------------------------------------------------------------------

class TaskInfo(_Response):
    name: str
    kind: str  # one of TaskKind today; open, so this SDK lists a newer server's tasks of a new kind
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

# Every text is bounded here (the server may bound it lower: TASKDELTA_MAX_TEXT_CHARS).
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
TextOrPair = Text | tuple[Text, Text]
MAX_TOP_K = 1024


class ClassifyRequest(_Request):
    texts: list[TextOrPair] = Field(min_length=1, max_length=MAX_TEXTS,
                                    description="Texts, or [text, text_pair] pairs for pair tasks")
    top_k: int | None = Field(None, ge=1, le=MAX_TOP_K,
                              description="Only the k most likely labels' scores in each result "
                                          "(default: every label's)")


class ClassifyResult(_Response):
    label: str
    scores: dict[str, float]


class ClassifyResponse(_Response):
    task: str
    version: int | None = None
    results: list[ClassifyResult]


class ScoreRequest(_Request):
    texts: list[TextOrPair] = Field(min_length=1, max_length=MAX_TEXTS,
                                    description="Texts, or [text, text_pair] pairs for pair tasks")


class ScoreResponse(_Response):
    """A regress task's output for each text, in order (e.g. STS-B's 0-5 similarity)."""

    task: str
    version: int | None = None
    scores: list[float]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str = Field(max_length=MAX_TEXT_CHARS * 4)

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        """OpenAI clients may send content as parts: text parts are joined, others refused."""
        if not isinstance(value, list):
            return value
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in value):
            raise ValueError("only text content parts are supported")
        return "".join(str(p.get("text", "")) for p in value)

    @field_validator("role")
    @classmethod
    def _developer_is_system(cls, value: str) -> str:
        return "system" if value == "developer" else value  # OpenAI's newer name for it


class SamplingParams(_Request):
    max_new_tokens: int = Field(64, ge=1, le=1024)
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 is greedy decoding")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, max_length=8)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                 description="None: off; k: each chosen token's logprob and the "
                                             "k most likely alternatives")


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
    logprobs: list[TokenLogprob] | None = None  # when the request asked for them


class TopLogprob(_Response):
    token: str
    logprob: float


class TokenLogprob(_Response):
    """One generated token: its text, its log-probability and the top alternatives at its step."""

    token: str
    logprob: float
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class StreamChunk(_Response):
    """One server-sent event of a streamed generate: a piece of text, or the final summary."""

    text: str = ""
    finish_reason: Literal["stop", "length"] | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprob] | None = None  # the tokens of `text`, when asked for


class EmbedRequest(_Request):
    texts: list[Text] = Field(min_length=1, max_length=MAX_TEXTS)
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


# The OpenAI- and LoRAX-compatible routes' models: openai_types.py and lorax_types.py.
