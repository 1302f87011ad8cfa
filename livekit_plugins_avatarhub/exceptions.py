"""Every error this package raises, rooted in :class:`AvatarHubError`.

Several also subclass a builtin, and the API errors LiveKit's own, so that generic handlers
(``except ValueError``, ``except livekit.agents.APIConnectionError``) keep working.
``BitHumanException`` is another name for the root, for code written for livekit-plugins-bithuman::

    AvatarHubError
    ├── ConfigurationError (ValueError)        bad or missing argument / environment variable
    │   ├── MissingSecretError                 no api_secret / BITHUMAN_API_SECRET
    │   ├── InvalidAvatarIdError               not ^[A-Z][A-Z0-9]{9}$
    │   └── CloudOnlyError                     only bitHuman's cloud renders it (avatar_image, ...)
    ├── ModelFileError (FileNotFoundError)     model file missing or unreadable
    ├── NotCachedError (FileNotFoundError)     offline and the avatar was never pulled
    ├── RuntimeLoadError (RuntimeError)        the avatar runtime refused to start
    ├── CacheError (OSError)                   the cache cannot be written (disk full, read-only)
    ├── LockTimeoutError (TimeoutError)        another process held the download lock too long
    ├── IntegrityError                         downloaded bytes do not match size / sha256
    ├── AgentGenerationFailedError             an agent build ended in ``failed``
    ├── AgentNotReadyError (TimeoutError)      an agent was still building when the wait ended
    ├── CapacityError                          no room for another avatar now (retry_after)
    └── APIError (livekit.agents.APIError)     talking to the bitHuman REST API failed
        ├── APIConnectionError (livekit.agents.APIConnectionError, ConnectionError)
        │   └── APITimeoutError (TimeoutError)  past the API deadline, or a stalled download
        └── APIStatusError (livekit.agents.APIStatusError)  an error status
            ├── AuthenticationError            401 / 403
            ├── AvatarNotFoundError            404 NOT_FOUND
            ├── ModelNotReadyError             404 MODEL_ARTIFACT_NOT_READY (try again later)
            ├── ModelNotDownloadableError      400 MODEL_NOT_DOWNLOADABLE / 409 MODEL_NOT_GENERATED
            ├── InsufficientBalanceError       402
            ├── RateLimitedError               429
            └── ServiceUnavailableError        5xx
"""

from __future__ import annotations

from livekit.agents import APIConnectionError as _LiveKitConnectionError
from livekit.agents import APIError as _LiveKitAPIError
from livekit.agents import APIStatusError as _LiveKitStatusError
from livekit.agents import APITimeoutError as _LiveKitTimeoutError

CLOUD_PLUGIN_HINT = (
    "bitHuman's cloud renders it: use `from livekit.plugins import bithuman` "
    "(pip install livekit-plugins-bithuman) with the same arguments"
)


class AvatarHubError(Exception):
    """Base class of every error raised by livekit-plugins-avatarhub."""


#: what code written for livekit-plugins-bithuman catches: ``except bithuman.BitHumanException``
BitHumanException = AvatarHubError


class ConfigurationError(AvatarHubError, ValueError):
    """An argument or environment variable is missing or invalid."""


class MissingSecretError(ConfigurationError):
    """No bitHuman API secret was given."""


class InvalidAvatarIdError(ConfigurationError):
    """An avatar id is not a bitHuman agent code."""


class CloudOnlyError(ConfigurationError):
    """What was asked for exists only in bitHuman's cloud and cannot render locally."""


class ModelFileError(AvatarHubError, FileNotFoundError):
    """A model file is missing or cannot be read."""


class NotCachedError(AvatarHubError, FileNotFoundError):
    """Offline mode is on and the avatar is not in the local cache."""


class RuntimeLoadError(AvatarHubError, RuntimeError):
    """The avatar runtime could not be created from the model."""


class CacheError(AvatarHubError, OSError):
    """The model cache cannot be written (disk full, read-only, permissions)."""


class LockTimeoutError(AvatarHubError, TimeoutError):
    """Another process held an avatar's download lock for longer than the timeout."""


class IntegrityError(AvatarHubError):
    """Downloaded bytes do not match the size or sha256 the service announced."""


class APIError(AvatarHubError, _LiveKitAPIError):
    """A call to the bitHuman REST API failed (also a ``livekit.agents.APIError``)."""

    def __init__(
        self, message: str, *, body: object | None = None, retryable: bool = False
    ) -> None:
        # LiveKit's own __init__, named: the cooperative chain differs between our subclasses
        _LiveKitAPIError.__init__(self, message, body=body, retryable=retryable)

    def __str__(self) -> str:
        return self.message


class APIConnectionError(APIError, _LiveKitConnectionError, ConnectionError):
    """The bitHuman API (or the model storage host) could not be reached."""

    def __init__(self, message: str = "Connection error.", *, retryable: bool = True) -> None:
        APIError.__init__(self, message, retryable=retryable)


class APITimeoutError(APIConnectionError, _LiveKitTimeoutError, TimeoutError):
    """bitHuman's API took longer than its deadline, or a download fell below the minimum rate."""

    def __init__(self, message: str = "Request timed out.", *, retryable: bool = False) -> None:
        APIError.__init__(self, message, retryable=retryable)


class APIStatusError(APIError, _LiveKitStatusError):
    """The bitHuman API answered with an error status; only 408, 429 and 5xx are retryable."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        code: str | None = None,
        reason: str | None = None,
        retry_after: float | None = None,
        body: object | None = None,
    ) -> None:
        retryable = status_code in (408, 429) or status_code >= 500
        APIError.__init__(self, message, body=body, retryable=retryable)
        self.status_code = status_code
        self.request_id: str | None = None
        self.code = code
        self.reason = reason
        self.retry_after = retry_after


class AuthenticationError(APIStatusError):
    """The API secret is missing, wrong or not allowed to do this (401/403)."""


class AvatarNotFoundError(APIStatusError):
    """No agent with this code exists in the account (404)."""


class ModelNotReadyError(APIStatusError):
    """The model is still being built; try again later."""


class ModelNotDownloadableError(APIStatusError, CloudOnlyError):
    """The model cannot be downloaded (cloud-only family, or never generated)."""


class InsufficientBalanceError(APIStatusError):
    """The account has no credits left for this operation (402)."""


class RateLimitedError(APIStatusError):
    """Too many requests (429); retry_after says when to try again."""


class ServiceUnavailableError(APIStatusError):
    """The bitHuman API failed on its side (5xx)."""


class AgentGenerationFailedError(AvatarHubError):
    """An agent build ended in the ``failed`` state."""


class AgentNotReadyError(AvatarHubError, TimeoutError):
    """An agent was still being built when the wait timed out."""


class CapacityError(AvatarHubError):
    """No room for another avatar now: every slot of ``serve`` is taken, or no avatar worker
    took the dispatched job (none registered under the agent name, or every one full).
    ``retry_after`` says, in seconds, when asking again may succeed."""

    def __init__(self, message: str, *, retry_after: float = 30.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


#: every exception class above (and the ``BitHumanException`` alias), derived rather than listed
__all__ = sorted(
    name
    for name, value in list(vars().items())
    if isinstance(value, type) and issubclass(value, BaseException) and not name.startswith("_")
)
