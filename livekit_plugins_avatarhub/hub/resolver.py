"""``ModelHub``: an avatar id in, a verified local model file out.

The decision, in order:

1. offline (argument or ``AVATARHUB_OFFLINE=1``): the cached model, or NotCachedError; no network.
2. a cached model validated less than ``fresh_for`` seconds ago: used without any request.
3. under a cross-process lock, ask the API for the download link. If the service cannot be
   reached, a cached model is used with a warning.
4. a cached file that still matches (same sha256, or same size and ETag at the storage host)
   is kept; otherwise the file is downloaded, verified and moved into place.
5. least-recently-used models beyond ``BITHUMAN_AVATAR_CACHE_GB`` are evicted.

Anything that turns ids into files is an :class:`AvatarResolver`; ``ModelHub`` is the one this
package ships, and ``CachedModelResolver`` is the same hub with the network switched off.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path
from typing import Protocol, runtime_checkable

from filelock import FileLock
from filelock import Timeout as FileLockTimeout

from .._retry import RetryPolicy
from ..api import BithumanAPI, ModelDownload
from ..config import api_deadline, download_rate_rule, max_cache_bytes, offline_mode
from ..config import fresh_for as fresh_for_setting
from ..exceptions import (
    CLOUD_PLUGIN_HINT,
    APIConnectionError,
    CloudOnlyError,
    LockTimeoutError,
    NotCachedError,
    RateLimitedError,
    ServiceUnavailableError,
)
from ..ids import (
    DOWNLOADABLE_FAMILIES,
    download_family,
    is_cloud_only,
    validate_avatar_id,
)
from ..log import logger
from .cache import ModelCache, ModelRecord
from .download import (
    Downloaded,
    Progress,
    RateRule,
    Storage,
    download,
    probe,
    public_location,
    storage_client,
)

DEFAULT_LOCK_TIMEOUT = 30 * 60.0
# when an agent's cloud-only model is asked for, what to render locally instead, best first
_CLOUD_FALLBACK = ("expression-2", "essence-2", "essence-1")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
_UNREACHABLE = (APIConnectionError, ServiceUnavailableError, RateLimitedError)


def safe_filename(name: str | None, code: str, family: str | None) -> str:
    """A server-given filename reduced to a plain, visible base name with a model extension.

    Made safe after truncation, so a long name of dots cannot become a hidden file the cache
    never finds; anything unusable gives the SDK's default name.
    """
    default = f"{code}.lebundle.imx" if family == "essence-2" else f"{code}.imx"
    if not name:
        return default
    base = _SAFE_NAME.sub("_", name.replace("\\", "/").rsplit("/", 1)[-1])
    if not base.endswith((".imx", ".avatar")):
        base += ".imx"
    base = base[-200:].lstrip(".")
    stem = base.rsplit(".", 1)[0]
    if not stem.strip("._-") or stem in ("imx", "avatar", "lebundle"):
        return default
    return base


@runtime_checkable
class AvatarResolver(Protocol):
    """Turns an avatar id into a local model file; ``AvatarSession(resolver=...)`` takes one."""

    async def resolve(self, avatar_id: str, *, model: str | None = None) -> Path:
        """Return the path of a model file for ``avatar_id`` (optionally of ``model``'s family)."""
        ...


class ModelHub:
    """Resolves bitHuman avatar ids to cached model files (an ``AvatarResolver``).

    Safe to use from many processes at once: one downloads while the others wait on the lock
    and then find the file in the cache.
    """

    def __init__(
        self,
        *,
        api_secret: str | None = None,
        api_base: str | None = None,
        cache_dir: str | os.PathLike[str] | ModelCache | None = None,
        offline: bool | None = None,
        fresh_for: float | None = None,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
        progress: Progress | None = None,
        deadline: float | None = None,
        rate_rule: RateRule | None = None,
    ) -> None:
        self.cache = cache_dir if isinstance(cache_dir, ModelCache) else ModelCache(cache_dir)
        self.offline = offline_mode(offline)
        self.fresh_for = fresh_for_setting(fresh_for)
        self.lock_timeout = lock_timeout
        self.retry = retry or RetryPolicy()
        self._timeout = timeout
        self._deadline = api_deadline(deadline)
        self._rule = rate_rule or RateRule(*download_rate_rule())
        self._progress = progress
        self._api_secret = api_secret
        self._api_base = api_base
        self.requests = 0  # API calls and downloads made, for diagnostics and benchmarks

    def __repr__(self) -> str:
        return f"ModelHub(cache={self.cache.root}, offline={self.offline})"

    async def resolve(self, avatar_id: str, *, model: str | None = None) -> Path:
        code = validate_avatar_id(avatar_id)
        return await self.fetch(code, model, download_family(model))

    async def fetch(self, code: str, model: str | None, family: str | None) -> Path:
        """:meth:`resolve` for an agent code and model already checked (``AvatarSource``):
        ``family`` is the model's family, None for the agent's own or a cloud-only ``model``."""
        cached = await asyncio.to_thread(self.cache.find, code, family)
        if self.offline:
            if cached is None:
                wanted = f" ({family})" if family else ""
                raise NotCachedError(
                    f"avatar {code}{wanted} is not in the cache {self.cache.agent_dir(code)} and "
                    "offline mode is on (AVATARHUB_OFFLINE, or a cache-only resolver); run "
                    f"`python -m livekit_plugins_avatarhub pull {code}` with BITHUMAN_API_SECRET "
                    "set on a connected machine, or point BITHUMAN_CACHE_DIR at a cache that has it"
                )
            return await self._use(code, cached)
        if cached is not None and self._is_fresh(code, cached):
            return await self._use(code, cached)

        await asyncio.to_thread(self.cache.ensure_dirs, code)
        async with _locked(self.cache.lock_path(code), self.lock_timeout, code):
            # another process may have fetched it while we waited
            cached = await asyncio.to_thread(self.cache.find, code, family)
            if cached is not None and self._is_fresh(code, cached):
                return await self._use(code, cached)
            try:
                path = await self._fetch(code, model, family, cached)
            except _UNREACHABLE as err:
                if cached is None:
                    raise
                logger.warning(
                    "bitHuman is unreachable (%s); using the cached model %s", err, cached
                )
                return await self._use(code, cached)
        return await self._use(code, path)

    def _is_fresh(self, code: str, path: Path) -> bool:
        record = self.cache.read_record(code, path.name)
        if record is None or record.validated_at is None:
            # pulled by the bithuman SDK: trust it for the window, counted from its mtime
            checked = path.stat().st_mtime
        else:
            checked = record.validated_at
        return time.time() - checked < self.fresh_for

    async def _use(self, code: str, path: Path) -> Path:
        await asyncio.to_thread(self.cache.touch, code, path.name)
        return path

    async def _fetch(
        self, code: str, model: str | None, family: str | None, cached: Path | None
    ) -> Path:
        async with BithumanAPI(
            api_secret=self._api_secret,
            api_base=self._api_base,
            timeout=self._timeout,
            retry=self.retry,
            deadline=self._deadline,
        ) as api:
            if is_cloud_only(model):
                family = await self._local_family_for(api, code, model or "")
            self.requests += 1
            info = await api.model_download(code, family)
            return await self._store(api, code, family, info, cached)

    async def _store(
        self,
        api: BithumanAPI,
        code: str,
        family: str | None,
        info: ModelDownload,
        cached: Path | None,
    ) -> Path:
        asked = family
        family = _family_of(info, family)
        filename = safe_filename(info.filename, code, family)
        target = self.cache.agent_dir(code) / filename
        # we hold the lock: partial files left here are from a process that died mid-download
        await asyncio.to_thread(self.cache.remove_partials, code)

        async def fresh_link() -> str:
            """The pre-signed link expired mid-download: ask the API for another."""
            self.requests += 1
            return (await api.model_download(code, asked)).url

        # the storage host never sees the API secret: a separate client with no credentials
        async with storage_client(self._timeout, self._rule) as storage:
            existing = target if target.exists() else None
            if existing is not None and await self._still_current(storage, code, existing, info):
                return existing
            self.requests += 1
            logger.info("downloading avatar %s (%s) to %s", code, family or "default model", target)
            result = await download(
                storage,
                info.url,
                target,
                sha256=info.sha256,
                retry=self.retry,
                progress=self._progress or _log_progress(code),
                refresh=fresh_link,
                rule=self._rule,
            )
        await asyncio.to_thread(self._record, code, family, info, result)
        evicted = await asyncio.to_thread(self.cache.evict, max_cache_bytes(), keep=target)
        if evicted:
            logger.info(
                "evicted %d cached models to stay under BITHUMAN_AVATAR_CACHE_GB", len(evicted)
            )
        if cached is not None and cached != target:
            logger.info("avatar %s now resolves to %s (was %s)", code, target.name, cached.name)
        return target

    async def _still_current(
        self, storage: Storage, code: str, path: Path, info: ModelDownload
    ) -> bool:
        record = await asyncio.to_thread(self.cache.read_record, code, path.name)
        size = (await asyncio.to_thread(path.stat)).st_size
        current = False
        if info.sha256 and record is not None and record.sha256 == info.sha256:
            current = record.size is None or size == record.size
        elif not info.sha256:
            self.requests += 1
            remote = await probe(storage, info.url)
            same_size = remote.size is not None and remote.size == size
            same_tag = record is None or record.etag is None or remote.etag in (None, record.etag)
            current = same_size and same_tag
        if current:
            rec = record or ModelRecord(code, path.name)
            rec.validated_at = time.time()
            rec.size = size
            await asyncio.to_thread(self.cache.write_record, rec)
        return current

    def _record(
        self, code: str, family: str | None, info: ModelDownload, result: Downloaded
    ) -> None:
        now = time.time()
        self.cache.write_record(
            ModelRecord(
                code=code,
                filename=result.path.name,
                model=family,
                size=result.size,
                sha256=result.sha256,
                etag=result.etag,
                last_modified=result.last_modified,
                source=public_location(info.url),
                fetched_at=now,
                validated_at=now,
                last_used=now,
            )
        )

    async def _local_family_for(self, api: BithumanAPI, code: str, model: str) -> str:
        """Pick a downloadable family for an agent asked for as a cloud-only model."""
        self.requests += 1
        agent = await api.get_agent(code)
        supported = [str(m).lower() for m in agent.get("supported_models") or []]
        own = str(agent.get("model") or "").lower()
        candidates = supported or ([own] if own else [])
        for family in _CLOUD_FALLBACK:
            if any(family == c or (family == "essence-1" and c == "essence") for c in candidates):
                logger.warning(
                    "model %r renders only in bitHuman's cloud; avatar %s will render locally "
                    "as %s, a model it supports (supported: %s)",
                    model,
                    code,
                    family,
                    ", ".join(candidates),
                )
                return family
        raise CloudOnlyError(
            f"avatar {code} is available only as {', '.join(candidates) or model!r}, which renders "
            f"only in bitHuman's cloud; {CLOUD_PLUGIN_HINT}"
        )


class CachedModelResolver(ModelHub):
    """A :class:`ModelHub` that never uses the network: ids resolve to what is already cached.

    Models it hands out are marked as used, so the cache's LRU eviction sees them as live.
    """

    def __init__(self, cache: ModelCache | None = None, **options: object) -> None:
        super().__init__(cache_dir=cache, offline=True, **options)  # type: ignore[arg-type]


def _family_of(info: ModelDownload, asked: str | None) -> str | None:
    if info.model and info.model.lower() in DOWNLOADABLE_FAMILIES:
        return info.model.lower()
    if info.model and info.model.lower() == "essence":
        return "essence-1"
    return asked


def _log_progress(code: str) -> Progress:
    last = [-1]

    def report(done: int, total: int | None) -> None:
        if not total:
            return
        tenth = done * 10 // total
        if tenth != last[0]:
            last[0] = tenth
            logger.info("avatar %s: %d%% of %d MB", code, tenth * 10, total >> 20)

    return report


class _locked:
    """Async context around a cross-process FileLock, acquired on a worker thread.

    Waiting logs a line every ``notice`` seconds; after ``timeout`` it raises LockTimeoutError.
    """

    def __init__(self, path: Path, timeout: float, code: str, notice: float = 10.0) -> None:
        # a fresh, non-thread-local lock per use: flock then excludes other coroutines and
        # threads of this process as well as other processes
        self._lock = FileLock(str(path), thread_local=False)
        self._timeout, self._code, self._notice = timeout, code, notice

    async def __aenter__(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            try:
                await asyncio.to_thread(
                    self._lock.acquire, timeout=min(self._notice, self._timeout)
                )
                return
            except FileLockTimeout:
                waited = loop.time() - start
                if waited >= self._timeout:
                    raise LockTimeoutError(
                        f"waited {waited:.0f}s for another process downloading avatar "
                        f"{self._code} ({self._lock.lock_file}); if no download is running, "
                        "delete that lock file"
                    ) from None
                logger.info(
                    "still waiting for another process to download avatar %s (%.0fs)",
                    self._code,
                    waited,
                )

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self._lock.release)


def prefetch(*avatar_ids: str, model: str | None = None, **hub_options: object) -> list[Path]:
    """Resolve avatars from synchronous code, such as a LiveKit ``prewarm_fnc``.

    Returns the model paths in the order given. Runs its own event loop (on a helper thread
    when one is already running in this thread).
    """
    hub = ModelHub(**hub_options)  # type: ignore[arg-type]

    async def resolve_all() -> list[Path]:
        return [await hub.resolve(avatar_id, model=model) for avatar_id in avatar_ids]

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(resolve_all())
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, resolve_all()).result()
