"""What `Client` and `AsyncClient` share: settings, request building, the retry rule, error
mapping and response parsing. Everything here is free of I/O, so the sync and async clients
differ only in how they send and how they sleep.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import pydantic

from ._exceptions import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    DeltaRejectedError,
    GatewayTimeoutError,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    UnprocessableEntityError,
)

log = logging.getLogger("taskdelta.client")

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=5.0)
DEFAULT_MAX_RETRIES = 2
UPLOAD_CHUNK = 1 << 20

M = TypeVar("M", bound=pydantic.BaseModel)


class NotGiven:
    """Marks an argument left out, where None means something (`timeout=None`: wait forever)."""

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN = NotGiven()
Timeout = float | httpx.Timeout | None

# --- errors --------------------------------------------------------------------------------------

_STATUS_CLASSES: dict[int, type[APIStatusError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError,
    404: NotFoundError, 409: ConflictError, 413: PayloadTooLargeError,
    422: UnprocessableEntityError, 429: RateLimitError, 503: ServiceUnavailableError,
    504: GatewayTimeoutError,
}
# The status each error type travels with; an error event inside a stream has only the type.
TYPE_STATUS = {
    "bad_request": 400, "unauthorized": 401, "forbidden": 403, "quota_exceeded": 403,
    "not_found": 404,
    "conflict": 409, "payload_too_large": 413, "invalid_request": 422, "delta_rejected": 422,
    "rate_limited": 429, "internal_error": 500, "unavailable": 503, "timeout": 504,
}


def status_error(status_code: int, body: Any, *, response: httpx.Response | None = None,
                 ) -> APIStatusError:
    """THE mapping from an error answer to an exception: class by status (and `delta_rejected`
    by type), message/type/request id from the ErrorBody, Retry-After from the headers."""
    detail = body.get("error") if isinstance(body, dict) else None
    if isinstance(detail, dict):
        err_type, message = detail.get("type"), str(detail.get("message") or "")
        request_id = detail.get("request_id")
    else:  # not our error shape: a proxy's page, FastAPI's {"detail": ...}, empty
        err_type, request_id = None, None
        message = str(body.get("detail")) if isinstance(body, dict) and "detail" in body else (
            str(body)[:300] if body else "")
    headers = response.headers if response is not None else httpx.Headers()
    request_id = headers.get("x-request-id") or request_id
    cls = _STATUS_CLASSES.get(status_code)
    if cls is None:
        cls = InternalServerError if status_code >= 500 else APIStatusError
    if err_type == "delta_rejected" and status_code == 422:
        cls = DeltaRejectedError
    return cls(message or httpx.codes.get_reason_phrase(status_code) or "error",
               status_code=status_code, type=err_type, request_id=request_id, body=body,
               response=response, retry_after=retry_after_seconds(headers))


def error_from_response(response: httpx.Response) -> APIStatusError:
    """Decode an error answer's body (the response must have been read) and map it."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return status_error(response.status_code, body, response=response)


def connection_error(exc: httpx.TransportError,
                     request: httpx.Request | None) -> APIConnectionError:
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"request timed out ({type(exc).__name__})", request=request)
    where = f" {request.url.scheme}://{request.url.netloc.decode()}" if request else ""
    return APIConnectionError(f"cannot reach{where}: {exc or type(exc).__name__}",
                              request=request)


def parse_model(response: httpx.Response, cast_to: type[M]) -> M:
    try:
        return cast_to.model_validate_json(response.content)
    except pydantic.ValidationError as exc:
        raise APIResponseValidationError(
            f"{response.request.method} {response.request.url.path} answered "
            f"{response.status_code} with a body that is not a {cast_to.__name__}: "
            f"{exc.errors()[0].get('msg', exc)}", response=response, body=response.text) from None


# --- retries -------------------------------------------------------------------------------------

RETRYABLE_TRANSPORT_ERRORS = (httpx.TimeoutException, httpx.NetworkError,
                              httpx.RemoteProtocolError)
