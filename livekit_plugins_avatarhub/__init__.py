"""bitHuman avatars for LiveKit Agents, rendered on the local runtime.

``AvatarSession`` takes the arguments of bitHuman's cloud interface and of
``livekit-plugins-bithuman``; an ``avatar_id`` is downloaded and cached on first use.
``bithuman`` itself is imported only when a session starts.
"""

# ruff: noqa: F401  (the errors are re-exported through exceptions.__all__, which ruff cannot read)
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from livekit.agents import Plugin

from . import exceptions as _exceptions
from ._redact import install_log_filter
from ._retry import RetryPolicy
from .api import BithumanAPI
from .avatar import AvatarSession
from .exceptions import (
    AgentGenerationFailedError,
    AgentNotReadyError,
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    AvatarHubError,
    AvatarNotFoundError,
    BitHumanException,
    CacheError,
    CapacityError,
    CloudOnlyError,
    ConfigurationError,
    InsufficientBalanceError,
    IntegrityError,
    InvalidAvatarIdError,
    LockTimeoutError,
    MissingSecretError,
    ModelFileError,
    ModelNotDownloadableError,
    ModelNotReadyError,
    NotCachedError,
    RateLimitedError,
    RuntimeLoadError,
    ServiceUnavailableError,
)
from .gestures import GestureTrigger
from .hub.resolver import AvatarResolver, CachedModelResolver, ModelHub, prefetch
from .ids import DEMO_AVATAR_ID
from .log import logger
from .rendering.failover import AvatarState, AvatarStateChanged
from .rendering.loader import OpenedAvatar, create_runtime, open_avatar
from .rendering.publish import VideoPublishOptions
from .rendering.runtime import AvatarRuntime
from .version import __version__

if TYPE_CHECKING:
    from bithuman import VideoControl

    from .rendering.demo import DemoRuntime

__all__ = [
    "DEMO_AVATAR_ID",
    "AvatarResolver",
    "AvatarRuntime",
    "AvatarSession",
    "AvatarState",
    "AvatarStateChanged",
    "BithumanAPI",
    "CachedModelResolver",
    "DemoRuntime",
    "GestureTrigger",
    "ModelHub",
    "OpenedAvatar",
    "RetryPolicy",
    "VideoControl",
    "VideoPublishOptions",
    "__version__",
    "create_runtime",
    "open_avatar",
    "prefetch",
    # every error, as listed (derived) by the exceptions module
    *_exceptions.__all__,
]

# Loaded on first access, so `import livekit_plugins_avatarhub` stays free of bithuman (~50 MB).
_LAZY = {
    "VideoControl": ("bithuman", "VideoControl"),
    "DemoRuntime": ("livekit_plugins_avatarhub.rendering.demo", "DemoRuntime"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


install_log_filter()  # no log line of the HTTP libraries shows a signed URL's query


class AvatarHubPlugin(Plugin):
    def __init__(self) -> None:
        super().__init__(__name__, __version__, __package__, logger)


Plugin.register_plugin(AvatarHubPlugin())
