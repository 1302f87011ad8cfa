"""``from livekit.plugins import avatarhub``: the same package as ``livekit_plugins_avatarhub``."""

from typing import Any

import livekit_plugins_avatarhub as _hub
from livekit_plugins_avatarhub import (
    APIConnectionError,
    APIError,
    APIStatusError,
    AuthenticationError,
    AvatarHubError,
    AvatarNotFoundError,
    AvatarResolver,
    AvatarRuntime,
    AvatarSession,
    CacheError,
    CachedModelResolver,
    CloudOnlyError,
    ConfigurationError,
    DEMO_AVATAR_ID,
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
    VideoPublishOptions,
    __version__,
)
from livekit_plugins_avatarhub import __all__ as __all__


def __getattr__(name: str) -> Any:
    # VideoControl and DemoRuntime load on first use, as in livekit_plugins_avatarhub
    return getattr(_hub, name)
