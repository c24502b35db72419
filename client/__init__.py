"""The taskdelta Python SDK and command line. Never imports torch.

    from taskdelta.client import Client, NotFoundError

    with Client("http://127.0.0.1:8000", api_key="...") as client:
        info = client.tasks.upload("sst2", "sst2.delta.safetensors")
        print(client.classify("sst2", ["a gripping film"]).results[0].label)
        for piece in client.generate_stream("base", "Once upon a time"):
            print(piece, end="", flush=True)
"""

from ._base import DEFAULT_BASE_URL, NOT_GIVEN, NotGiven, RetryPolicy
from ._client import AsyncClient, AsyncTasks, Client, Tasks
from ._exceptions import (
    APIConnectionError,
    APIError,
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
    TaskDeltaError,
    UnprocessableEntityError,
)
from ._keys import hash_api_key, new_api_key  # noqa: E402
from ._streaming import AsyncGenerateStream, GenerateStream
from .types import (
    ChatMessage,
    ClassifyResponse,
    ClassifyResult,
    Deleted,
    EmbedResponse,
    GenerateResponse,
    Health,
    Ready,
    ScoreResponse,
    StreamChunk,
    TaskInfo,
    TaskList,
    Usage,
)

__all__ = [
    "hash_api_key", "new_api_key",
    "DEFAULT_BASE_URL", "NOT_GIVEN", "APIConnectionError", "APIError",
    "APIResponseValidationError", "APIStatusError", "APITimeoutError", "AsyncClient",
    "AsyncGenerateStream", "AsyncTasks", "AuthenticationError", "BadRequestError", "ChatMessage",
    "ClassifyResponse", "ClassifyResult", "Client", "ConflictError", "Deleted",
    "DeltaRejectedError", "EmbedResponse", "GatewayTimeoutError", "GenerateResponse",
    "GenerateStream", "Health", "InternalServerError", "NotFoundError", "NotGiven",
    "PayloadTooLargeError", "PermissionDeniedError", "RateLimitError", "Ready", "RetryPolicy",
    "ScoreResponse", "ServiceUnavailableError", "StreamChunk", "TaskDeltaError", "TaskInfo",
    "TaskList", "Tasks", "UnprocessableEntityError", "Usage",
]
