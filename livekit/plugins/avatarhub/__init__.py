"""``from livekit.plugins import avatarhub``: the same package as ``livekit_plugins_avatarhub``."""
# ruff: noqa: F401  (every name here is re-exported through __all__)

from typing import Any

import livekit_plugins_avatarhub as _hub
from livekit_plugins_avatarhub import (
    DEMO_AVATAR_ID,
    AgentGenerationFailedError,
    AgentNotReadyError,
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    AvatarHubError,
    AvatarNotFoundError,
    AvatarResolver,
    AvatarRuntime,
    AvatarSession,
    BithumanAPI,
    BitHumanException,
    CachedModelResolver,
    CacheError,
    CloudOnlyError,
    ConfigurationError,
    GestureTrigger,
    InsufficientBalanceError,
    IntegrityError,
    InvalidAvatarIdError,
    LockTimeoutError,
    MissingSecretError,
    ModelFileError,
    ModelHub,
    ModelNotDownloadableError,
    ModelNotReadyError,
    NotCachedError,
    OpenedAvatar,
    RateLimitedError,
    RetryPolicy,
    RuntimeLoadError,
    ServiceUnavailableError,
    VideoPublishOptions,
    __version__,
    create_runtime,
    open_avatar,
    prefetch,
)
from livekit_plugins_avatarhub import __all__ as __all__


def __getattr__(name: str) -> Any:
    # VideoControl and DemoRuntime load on first use, as in livekit_plugins_avatarhub
    return getattr(_hub, name)
