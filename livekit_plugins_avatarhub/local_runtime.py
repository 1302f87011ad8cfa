"""Loading a model file into bitHuman's ``AsyncBithuman``, with its errors made actionable."""

from __future__ import annotations

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
        kwargs["output_size"] = output_size
    secrets = (api_secret, api_token)
    try:
        runtime: AvatarRuntime = await cls.create(**kwargs)
    except _compat.model_missing_errors() as err:
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
        raise RuntimeLoadError(f"bitHuman runtime refused {model_path.name}: {name}: {message}{hint}") from None
    except (RuntimeError, OSError) as err:
        message = scrub(str(err), *secrets)
        raise RuntimeLoadError(
            f"bitHuman runtime could not start with {model_path.name}: {message}. It needs "
            f"network access to bitHuman to authorise the secret"
        ) from None
    return runtime
