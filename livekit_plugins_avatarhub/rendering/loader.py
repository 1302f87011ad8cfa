"""The one place an avatar source becomes a running runtime: ``"demo"``, an agent code, or a file.

Every caller (``AvatarSession``, the render command, the avatar service, ``create_runtime``)
goes through :func:`open_avatar`, so they agree on what a source means::

    "demo"                  the built-in demo avatar (no account, no file)
    an agent code           resolved by an AvatarResolver (default ModelHub: download + cache);
                            a cloud-only model name falls back to a local family (hub)
    a path (model_path=)    an .imx / .avatar file, checked before the runtime sees it

A model file is held with a shared lease while its runtime lives, so cache eviction in any
process skips it; :meth:`OpenedAvatar.aclose` frees the runtime and the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import _compat
from .._redact import scrub
from ..exceptions import (
    CLOUD_PLUGIN_HINT,
    ConfigurationError,
    MissingSecretError,
    ModelFileError,
    RuntimeLoadError,
)
from ..hub.cache import hold
from ..ids import is_agent_code, is_demo
from ..log import logger
from .runtime import AvatarRuntime
from .source import AvatarSource

if TYPE_CHECKING:
    from .._retry import RetryPolicy
    from ..hub.resolver import AvatarResolver


@dataclass
class OpenedAvatar:
    """A runtime, and the lease on the model file it renders (none for the demo)."""

    runtime: AvatarRuntime
    model_file: Path | None = None
    _lease: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    def release(self) -> None:
        """Let the cache evict the model file again (the runtime is left alone)."""
        self._lease.close()

    async def aclose(self) -> None:
        """Free the runtime, then the lease. Safe to call twice."""
        self.runtime.cleanup()
        self.release()


async def open_avatar(
    avatar_id: str | None = None,
    *,
    model_path: str | os.PathLike[str] | None = None,
    model: str | None = None,
    api_secret: str | None = None,
    api_token: str | None = None,
    api_url: str | None = None,
    output_size: tuple[int, int] | None = None,
    realtime: bool = True,
    resolver: AvatarResolver | None = None,
    retry: RetryPolicy | None = None,
    timeout: float = 30.0,
) -> OpenedAvatar:
    """Load ``avatar_id`` (``"demo"`` or an agent code) or ``model_path`` into a runtime.

    Fails, before anything is published, with this package's errors: a bad id, a missing
    secret, a model that cannot be fetched or read, or a runtime that refuses it.
    ``realtime=False`` lets the demo render faster than real time (offline rendering).
    """
    source = AvatarSource.decide(
        avatar_id,
        model_path=model_path,
        model=model,
        api_secret=api_secret,
        api_token=api_token,
        api_url=api_url,
        output_size=output_size,
    )
    return await open_source(
        source, realtime=realtime, resolver=resolver, retry=retry, timeout=timeout
    )


async def open_source(
    source: AvatarSource,
    *,
    realtime: bool = True,
    resolver: AvatarResolver | None = None,
    retry: RetryPolicy | None = None,
    timeout: float = 30.0,
) -> OpenedAvatar:
    """:func:`open_avatar` for a source already decided: nothing is checked or read again."""
    if source.is_demo:
        from .demo import DEFAULT_SIZE, DemoRuntime

        size = source.output_size or DEFAULT_SIZE
        return OpenedAvatar(await DemoRuntime.create(output_size=size, realtime=realtime))
    if source.avatar_id is not None:
        if resolver is None:
            from ..hub.resolver import ModelHub

            hub = ModelHub(api_secret=source.api_secret, retry=retry, timeout=timeout)
            path = await hub.fetch(source.avatar_id, source.model, source.family)
        else:
            path = await resolver.resolve(source.avatar_id, model=source.model)
    else:
        assert source.model_path is not None
        path = source.model_path
        if source.model:
            logger.debug("model=%r is ignored with model_path: the file decides", source.model)
    lease = contextlib.ExitStack()
    path = await asyncio.to_thread(_check_and_hold, path, lease)
    try:
        runtime = await load_bithuman_runtime(
            path,
            api_secret=source.api_secret,
            api_token=source.api_token,
            api_url=source.api_url,
            output_size=source.output_size,
        )
    except BaseException:
        lease.close()
        raise
    return OpenedAvatar(runtime, path, lease)


def split_source(
    avatar: str | os.PathLike[str],
) -> tuple[str | None, str | os.PathLike[str] | None]:
    """One word for an avatar, as on the command line: ``"demo"`` or an agent code is an id
    (``(id, None)``); anything else names a model file (``(None, path)``)."""
    if isinstance(avatar, str) and (is_demo(avatar) or is_agent_code(avatar)):
        return avatar, None
    return None, avatar


async def create_runtime(
    avatar: str | None = None,
    *,
    model_path: str | os.PathLike[str] | None = None,
    api_secret: str | None = None,
    api_token: str | None = None,
    model: str | None = None,
    output_size: tuple[int, int] | None = None,
    realtime: bool = True,
) -> AvatarRuntime:
    """A runtime for ``avatar`` (``"demo"``, an agent code, or a model path) or ``model_path``.

    Build one per worker process and hand it to ``AvatarSession(runtime=...)`` for every job.
    Its model file stays leased (never evicted from the cache) until ``runtime.cleanup()``, or
    until the runtime is garbage collected. Agent codes are resolved through ``ModelHub``.
    """
    if (avatar is None) == (model_path is None):
        raise ConfigurationError("pass an avatar ('demo', an agent code or a path) or model_path=")
    avatar_id, path = split_source(avatar) if avatar is not None else (None, model_path)
    opened = await open_avatar(
        avatar_id,
        model_path=path,
        model=model,
        api_secret=api_secret,
        api_token=api_token,
        output_size=output_size,
        realtime=realtime,
    )
    _lease_for_lifetime(opened)
    return opened.runtime


def _lease_for_lifetime(opened: OpenedAvatar) -> None:
    """Tie the lease to the runtime: ``runtime.cleanup()`` frees it, and so does garbage
    collection for a runtime dropped without one (or the process, for a runtime that takes no
    weak reference)."""
    runtime, release = opened.runtime, opened._lease.close
    try:  # the callbacks must not reference the runtime, or it would never be collected
        weakref.finalize(runtime, release)
        alive = weakref.ref(runtime)
    except TypeError:
        _PROCESS_LEASES.append(opened)
        return
    cleanup = getattr(type(runtime), "cleanup", None)
    if cleanup is None:
        return

    def cleanup_and_release() -> None:
        target = alive()
        try:
            if target is not None:
                cleanup(target)
        finally:
            release()

    with contextlib.suppress(AttributeError):  # a runtime with __slots__ keeps the GC rule
        runtime.cleanup = cleanup_and_release  # type: ignore[method-assign]


_PROCESS_LEASES: list[OpenedAvatar] = []


def _check_and_hold(path: Path, lease: contextlib.ExitStack) -> Path:
    """Check the file (blocking: run in a thread), then take its lease into ``lease``."""
    model = check_model_file(path)
    lease.enter_context(hold(model))
    return model


def check_model_file(path: str | os.PathLike[str]) -> Path:
    """Fail early, naming the file, when a model cannot be read (blocking: run in a thread)."""
    model = Path(path).expanduser()
    if not model.exists():
        raise ModelFileError(
            f"model file {model} does not exist; fix model_path / BITHUMAN_MODEL_PATH, or pass "
            f"avatar_id= to download the model"
        )
    if not model.is_file():
        raise ModelFileError(f"model path {model} is not a file")
    if model.stat().st_size == 0:
        raise ModelFileError(
            f"model file {model} is empty (0 bytes); an interrupted copy or download leaves "
            "this: fetch the model again"
        )
    try:
        with model.open("rb") as f:
            f.read(1)
    except OSError as err:
        raise ModelFileError(f"model file {model} cannot be read: {err.strerror or err}") from err
    return model


async def load_bithuman_runtime(
    model_path: Path,
    *,
    api_secret: str | None,
    api_token: str | None,
    api_url: str | None,
    output_size: tuple[int, int] | None = None,
) -> AvatarRuntime:
    """``AsyncBithuman.create`` with every failure mapped into this package's hierarchy."""
    cls = _compat.bithuman_runtime_class()
    kwargs: dict[str, Any] = {"model_path": str(model_path)}
    if api_secret:
        kwargs["api_secret"] = api_secret
    if api_token:
        kwargs["token"] = api_token
    if api_url:
        kwargs["api_url"] = api_url
    if output_size is not None:
        if _compat.runtime_accepts_output_size():
            kwargs["output_size"] = output_size
        else:
            logger.warning(
                "bithuman %s renders at the model's own size; output_size is ignored",
                ".".join(map(str, _compat.BITHUMAN_VERSION)),
            )
    secrets = (api_secret, api_token)
    try:
        runtime: AvatarRuntime = await cls.create(**kwargs)
    except _compat.model_missing_errors():
        raise ModelFileError(f"model file {model_path} was not found by the runtime") from None
    except _compat.bithuman_errors() as err:
        name = type(err).__name__
        message = scrub(str(err), *secrets)
        if not api_secret and "secret" in message.lower():
            raise MissingSecretError(
                "the bitHuman runtime needs an API secret: pass api_secret= or set "
                "BITHUMAN_API_SECRET (an api_token alone is refused by bithuman 2.x)"
            ) from None
        hint = ""
        if "expression" in message.lower() and "cloud" in message.lower():
            hint = f"; {CLOUD_PLUGIN_HINT}"
        raise RuntimeLoadError(
            f"bitHuman runtime refused {model_path.name}: {name}: {message}{hint}"
        ) from None
    except ValueError as err:
        message = scrub(str(err), *secrets)
        if "token or api_secret" in message:
            raise MissingSecretError(
                "the bitHuman runtime needs an API secret: pass api_secret= or set "
                "BITHUMAN_API_SECRET"
            ) from None
        raise RuntimeLoadError(f"bitHuman runtime refused {model_path.name}: {message}") from None
    except (RuntimeError, OSError) as err:
        message = scrub(str(err), *secrets)
        network = any(
            w in message.lower() for w in ("curl", "resolve", "connect", "token", "network")
        )
        hint = ". It needs network access to bitHuman to authorise the secret" if network else ""
        raise RuntimeLoadError(
            f"bitHuman runtime could not start with {model_path.name}: {message}{hint}"
        ) from None
    return runtime
