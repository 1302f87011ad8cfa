"""LiveKit's server API seen from a client: do these keys work, and what a refusal means.

One rule for every place that checks credentials before relying on them (``mode="dispatch"``,
``serve``'s ``/ready``, ``preview``, ``doctor``), so each says the same thing about the same
fault: refused keys name the two variables to check, an unreachable server names the URL.
"""

from __future__ import annotations

import asyncio
import contextlib

from ..exceptions import APIConnectionError, ConfigurationError


def http_url(url: str) -> str:
    """The server API's URL for a ``ws(s)://`` room URL (the same host and port)."""
    return "http" + url[2:] if url.startswith("ws") else url


def same_server(a: str, b: str) -> bool:
    """Do two LiveKit URLs (``ws``/``wss``/``http``/``https``) name the same host and port?"""
    from urllib.parse import urlsplit

    def where(url: str) -> tuple[str, int]:
        parts = urlsplit(http_url(url.strip()))
        default = 443 if parts.scheme == "https" else 80
        return (parts.hostname or "").lower(), parts.port or default

    try:
        return where(a) == where(b)
    except ValueError:  # a port that is not a number
        return False


async def check_livekit_keys(url: str, key: str, secret: str, *, timeout: float = 5.0) -> None:
    """One ``RoomService.ListRooms``; raises what :func:`livekit_refusal` makes of a failure."""
    from livekit import api

    lkapi = api.LiveKitAPI(http_url(url), key, secret)
    try:
        await asyncio.wait_for(lkapi.room.list_rooms(api.ListRoomsRequest()), timeout)
    except Exception as err:
        raise livekit_refusal(err, url) from None
    finally:
        with contextlib.suppress(Exception):
            await lkapi.aclose()


def livekit_refusal(err: Exception, url: str | None) -> Exception:
    """LiveKit's own answer to a server API call, in one line that says what to check."""
    import aiohttp

    status = getattr(err, "status", None)
    if status in (401, 403):
        code = getattr(err, "code", None)
        detail = f", {code}" if code and code != "unknown" else ""
        return ConfigurationError(
            f"LiveKit at {url} refused the API key and secret (HTTP {status}{detail}); check "
            "LIVEKIT_API_KEY and LIVEKIT_API_SECRET"
        )
    if isinstance(err, (aiohttp.ClientError, asyncio.TimeoutError, OSError)):
        return APIConnectionError(
            f"LiveKit at {url} is unreachable ({type(err).__name__}: {err}); check LIVEKIT_URL"
        )
    return err
