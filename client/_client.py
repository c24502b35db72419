"""`Client` and `AsyncClient`: one method per endpoint, typed by the wire contract.

    from taskdelta.client import Client

    with Client() as client:             # TASKDELTA_BASE_URL / TASKDELTA_API_KEY, or arguments
        client.tasks.upload("sst2", "sst2.delta.safetensors")
        print(client.classify("sst2", ["a gripping film"]).results[0].label)
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import httpx
import pydantic

from ._base import (
    DEFAULT_MAX_RETRIES,
    NOT_GIVEN,
    BaseClient,
    NotGiven,
    Progress,
    RequestOptions,
    Timeout,
    UploadBody,
    connection_error,
    error_from_response,
    mutation_options,
    parse_model,
    task_path,
)
from ._streaming import AsyncGenerateStream, GenerateStream
from .types import (
    ChatMessage,
    ClassifyResponse,
    Deleted,
    EmbedResponse,
    GenerateResponse,
    Health,
    Ready,
    ScoreResponse,
    TaskInfo,
    TaskList,
)

M = TypeVar("M", bound=pydantic.BaseModel)
Texts = str | Sequence[str | tuple[str, str]]
Messages = Sequence[ChatMessage | dict[str, str]]


# --- request bodies, shared by both clients ------------------------------------------------------

def _texts(texts: Texts) -> list[Any]:
    return [texts] if isinstance(texts, str) else [t if isinstance(t, str) else list(t)
                                                   for t in texts]


def _generate_body(prompt: str | None, messages: Messages | None, max_new_tokens: int,
                   temperature: float, top_p: float, stop: Sequence[str] | None,
                   seed: int | None, stream: bool) -> dict[str, Any]:
    if (prompt is None) == (messages is None):
        raise ValueError("pass a prompt or messages (exactly one)")
    body: dict[str, Any] = {"max_new_tokens": max_new_tokens, "temperature": temperature,
                            "top_p": top_p, "stop": list(stop or []), "stream": stream}
    if prompt is not None:
        body["prompt"] = prompt
    else:
        body["messages"] = [m.model_dump() if isinstance(m, ChatMessage) else dict(m)
                            for m in messages or []]
    if seed is not None:
        body["seed"] = seed
    return body


def _options(method: str, path: str, timeout: Timeout | NotGiven, max_retries: int | NotGiven,
             **kwargs: Any) -> RequestOptions:
    return RequestOptions(method, path, timeout=timeout, max_retries=max_retries, **kwargs)


# --- sync ----------------------------------------------------------------------------------------

class Client(BaseClient):
    """A synchronous taskdelta client. Close it (or use `with`) when done.

    `base_url` and `api_key` default to TASKDELTA_BASE_URL (else http://127.0.0.1:8000) and
    TASKDELTA_API_KEY. `timeout` (seconds or an httpx.Timeout) and `max_retries` apply to every
    call and can be overridden per call. `http_client` replaces the httpx client (a proxy, a
    MockTransport in tests); it is then yours to close.
    """

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None,
                 timeout: Timeout | NotGiven = NOT_GIVEN,
                 max_retries: int = DEFAULT_MAX_RETRIES,
                 http_client: httpx.Client | None = None) -> None:
        super().__init__(base_url, api_key, timeout, max_retries,
                         http_client.timeout if http_client is not None else None)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=self.timeout)
        self._sleep: Callable[[float], None] = time.sleep  # tests record the waits instead
        self.tasks = Tasks(self)

    def _send(self, opts: RequestOptions, *, stream: bool = False) -> httpx.Response:
        """Send with retries; return the answer or raise the mapped error."""
        for retries_done in itertools.count():
            content = opts.body.iter_sync() if opts.body is not None else None
            request = self._http.build_request(**self._request_args(opts), content=content)
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = self._retry_delay(opts, retries_done, error=exc)
                if delay is None:
                    raise connection_error(exc, request) from exc
                self._sleep(delay)
                continue
            if self._is_answer(opts, response):
                return response
            try:
                response.read()
            finally:
                response.close()
            delay = self._retry_delay(opts, retries_done, response=response)
            if delay is None:
                raise error_from_response(response)
            self._sleep(delay)
        raise AssertionError("unreachable")

    def _request(self, opts: RequestOptions, cast_to: type[M]) -> M:
        return parse_model(self._send(opts), cast_to)

    def classify(self, task: str, texts: Texts, *, timeout: Timeout | NotGiven = NOT_GIVEN,
                 max_retries: int | NotGiven = NOT_GIVEN) -> ClassifyResponse:
        """Labels and scores per text; a text may be a (text, text_pair) tuple for pair tasks."""
        return self._request(_options("POST", task_path(task, "classify"), timeout, max_retries,
                                      json={"texts": _texts(texts)}), ClassifyResponse)

    def score(self, task: str, texts: Texts, *, timeout: Timeout | NotGiven = NOT_GIVEN,
              max_retries: int | NotGiven = NOT_GIVEN) -> ScoreResponse:
        """A regress task's value per text (e.g. STS-B similarity of (text, text_pair) tuples)."""
        return self._request(_options("POST", task_path(task, "score"), timeout, max_retries,
                                      json={"texts": _texts(texts)}), ScoreResponse)

    def embed(self, task: str, texts: str | Sequence[str], *, normalize: bool = True,
              timeout: Timeout | NotGiven = NOT_GIVEN,
              max_retries: int | NotGiven = NOT_GIVEN) -> EmbedResponse:
        return self._request(_options("POST", task_path(task, "embed"), timeout, max_retries,
                                      json={"texts": _texts(texts), "normalize": normalize}),
                             EmbedResponse)

    def generate(self, task: str, prompt: str | None = None, *, messages: Messages | None = None,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 stop: Sequence[str] | None = None, seed: int | None = None,
                 timeout: Timeout | NotGiven = NOT_GIVEN,
                 max_retries: int | NotGiven = NOT_GIVEN) -> GenerateResponse:
        """Generate from a prompt or chat messages (temperature 0 is greedy decoding)."""
        body = _generate_body(prompt, messages, max_new_tokens, temperature, top_p, stop, seed,
                              stream=False)
        return self._request(_options("POST", task_path(task, "generate"), timeout, max_retries,
                                      json=body), GenerateResponse)

    def generate_stream(self, task: str, prompt: str | None = None, *,
                        messages: Messages | None = None, max_new_tokens: int = 64,
                        temperature: float = 0.0, top_p: float = 1.0,
                        stop: Sequence[str] | None = None, seed: int | None = None,
                        timeout: Timeout | NotGiven = NOT_GIVEN,
                        max_retries: int | NotGiven = NOT_GIVEN) -> GenerateStream:
        """Like `generate`, streamed: iterate the result for text pieces. Errors before the
        first byte (status, connection) raise here and are retried; later ones raise while
        iterating and are not."""
        body = _generate_body(prompt, messages, max_new_tokens, temperature, top_p, stop, seed,
                              stream=True)
        opts = _options("POST", task_path(task, "generate"), timeout, max_retries, json=body,
                        headers={"Accept": "text/event-stream"})
        return GenerateStream(self._send(opts, stream=True))

    def health(self, *, timeout: Timeout | NotGiven = NOT_GIVEN,
               max_retries: int | NotGiven = NOT_GIVEN) -> Health:
        return self._request(_options("GET", "/healthz", timeout, max_retries), Health)

    def ready(self, *, timeout: Timeout | NotGiven = NOT_GIVEN,
              max_retries: int | NotGiven = NOT_GIVEN) -> Ready:
        """Readiness; a not-ready server (503 with a Ready body) returns `ready=False`."""
        opts = _options("GET", "/readyz", timeout, max_retries, answer_statuses=frozenset({503}))
        return _ready(self._send(opts))

    def metrics(self, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> str:
        """The Prometheus text exposition."""
        return self._send(_options("GET", "/metrics", timeout, NOT_GIVEN)).text

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Tasks:
    """`client.tasks`: upload, list, get and delete task deltas."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def upload(self, name: str, delta: Any, *, if_match: int | None = None,
               progress: Progress | None = None, timeout: Timeout | NotGiven = NOT_GIVEN,
               max_retries: int | NotGiven = NOT_GIVEN) -> TaskInfo:
        """Upload a delta file (a path, its bytes, or a `taskdelta.deltas.TaskDelta`) as task
        `name`, creating or replacing it. `if_match=V` replaces only if the current version is
        V (else ConflictError). `progress(sent, total)` follows the bytes sent. Retried only
        when safe: see `RetryPolicy`."""
        opts = mutation_options("PUT", task_path(name), if_match, timeout=timeout,
                                max_retries=max_retries, body=UploadBody.of(delta, progress))
        return self._client._request(opts, TaskInfo)

    def list(self, *, timeout: Timeout | NotGiven = NOT_GIVEN,
             max_retries: int | NotGiven = NOT_GIVEN) -> TaskList:
        return self._client._request(_options("GET", "/v1/tasks", timeout, max_retries),
                                     TaskList)

    def get(self, name: str, *, timeout: Timeout | NotGiven = NOT_GIVEN,
            max_retries: int | NotGiven = NOT_GIVEN) -> TaskInfo:
        return self._client._request(_options("GET", task_path(name), timeout, max_retries),
                                     TaskInfo)

    def delete(self, name: str, *, if_match: int | None = None,
               timeout: Timeout | NotGiven = NOT_GIVEN,
               max_retries: int | NotGiven = NOT_GIVEN) -> Deleted:
        """Delete task `name` (only at version `if_match`, when given)."""
        opts = mutation_options("DELETE", task_path(name), if_match, timeout=timeout,
                                max_retries=max_retries)
        return self._client._request(opts, Deleted)


def _ready(response: httpx.Response) -> Ready:
    if response.is_success:
        return parse_model(response, Ready)
    try:  # 503: a Ready body saying what is missing, or an error body
        return Ready.model_validate_json(response.content)
    except pydantic.ValidationError:
        raise error_from_response(response) from None


# --- async ---------------------------------------------------------------------------------------

class AsyncClient(BaseClient):
    """The asyncio twin of `Client`: same arguments, same methods, awaited.

        async with AsyncClient() as client:
            stream = await client.generate_stream("poet", "Roses are")
            async for piece in stream:
                print(piece, end="")
    """

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None,
                 timeout: Timeout | NotGiven = NOT_GIVEN,
                 max_retries: int = DEFAULT_MAX_RETRIES,
                 http_client: httpx.AsyncClient | None = None) -> None:
        super().__init__(base_url, api_key, timeout, max_retries,
                         http_client.timeout if http_client is not None else None)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=self.timeout)
        self._sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self.tasks = AsyncTasks(self)

    async def _send(self, opts: RequestOptions, *, stream: bool = False) -> httpx.Response:
        for retries_done in itertools.count():
            content = opts.body.iter_async() if opts.body is not None else None
            request = self._http.build_request(**self._request_args(opts), content=content)
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = self._retry_delay(opts, retries_done, error=exc)
                if delay is None:
                    raise connection_error(exc, request) from exc
                await self._sleep(delay)
                continue
            if self._is_answer(opts, response):
                return response
            try:
                await response.aread()
            finally:
                await response.aclose()
            delay = self._retry_delay(opts, retries_done, response=response)
            if delay is None:
                raise error_from_response(response)
            await self._sleep(delay)
        raise AssertionError("unreachable")

    async def _request(self, opts: RequestOptions, cast_to: type[M]) -> M:
        return parse_model(await self._send(opts), cast_to)

    async def classify(self, task: str, texts: Texts, *,
                       timeout: Timeout | NotGiven = NOT_GIVEN,
                       max_retries: int | NotGiven = NOT_GIVEN) -> ClassifyResponse:
        return await self._request(_options("POST", task_path(task, "classify"), timeout,
                                            max_retries, json={"texts": _texts(texts)}),
                                   ClassifyResponse)

    async def score(self, task: str, texts: Texts, *,
                    timeout: Timeout | NotGiven = NOT_GIVEN,
                    max_retries: int | NotGiven = NOT_GIVEN) -> ScoreResponse:
        return await self._request(_options("POST", task_path(task, "score"), timeout,
                                            max_retries, json={"texts": _texts(texts)}),
                                   ScoreResponse)

    async def embed(self, task: str, texts: str | Sequence[str], *, normalize: bool = True,
                    timeout: Timeout | NotGiven = NOT_GIVEN,
                    max_retries: int | NotGiven = NOT_GIVEN) -> EmbedResponse:
        return await self._request(_options("POST", task_path(task, "embed"), timeout,
                                            max_retries,
                                            json={"texts": _texts(texts), "normalize": normalize}),
                                   EmbedResponse)

    async def generate(self, task: str, prompt: str | None = None, *,
                       messages: Messages | None = None, max_new_tokens: int = 64,
                       temperature: float = 0.0, top_p: float = 1.0,
                       stop: Sequence[str] | None = None, seed: int | None = None,
                       timeout: Timeout | NotGiven = NOT_GIVEN,
                       max_retries: int | NotGiven = NOT_GIVEN) -> GenerateResponse:
        body = _generate_body(prompt, messages, max_new_tokens, temperature, top_p, stop, seed,
                              stream=False)
        return await self._request(_options("POST", task_path(task, "generate"), timeout,
                                            max_retries, json=body), GenerateResponse)

    async def generate_stream(self, task: str, prompt: str | None = None, *,
                              messages: Messages | None = None, max_new_tokens: int = 64,
                              temperature: float = 0.0, top_p: float = 1.0,
                              stop: Sequence[str] | None = None, seed: int | None = None,
                              timeout: Timeout | NotGiven = NOT_GIVEN,
                              max_retries: int | NotGiven = NOT_GIVEN) -> AsyncGenerateStream:
        body = _generate_body(prompt, messages, max_new_tokens, temperature, top_p, stop, seed,
                              stream=True)
        opts = _options("POST", task_path(task, "generate"), timeout, max_retries, json=body,
                        headers={"Accept": "text/event-stream"})
        return AsyncGenerateStream(await self._send(opts, stream=True))

    async def health(self, *, timeout: Timeout | NotGiven = NOT_GIVEN,
                     max_retries: int | NotGiven = NOT_GIVEN) -> Health:
        return await self._request(_options("GET", "/healthz", timeout, max_retries), Health)

    async def ready(self, *, timeout: Timeout | NotGiven = NOT_GIVEN,
                    max_retries: int | NotGiven = NOT_GIVEN) -> Ready:
        opts = _options("GET", "/readyz", timeout, max_retries, answer_statuses=frozenset({503}))
        return _ready(await self._send(opts))

    async def metrics(self, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> str:
        return (await self._send(_options("GET", "/metrics", timeout, NOT_GIVEN))).text

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


class AsyncTasks:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def upload(self, name: str, delta: Any, *, if_match: int | None = None,
                     progress: Progress | None = None, timeout: Timeout | NotGiven = NOT_GIVEN,
                     max_retries: int | NotGiven = NOT_GIVEN) -> TaskInfo:
        opts = mutation_options("PUT", task_path(name), if_match, timeout=timeout,
                                max_retries=max_retries, body=UploadBody.of(delta, progress))
        return await self._client._request(opts, TaskInfo)

    async def list(self, *, timeout: Timeout | NotGiven = NOT_GIVEN,
                   max_retries: int | NotGiven = NOT_GIVEN) -> TaskList:
        return await self._client._request(_options("GET", "/v1/tasks", timeout, max_retries),
                                           TaskList)

    async def get(self, name: str, *, timeout: Timeout | NotGiven = NOT_GIVEN,
                  max_retries: int | NotGiven = NOT_GIVEN) -> TaskInfo:
        return await self._client._request(_options("GET", task_path(name), timeout,
                                                    max_retries), TaskInfo)

    async def delete(self, name: str, *, if_match: int | None = None,
                     timeout: Timeout | NotGiven = NOT_GIVEN,
                     max_retries: int | NotGiven = NOT_GIVEN) -> Deleted:
        opts = mutation_options("DELETE", task_path(name), if_match, timeout=timeout,
                                max_retries=max_retries)
        return await self._client._request(opts, Deleted)