# The request provably never left this machine: replaying it cannot apply anything twice.
NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
REFUSED_UNAPPLIED = 429  # refused at admission, before the body is read: replay-safe for any request


def is_retryable_status(status_code: int) -> bool:
    return status_code in (408, 429) or status_code >= 500


def retry_after_seconds(headers: httpx.Headers) -> float | None:
    """`Retry-After` as seconds (a number, or an HTTP date); None if absent or unreadable."""
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(raw).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(seconds, 0.0) if seconds == seconds else None  # NaN is unreadable


@dataclass(frozen=True)
class RetryPolicy:
    """When to try a request again, and how long to wait first.

    Retried: connection errors and timeouts; answers 408, 429 and 5xx. Not retried: every other
    4xx (the same request would fail the same way).

    The wait is the server's `Retry-After` when it sent one, capped at `max_retry_after`; else
    exponential backoff `initial_delay * 2**n` capped at `max_delay`, scaled by a random factor
    in `[1 - jitter, 1]` so that many clients refused together do not come back together.

    Uploads and deletes change state, so they are replayed only when that is safe:
    - with `If-Match`: the server applies the request only to the version named, so a replay
      after a first attempt that did land is refused (409) instead of applying twice or
      overwriting a version somebody else wrote in between;
    - without it, only after a connect error (`ConnectError`, `ConnectTimeout`, `PoolTimeout`):
      the request never left this machine; or after a 429: the server's admission (the upload
      gate, a full queue) refuses before it reads the body, so nothing was applied. A 503, a
      timeout or a reset connection may come after the server (or a proxy in front of it) already
      applied the upload, so those raise.
    Inference (classify, embed, generate) changes nothing and is always retryable.
    """

    initial_delay: float = 0.5
    max_delay: float = 8.0
    max_retry_after: float = 30.0
    jitter: float = 0.25

    def backoff(self, retries_done: int, rand: float) -> float:
        base = min(self.initial_delay * 2.0 ** retries_done, self.max_delay)
        return base * (1.0 - self.jitter * rand)

    def delay(self, retries_done: int, headers: httpx.Headers | None, rand: float) -> float:
        after = retry_after_seconds(headers) if headers is not None else None
        if after is not None:
            return min(after, self.max_retry_after)
        return self.backoff(retries_done, rand)


# --- request bodies ------------------------------------------------------------------------------

Progress = Callable[[int, int], None]  # (bytes sent in this attempt, total bytes)


@dataclass
class UploadBody:
    """Bytes to upload, readable again for each attempt: a file on disk or bytes in memory.
    Sent in chunks with a Content-Length, so `progress` can follow the upload."""

    size: int
    path: Path | None = None
    data: bytes | None = None
    progress: Progress | None = None

    @classmethod
    def of(cls, source: Any, progress: Progress | None = None) -> UploadBody:
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
            return cls(size=len(data), data=data, progress=progress)
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            return cls(size=path.stat().st_size, path=path, progress=progress)
        return cls.of(_dump_task_delta(source), progress)

    def _chunks(self) -> Iterator[bytes]:
        if self.data is not None:
            view = memoryview(self.data)
            for start in range(0, self.size, UPLOAD_CHUNK):
                yield bytes(view[start:start + UPLOAD_CHUNK])
            return
        assert self.path is not None
        with self.path.open("rb") as f:
            while chunk := f.read(UPLOAD_CHUNK):
                yield chunk

    def iter_sync(self) -> Iterator[bytes]:
        sent = 0
        self._report(0)
        for chunk in self._chunks():
            sent += len(chunk)
            yield chunk
            self._report(sent)

    async def iter_async(self) -> AsyncIterator[bytes]:
        for chunk in self.iter_sync():  # chunks are 1 MiB reads: short enough to not await
            yield chunk

    def _report(self, sent: int) -> None:
        if self.progress is not None:
            self.progress(sent, self.size)


