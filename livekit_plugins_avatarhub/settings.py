"""Argument → environment variable → default, and the names bitHuman gives things.

Every option that has an environment fallback is resolved here, so the precedence
(explicit argument always wins) is written once.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .exceptions import CLOUD_PLUGIN_HINT, CloudOnlyError, ConfigurationError, InvalidAvatarIdError

DEFAULT_API_BASE = "https://api.bithuman.ai"
DEMO_AVATAR_ID = "demo"

AVATAR_ID_PATTERN = re.compile(r"^[A-Z][A-Z0-9]{9}$")

# bitHuman's spelling → the family the download API expects. None: cloud-only.
_MODEL_FAMILIES: dict[str, str | None] = {
    "essence": "essence-1",
    "essence-1": "essence-1",
    "essence-2": "essence-2",
    "expression-2": "expression-2",
    "expression": None,
    "expression-1": None,
    "essence-2-max": None,
}
DOWNLOADABLE_FAMILIES = ("essence-1", "essence-2", "expression-2")


def env_or(value: Any, *names: str) -> str | None:
    """``value`` when it is given (not NOT_GIVEN/None/""), else the first set variable."""
    if isinstance(value, str) and value:
        return value
    for name in names:
        found = os.environ.get(name)
        if found:
            return found
    return None


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def api_base(value: str | None = None) -> str:
    """The REST base: argument, ``BITHUMAN_API_BASE``, then the public API.

    ``BITHUMAN_API_URL`` is deliberately not read: LiveKit's bithuman plugin uses it for the
    full runtime-token URL, which is not a REST base.
    """
    base = env_or(value, "BITHUMAN_API_BASE") or DEFAULT_API_BASE
    base = base.rstrip("/")
    if not base.startswith(("https://", "http://")):
        raise ConfigurationError(
            f"API base {base!r} is not an http(s) URL; fix the argument or BITHUMAN_API_BASE"
        )
    return base


def cache_root(value: str | os.PathLike[str] | None = None) -> Path:
    """Shared with the bithuman SDK: ``${BITHUMAN_CACHE_DIR:-~/.cache/bithuman}``."""
    raw = os.fspath(value) if value else os.environ.get("BITHUMAN_CACHE_DIR")
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "bithuman"


def validate_avatar_id(code: str) -> str:
    if not isinstance(code, str) or not AVATAR_ID_PATTERN.match(code):
        raise InvalidAvatarIdError(
            f"avatar id {code!r} is not a bitHuman agent code (10 characters, an upper-case "
            f"letter then upper-case letters or digits, e.g. 'A91XMB7113'); "
            f"use {DEMO_AVATAR_ID!r} for the built-in demo avatar"
        )
    return code


def model_family(model: str | None) -> str | None:
    """Map a model name to its downloadable family; None means "the agent's own model".

    Raises CloudOnlyError for names that only bitHuman's cloud renders; callers that can fall
    back to another family check :func:`is_cloud_only` first.
    """
    if model is None or model == "":
        return None
    key = model.strip().lower()
    if key not in _MODEL_FAMILIES:
        raise ConfigurationError(
            f"unknown model {model!r}; expected one of {', '.join(sorted(_MODEL_FAMILIES))}"
        )
    family = _MODEL_FAMILIES[key]
    if family is None:
        raise CloudOnlyError(
            f"model {model!r} renders only in bitHuman's cloud; {CLOUD_PLUGIN_HINT}"
        )
    return family


def is_cloud_only(model: str | None) -> bool:
    return model is not None and _MODEL_FAMILIES.get(model.strip().lower(), "") is None


def redact(secret: str | None) -> str:
    """What a secret looks like in a repr: whether it is set, never any of its characters."""
    return "<set>" if secret else "<unset>"


def scrub(text: str, *secrets: str | None) -> str:
    """``text`` with every given secret replaced, for messages built from other libraries."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text
