"""The LoRAX/TGI-compatible routes' wire contract: `POST /generate`, `/generate_stream` and `/`.

`parameters.adapter_id` names the task; empty or absent is the base (LoRAX's convention). LoRAX
clients send every parameter they know, most as null or off: those are accepted at their neutral
values, anything asking for behaviour this server lacks is refused (422, naming the field).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .types import MAX_TEXT_CHARS, MAX_TOP_LOGPROBS


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _must_be(value: Any, neutral: tuple[Any, ...], what: str) -> Any:
    if value not in neutral:
        raise ValueError(f"{what} is not supported by this server")
    return value


class LoraxParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter_id: str | None = Field(None, description="The task name; empty or absent: the base")
    adapter_source: str | None = Field(None, description="Only absent or 'local' (the task store)")
    max_new_tokens: int | None = Field(None, ge=1, le=1024)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    do_sample: bool = False
    stop: list[str] = Field(default_factory=list, max_length=8)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    details: bool = False
    return_k_alternatives: int | None = Field(None, ge=1, le=MAX_TOP_LOGPROBS)
    # sent by clients at neutral values; anything else is refused
    merged_adapters: Any = None
    api_token: str | None = None
    ignore_eos_token: bool = False
    repetition_penalty: float | None = None
    return_full_text: bool = False
    top_k: int | None = None
    truncate: int | None = None
    typical_p: float | None = None
    best_of: int | None = None
    watermark: bool = False
    decoder_input_details: bool = False
    response_format: Any = None

    @field_validator("adapter_source")
    @classmethod
    def _local(cls, v: str | None) -> str | None:
        return _must_be(v, (None, "local"), "an adapter_source other than 'local'")

    @field_validator("merged_adapters", "response_format", "top_k", "truncate", "typical_p")
    @classmethod
    def _absent(cls, v: Any) -> Any:
        return _must_be(v, (None,), "this parameter")

    @field_validator("ignore_eos_token", "return_full_text", "watermark", "decoder_input_details")
    @classmethod
    def _off(cls, v: bool) -> bool:
        return _must_be(v, (False,), "this option")

    @field_validator("repetition_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        return _must_be(v, (None, 1.0), "a repetition_penalty other than 1")

    @field_validator("best_of")
    @classmethod
    def _one(cls, v: int | None) -> int | None:
        return _must_be(v, (None, 1), "best_of > 1")


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
