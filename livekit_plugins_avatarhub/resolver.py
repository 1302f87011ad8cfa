"""Turning an avatar id into a local model file.

``AvatarSession`` asks an :class:`AvatarResolver`; :class:`CachedModelResolver` only looks in the
cache, while ``ModelHub`` (see ``hub.py``) also downloads from bitHuman.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Protocol, runtime_checkable

from .cache import ModelCache
from .exceptions import NotCachedError
from .settings import model_family, validate_avatar_id


@runtime_checkable
class AvatarResolver(Protocol):
    async def resolve(self, avatar_id: str, *, model: str | None = None) -> Path:
        """Return the path of a model file for ``avatar_id`` (optionally of ``model``'s family)."""
        ...


class CachedModelResolver:
    """Resolves ids to models already in the cache; never uses the network."""

    def __init__(self, cache: ModelCache | None = None) -> None:
        self.cache = cache or ModelCache()

    async def resolve(self, avatar_id: str, *, model: str | None = None) -> Path:
        code = validate_avatar_id(avatar_id)
        family = model_family(model)
        path = await asyncio.to_thread(self.cache.find, code, family)
        if path is None:
            wanted = f" ({family})" if family else ""
            raise NotCachedError(
                f"avatar {code}{wanted} is not in the cache {self.cache.agent_dir(code)}; "
                f"run `python -m livekit_plugins_avatarhub pull {code}` with BITHUMAN_API_SECRET "
                f"set, or point BITHUMAN_CACHE_DIR at a cache that has it"
            )
        return path
