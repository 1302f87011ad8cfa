"""Loading a model file into bitHuman's ``AsyncBithuman``, with its errors made actionable."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from . import _compat
from .exceptions import (
    CLOUD_PLUGIN_HINT,
    MissingSecretError,
    ModelFileError,
    RuntimeLoadError,
)
from .log import logger
from .runtime import AvatarRuntime
from .settings import scrub


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

    Agent codes are resolved through ``ModelHub``. Use it to build a runtime once per worker
    process and hand it to ``AvatarSession(runtime=...)`` for every job. ``realtime=False``
    lets the demo avatar render faster than real time (offline rendering).
    """
    from .settings import AVATAR_ID_PATTERN, DEMO_AVATAR_ID, env_or

    if (avatar is None) == (model_path is None):
        from .exceptions import ConfigurationError

        raise ConfigurationError("pass an avatar ('demo', an agent code or a path) or model_path=")
    if avatar == DEMO_AVATAR_ID:
        from .demo import DemoRuntime

        return await DemoRuntime.create(output_size=output_size or (1280, 720), realtime=realtime)
    secret = env_or(api_secret, "BITHUMAN_API_SECRET", "BITHUMAN_API_KEY")
    if avatar is not None and AVATAR_ID_PATTERN.match(avatar):
        from .hub import ModelHub

        path = await ModelHub(api_secret=secret).resolve(avatar, model=model)
    else:
        path = await asyncio.to_thread(check_model_file, model_path or avatar or "")
    return await load_bithuman_runtime(
        path,
        api_secret=secret,
        api_token=env_or(api_token, "BITHUMAN_API_TOKEN"),
        api_url=env_or(None, "BITHUMAN_API_URL"),
        output_size=output_size,
    )