def _dump_task_delta(obj: Any) -> bytes:
    """A `taskdelta.deltas.TaskDelta` object: serialise it (this is the only torch import the
    SDK ever makes, and only because the caller already holds a torch object)."""
    try:
        from taskdelta.deltas.format import TaskDelta, dumps
    except ImportError as exc:
        raise TypeError(f"upload takes a path or bytes, not {type(obj).__name__}") from exc
    if not isinstance(obj, TaskDelta):
        raise TypeError(f"upload takes a path, bytes or a TaskDelta, not {type(obj).__name__}")
    return dumps(obj)


# --- the shared client base ----------------------------------------------------------------------

@dataclass
class RequestOptions:
    method: str
    path: str
    json: Any = None
    body: UploadBody | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout: Timeout | NotGiven = NOT_GIVEN
    max_retries: int | NotGiven = NOT_GIVEN
    replay_safe: bool = True  # False for a state change without If-Match (see RetryPolicy)
    answer_statuses: frozenset[int] = frozenset()  # error statuses that carry an answer


def task_path(name: str, action: str = "") -> str:
    if not name:
        raise ValueError("a task name is required")
    return f"/v1/tasks/{quote(name, safe='')}" + (f"/{action}" if action else "")


def mutation_options(method: str, path: str, if_match: int | None,
                     **kwargs: Any) -> RequestOptions:
    headers = {} if if_match is None else {"If-Match": str(int(if_match))}
    return RequestOptions(method, path, headers=headers, replay_safe=if_match is not None,
                          **kwargs)


class BaseClient:
    """Settings and the decisions both clients make; subclasses only send and sleep."""

    def __init__(self, base_url: str | None, api_key: str | None, timeout: Timeout | NotGiven,
                 max_retries: int, http_timeout: Timeout | None) -> None:
        url = base_url or os.environ.get("TASKDELTA_BASE_URL") or DEFAULT_BASE_URL
        self.base_url = url.rstrip("/")
        self.api_key = api_key if api_key is not None else (
            os.environ.get("TASKDELTA_API_KEY") or None)
        if isinstance(timeout, NotGiven):
            timeout = http_timeout if http_timeout is not None else DEFAULT_TIMEOUT
        self.timeout: Timeout = timeout
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.max_retries = max_retries
        self.retry_policy = RetryPolicy()
        self._random: Callable[[], float] = random.random  # tests pin the jitter

    def _request_args(self, opts: RequestOptions) -> dict[str, Any]:
        headers = {"Accept": "application/json", **opts.headers}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        args: dict[str, Any] = {"method": opts.method, "url": self.base_url + opts.path,
                                "headers": headers,
                                "timeout": self.timeout if isinstance(opts.timeout, NotGiven)
                                else opts.timeout}
        if opts.json is not None:
            args["json"] = opts.json
        if opts.body is not None:
            headers["Content-Type"] = "application/octet-stream"
            headers["Content-Length"] = str(opts.body.size)
        return args

    def _retries_allowed(self, opts: RequestOptions) -> int:
        return self.max_retries if isinstance(opts.max_retries, NotGiven) else opts.max_retries

    def _retry_delay(self, opts: RequestOptions, retries_done: int, *,
                     response: httpx.Response | None = None,
                     error: httpx.TransportError | None = None) -> float | None:
        """Seconds to wait before trying again, or None to give up now (see RetryPolicy)."""
        if retries_done >= self._retries_allowed(opts):
            return None
        if error is not None:
            if not isinstance(error, RETRYABLE_TRANSPORT_ERRORS):
                return None
            if not opts.replay_safe and not isinstance(error, NOT_SENT_ERRORS):
                return None
        elif response is None or not is_retryable_status(response.status_code) or (
                not opts.replay_safe and response.status_code != REFUSED_UNAPPLIED):
            return None
        delay = self.retry_policy.delay(
            retries_done, response.headers if response is not None else None, self._random())
        what = f"answer {response.status_code}" if response is not None else repr(error)
        log.info("%s %s: %s, retry %d in %.2fs", opts.method, opts.path, what,
                 retries_done + 1, delay)
        return delay

    def _is_answer(self, opts: RequestOptions, response: httpx.Response) -> bool:
        return response.is_success or response.status_code in opts.answer_statuses
