"""``GET /ready``: can this service take a join right now?

``/health`` says the process is alive; ``/ready`` says a join would work, so a load balancer
or Kubernetes sends joins only where they can start. Four checks, each with a reason:

* LiveKit: the service's own credentials (``LIVEKIT_URL`` / ``LIVEKIT_API_KEY`` /
  ``LIVEKIT_API_SECRET``) reach the server and are accepted (one RoomService call, remembered
  for a few seconds so probes do not load the server). ``serve --dispatch`` cannot work
  without them; the join-room flow works without them (each join brings its room token).
* the model cache is writable (a download would land);
* the bitHuman runtime imports (not needed with ``--dispatch``: the workers render);
* a free avatar slot.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from ..config import LIVEKIT_VARIABLES, livekit_settings

#: seconds a LiveKit answer is reused
LIVEKIT_CHECK_TTL = 10.0


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str


class Readiness:
    def __init__(self, manager: Any, *, dispatch: bool, cache_root: Any = None) -> None:
        self._manager = manager
        self._dispatch = dispatch
        self._cache_root = cache_root
        self._livekit: tuple[float, Check] | None = None
        self._runtime: Check | None = None
        self._lock = asyncio.Lock()

    async def checks(self) -> dict[str, Check]:
        livekit, cache, runtime = await asyncio.gather(
            self._check_livekit(), asyncio.to_thread(self._check_cache), self._check_runtime()
        )
        return {"livekit": livekit, "cache": cache, "runtime": runtime, "capacity": self._slot()}

    async def _check_livekit(self) -> Check:
        async with self._lock:  # one RoomService call at a time, however many probes
            if self._livekit and time.monotonic() - self._livekit[0] < LIVEKIT_CHECK_TTL:
                return self._livekit[1]
            check = await _livekit_answers()
            if check is None:
                check = (
                    Check(False, f"--dispatch needs {', '.join(LIVEKIT_VARIABLES)}")
                    if self._dispatch
                    else Check(True, "no LiveKit credentials: each join brings its room token")
                )
            self._livekit = (time.monotonic(), check)
            return check

    def _check_cache(self) -> Check:
        from ..hub.cache import ModelCache

        root = ModelCache(self._cache_root).root
        try:
            os.makedirs(root, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=root, prefix=".ready-", delete=True):
                pass
        except OSError as err:
            return Check(False, f"the model cache {root} is not writable: {err.strerror or err}")
        return Check(True, f"writable ({root})")

    async def _check_runtime(self) -> Check:
        if self._dispatch:
            return Check(True, "not needed: the avatar workers render")
        if self._runtime is None:  # importing is slow and its answer does not change
            self._runtime = await asyncio.to_thread(_runtime_imports)
        return self._runtime

    def _slot(self) -> Check:
        if self._dispatch:
            return Check(True, "the avatar workers' (LiveKit dispatch)")
        active, most = self._manager.active(), self._manager.max_workers
        if active >= most:
            return Check(False, f"all {most} avatar slots are busy")
        return Check(True, f"{most - active} of {most} avatar slots free")


async def _livekit_answers() -> Check | None:
    """None without credentials; else whether ListRooms works with them."""
    from ..remote.server_api import check_livekit_keys

    url, key, secret = livekit_settings()
    if not (url and key and secret):
        return None
    try:
        await check_livekit_keys(url, key, secret)
    except Exception as err:
        return Check(False, str(err))
    return Check(True, f"LiveKit at {url} accepts the service's keys")


def _runtime_imports() -> Check:
    try:
        module = importlib.import_module("bithuman")
    except Exception as err:  # ImportError, or a native library that fails to load
        return Check(False, f"the bitHuman runtime does not import: {type(err).__name__}: {err}")
    return Check(True, f"bithuman {getattr(module, '__version__', '')}".strip())
