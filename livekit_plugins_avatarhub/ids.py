"""bitHuman's names for things: avatar ids, the demo avatar, model families.

Each check is written once; every caller (the session, the avatar service, avatar jobs, the
hub) asks it, so one name is accepted or refused the same way, with the same words, everywhere.
"""

from __future__ import annotations

import re

from .exceptions import CLOUD_PLUGIN_HINT, CloudOnlyError, ConfigurationError, InvalidAvatarIdError

DEMO_AVATAR_ID = "demo"

# match with fullmatch(): "$" would also accept a trailing newline
AVATAR_ID_PATTERN = re.compile(r"[A-Z][A-Z0-9]{9}")

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


def is_demo(source: object) -> bool:
    """Whether ``source`` names the built-in demo avatar."""
    return source == DEMO_AVATAR_ID


def is_agent_code(value: object) -> bool:
    return isinstance(value, str) and AVATAR_ID_PATTERN.fullmatch(value) is not None


def validate_avatar_id(code: str) -> str:
    """``code`` if it is a bitHuman agent code; InvalidAvatarIdError naming the form otherwise."""
    if not is_agent_code(code):
        raise InvalidAvatarIdError(
            f"avatar id {code!r} is not a bitHuman agent code (10 characters, an upper-case "
            f"letter then upper-case letters or digits, e.g. 'A91XMB7113'); "
            f"use {DEMO_AVATAR_ID!r} for the built-in demo avatar"
        )
    return code


def check_avatar(value: object) -> str:
    """``value`` if it names an avatar: ``"demo"`` or an agent code."""
    if is_demo(value):
        return DEMO_AVATAR_ID
    if not isinstance(value, str):
        raise InvalidAvatarIdError(
            f"avatar id {value!r} is not a bitHuman agent code (e.g. 'A91XMB7113') or "
            f"{DEMO_AVATAR_ID!r}"
        )
    return validate_avatar_id(value)


def model_family(model: str | None) -> str | None:
    """Map a model name to its downloadable family; None means "the agent's own model".

    Raises CloudOnlyError for names that only bitHuman's cloud renders; callers that can fall
    back to another family check :func:`is_cloud_only` first (or use :func:`check_model`).
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


def download_family(model: str | None) -> str | None:
    """The family to download for ``model``: None for the agent's own model, and for a
    cloud-only name (the hub then picks a family the agent has)."""
    return None if model is None or is_cloud_only(model) else model_family(model)


def check_model(model: str | None) -> str | None:
    """``model`` if bitHuman knows the name (cloud-only names included: where they render
    is decided later); ConfigurationError for a name nobody knows."""
    if model and not is_cloud_only(model):
        model_family(model)
    return model or None
