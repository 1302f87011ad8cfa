"""Reading (not verifying) the claims of a LiveKit access token.

The service only uses them to key workers by room and to name the participant; LiveKit itself
verifies the token when the worker connects with it.
"""

from __future__ import annotations

import base64
import json
from typing import Any


def token_claims(token: str) -> dict[str, Any]:
    """The JWT payload, or {} when ``token`` is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, UnicodeDecodeError):
        return {}
    return claims if isinstance(claims, dict) else {}


def token_room(token: str) -> str | None:
    video = token_claims(token).get("video")
    room = video.get("room") if isinstance(video, dict) else None
    return room if isinstance(room, str) and room else None


def token_identity(token: str) -> str | None:
    sub = token_claims(token).get("sub")
    return sub if isinstance(sub, str) and sub else None
