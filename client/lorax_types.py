"""The LoRAX/TGI-compatible routes' wire contract: `POST /generate`, `/generate_stream` and `/`.

`parameters.adapter_id` names the task; empty or absent is the base (LoRAX's convention). LoRAX
clients send every parameter they know, most as null or off: those are accepted at their neutral
values, anything asking for behaviour this server lacks is refused (422, naming the field).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .types import MAX_TEXT_CHARS, MAX_TOP_LOGPROBS


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


OFF = "Not supported by this server: only false"
ABSENT = "Not supported by this server: only null or absent"


class LoraxParameters(BaseModel):
    """The neutral-only parameters say so in their types, so the schema states what is honoured."""

    model_config = ConfigDict(extra="forbid")
    adapter_id: str | None = Field(None, description="The task name; empty or absent: the base")
    adapter_source: Literal["local"] | None = Field(None, description="Only 'local' (the task store)")
    max_new_tokens: int | None = Field(None, ge=1, le=1024)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    do_sample: bool = False
    stop: list[str] = Field(default_factory=list, max_length=8)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    details: bool = False
    return_k_alternatives: int | None = Field(None, ge=1, le=MAX_TOP_LOGPROBS)
    api_token: str | None = Field(None, description="Accepted and ignored (tasks are local)")
    # sent by clients at neutral values; anything else is refused
    merged_adapters: None = Field(None, description=ABSENT)
    response_format: None = Field(None, description=ABSENT)
    top_k: None = Field(None, description=ABSENT)
    truncate: None = Field(None, description=ABSENT)
    typical_p: None = Field(None, description=ABSENT)
    repetition_penalty: Literal[1.0] | None = Field(None, description="Only 1 (no penalty)")
    best_of: Literal[1] | None = Field(None, description="Only 1")
    ignore_eos_token: Literal[False] = Field(False, description=OFF)
    return_full_text: Literal[False] = Field(False, description=OFF)
    watermark: Literal[False] = Field(False, description=OFF)
    decoder_input_details: Literal[False] = Field(False, description=OFF)


class LoraxRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: str = Field(min_length=1, max_length=MAX_TEXT_CHARS * 4)
    parameters: LoraxParameters = Field(default_factory=LoraxParameters)
    stream: bool = False


FinishReason = Literal["length", "eos_token", "stop_sequence"]


class AlternativeToken(_Response):
    id: int
    text: str
    logprob: float


class LoraxToken(_Response):
    id: int = Field(description="-1: this server reports text, not token ids")
    text: str
    logprob: float
    special: bool = False
    alternative_tokens: list[AlternativeToken] | None = None


class LoraxDetails(_Response):
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    seed: int | None = None
    prefill: list[dict[str, Any]] = Field(default_factory=list)
    tokens: list[LoraxToken] = Field(default_factory=list)


class LoraxResponse(_Response):
    generated_text: str
    details: LoraxDetails | None = None


class LoraxStreamDetails(_Response):
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    seed: int | None = None


class LoraxStreamResponse(_Response):
    token: LoraxToken
    generated_text: str | None = None
    details: LoraxStreamDetails | None = None


class LoraxError(_Response):
    error: str
    error_type: str
