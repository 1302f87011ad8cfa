"""Argument → environment variable → default, and the one TLS context.

Every option that has an environment fallback is resolved here, so the precedence
(explicit argument always wins) is written once. bitHuman's names live in ``ids``.
"""

from __future__ import annotations

import functools
import os
import ssl
from pathlib import Path
from typing import Any

from .exceptions import ConfigurationError
from .log import logger

DEFAULT_API_BASE = "https://api.bithuman.ai"
DEFAULT_FRESH_FOR = 24 * 3600.0
DEFAULT_CACHE_GB = 10.0


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One verifying TLS context per process for every HTTP client here: building one loads the
    CA bundle (~20 ms), which each new client would otherwise pay again.

    Trusts what httpx trusts by default: ``SSL_CERT_FILE``, else ``SSL_CERT_DIR`` (a company
    proxy's or a private CA), else certifi's bundle."""
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
        where = os.environ.get(name)
        if not where:
            continue
        if not os.path.exists(where):
            raise ConfigurationError(f"{name}={where!r} does not exist")
        is_file = name == "SSL_CERT_FILE"
        try:
            return ssl.create_default_context(
                cafile=where if is_file else None, capath=None if is_file else where
            )
        except (OSError, ssl.SSLError) as err:
            raise ConfigurationError(
                f"{name}={where!r} is not a bundle of CA certificates ({err})"
            ) from None
    import certifi  # what httpx verifies against by default

    return ssl.create_default_context(cafile=certifi.where())


def untrusted_certificate(err: BaseException) -> str | None:
    """Why the server's certificate was refused, if that is what ``err`` comes from.

    Retrying cannot help with that, and the fix (``SSL_CERT_FILE``) is worth naming."""
    seen: set[int] = set()
    pending: list[object] = [err]
    while pending:
        current = pending.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return current.verify_message or str(current)
        pending.extend((current.__cause__, current.__context__, *current.args))
    return None


#: what to do about an untrusted certificate
CERTIFICATE_HINT = (
    "behind a proxy that inspects TLS, or with a private CA, set SSL_CERT_FILE to its CA bundle"
)


def env_or(value: Any, *names: str) -> str | None:
    """``value`` when it is given (not NOT_GIVEN/None/""), else the first set variable."""
    if isinstance(value, str) and value:
        return value
    for name in names:
        found = os.environ.get(name)
        if found:
            return found
    return None


#: a session limit or idle timeout above this is surely a mistake (a week)
MAX_SECONDS = 7 * 24 * 3600.0


def seconds_setting(value: Any, env: str, what: str, *, default: float | None) -> float | None:
    """A duration argument, else ``env``, else ``default``: a number of seconds from 0 (off:
    None) to a week; anything else is a ConfigurationError naming ``what``."""
    raw: Any = value
    if raw is None or type(raw).__name__ == "NotGiven":
        raw = os.environ.get(env) or None
        if raw is None:
            return default
    try:
        seconds = float(raw)
    except (TypeError, ValueError):
        seconds = float("nan")
    if isinstance(raw, bool) or not 0 <= seconds <= MAX_SECONDS:
        raise ConfigurationError(
            f"{what} must be a number of seconds from 0 (off) to {MAX_SECONDS:g}; got {raw!r}"
        )
    return seconds or None


def session_limit_setting() -> float | None:
    """The operator's session limit for avatars: ``AVATARHUB_MAX_SESSION_SECONDS``."""
    return seconds_setting(
        None, "AVATARHUB_MAX_SESSION_SECONDS", "AVATARHUB_MAX_SESSION_SECONDS", default=None
    )


def tighter(*limits: float | None) -> float | None:
    """The smallest of the limits that are set (None: no limit at all)."""
    given = [limit for limit in limits if limit]
    return min(given) if given else None


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# -- bitHuman credentials and the avatar to render ---------------------------------------------


def bithuman_secret(value: Any = None) -> str | None:
    """``api_secret``: argument, ``BITHUMAN_API_SECRET``, then ``BITHUMAN_API_KEY`` (the SDK's)."""
    return env_or(value, "BITHUMAN_API_SECRET", "BITHUMAN_API_KEY")


def bithuman_token(value: Any = None) -> str | None:
    return env_or(value, "BITHUMAN_API_TOKEN")


def runtime_auth_url(value: Any = None) -> str | None:
    """The runtime's token-request URL (``BITHUMAN_API_URL``, as LiveKit's plugin reads it)."""
    return env_or(value, "BITHUMAN_API_URL")


def avatar_from_env() -> tuple[str | None, str | None]:
    """``(BITHUMAN_AVATAR_ID, BITHUMAN_MODEL_PATH)``, either possibly unset."""
    return env_or(None, "BITHUMAN_AVATAR_ID"), env_or(None, "BITHUMAN_MODEL_PATH")


# -- the avatar service and LiveKit --------------------------------------------------------------


def service_url(value: Any = None) -> str | None:
    return env_or(value, "AVATARHUB_SERVICE_URL")


def service_key(value: Any = None) -> str | None:
    return env_or(value, "AVATARHUB_SERVICE_KEY")


LIVEKIT_VARIABLES = ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET")


def livekit_settings(
    url: str | None = None, key: str | None = None, secret: str | None = None
) -> tuple[str | None, str | None, str | None]:
    """LiveKit's URL, API key and secret: arguments, then ``LIVEKIT_*``; any may be missing."""
    return (
        env_or(url, "LIVEKIT_URL"),
        env_or(key, "LIVEKIT_API_KEY"),
        env_or(secret, "LIVEKIT_API_SECRET"),
    )


def livekit_credentials(
    url: str | None, key: str | None, secret: str | None, *, needed_for: str
) -> tuple[str, str, str]:
    """LiveKit's URL, API key and secret: arguments, then ``LIVEKIT_*``; all three required."""
    values = livekit_settings(url, key, secret)
    names = LIVEKIT_VARIABLES
    missing = [name for name, v in zip(names, values, strict=True) if not v]
    if missing:
        raise ConfigurationError(
            f"{needed_for}: set {', '.join(missing)} (or pass livekit_url= / livekit_api_key= / "
            "livekit_api_secret= to start())"
        )
    return values[0] or "", values[1] or "", values[2] or ""


# -- the cache ---------------------------------------------------------------------------------


def offline_mode(value: bool | None = None) -> bool:
    return env_flag("AVATARHUB_OFFLINE") if value is None else value


def fresh_for(value: float | None = None) -> float:
    """Seconds a validated model is used without asking bitHuman (``AVATARHUB_FRESH_FOR``)."""
    if value is not None:
        return value
    return _env_number("AVATARHUB_FRESH_FOR", DEFAULT_FRESH_FOR)


def download_rate_rule() -> tuple[float, float]:
    """(minimum bytes/s, over seconds) below which a download fails: ``AVATARHUB_MIN_DOWNLOAD_RATE``
    (default 10240) and ``AVATARHUB_STALL_SECONDS`` (default 30)."""
    rate = _env_number("AVATARHUB_MIN_DOWNLOAD_RATE", 10 * 1024.0)
    window = _env_number("AVATARHUB_STALL_SECONDS", 30.0) or 30.0
    return rate, window


def api_deadline(value: float | None = None) -> float:
    """Seconds one API call may take, retries included (``AVATARHUB_API_DEADLINE``, 120)."""
    if value is not None:
        return value
    return _env_number("AVATARHUB_API_DEADLINE", 120.0) or 120.0


def max_cache_bytes() -> int:
    """The cache cap, shared with the bithuman SDK: ``BITHUMAN_AVATAR_CACHE_GB`` (default 10)."""
    return int(_env_number("BITHUMAN_AVATAR_CACHE_GB", DEFAULT_CACHE_GB) * (1 << 30))


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        logger.warning("%s=%r is not a non-negative number; using %s", name, raw, default)
        return default
    return value


def api_base(value: str | None = None) -> str:
    """The REST base: argument, ``BITHUMAN_API_BASE``, then the public API.

    ``BITHUMAN_API_URL`` is deliberately not read: LiveKit's bithuman plugin uses it for the
    full runtime-token URL, which is not a REST base.
    """
    import httpx

    base = env_or(value, "BITHUMAN_API_BASE") or DEFAULT_API_BASE
    base = base.rstrip("/")
    try:
        valid = base.startswith(("https://", "http://")) and bool(httpx.URL(base).host)
    except httpx.InvalidURL:
        valid = False
    if not valid:
        raise ConfigurationError(
            f"API base {base!r} is not an http(s) URL; fix the argument or BITHUMAN_API_BASE"
        )
    return base


def cache_root(value: str | os.PathLike[str] | None = None) -> Path:
    """Shared with the bithuman SDK: ``${BITHUMAN_CACHE_DIR:-~/.cache/bithuman}``."""
    raw = os.fspath(value) if value else os.environ.get("BITHUMAN_CACHE_DIR")
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "bithuman"
