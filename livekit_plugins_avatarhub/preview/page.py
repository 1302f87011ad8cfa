"""The preview's web page: the package's own HTML and JavaScript, served on 127.0.0.1 only.

``/`` is the page; ``/config.json`` what it needs to join (the LiveKit URL, the viewer's token,
the avatar's identity and gestures); ``/status`` how the avatar is doing (the model download's
bytes and rate, the failure if there was one, what the renderer counts); ``/sample.wav`` the
bundled sample speech. ``livekit-client`` comes from a public CDN, pinned with its integrity
hash, or from a local copy (``/livekit-client.js``) for offline use.

Only requests addressed to the loopback name the page was opened with are answered: another
site open in the same browser cannot read the token (no CORS header, and a rebound DNS name
is refused by its Host).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from ..rendering.mp4 import SAMPLE_AUDIO

ASSETS = Path(__file__).with_name("assets")
#: the livekit-client the page loads by default: its UMD build on jsDelivr (npm's bytes)
LIVEKIT_CLIENT_VERSION = "2.23.0"
LIVEKIT_CLIENT_CDN = (
    f"https://cdn.jsdelivr.net/npm/livekit-client@{LIVEKIT_CLIENT_VERSION}"
    "/dist/livekit-client.umd.js"
)
LIVEKIT_CLIENT_INTEGRITY = "sha384-HkA7rQNo8H04l1p4zoXX1Cy+h9YoYp8LvKt4vfMFhv4KFk07UkrNwIUnyBum8Pw6"
_LOCAL_CLIENT = "/livekit-client.js"


@dataclass
class PreviewState:
    """What ``/status`` reports; the command updates it, the page polls it."""

    avatar: str
    phase: str = "starting"  # starting, downloading, loading, ready, failed
    error: str | None = None
    downloaded: int = 0
    total: int | None = None
    rate: float = 0.0  # bytes per second over the download so far
    gestures: list[str] = field(default_factory=list)
    frame_stats: Any = None  # the renderer's FrameStats once it runs
    _download_started: float | None = None

    def download_progress(self, done: int, total: int | None) -> None:
        """A ``ModelHub`` progress callback (called on the event loop)."""
        now = time.monotonic()
        if self._download_started is None:
            self._download_started = now
        self.phase = "downloading"
        self.downloaded, self.total = done, total
        elapsed = now - self._download_started
        self.rate = done / elapsed if elapsed > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "avatar": self.avatar,
            "phase": self.phase,
            "error": self.error,
            "download": {"bytes": self.downloaded, "total": self.total, "rate": self.rate},
        }
        stats = self.frame_stats
        if stats is not None:
            body["render"] = {
                "frames": stats.frames,
                "late": stats.late,
                "skipped": stats.stale,
                "lag_ms": round(stats.lag * 1000, 1),
            }
        return body


@dataclass
class PageConfig:
    livekit_url: str
    token: str
    avatar_identity: str
    avatar_name: str
    gestures: list[str]
    livekit_client: Path | None = None  # a local copy of livekit-client's UMD build


def create_page(config: PageConfig, state: PreviewState) -> web.Application:
    @web.middleware
    async def loopback_only(request: web.Request, handler: Any) -> web.StreamResponse:
        host = (request.host or "").rsplit(":", 1)[0].strip("[]")
        if host not in ("127.0.0.1", "localhost", "::1"):
            return web.Response(status=421, text="the preview answers on 127.0.0.1 only")
        response: web.StreamResponse = await handler(request)
        response.headers["Cache-Control"] = "no-store"
        return response

    app = web.Application(middlewares=[loopback_only])
    page = _render_index(config)
    joined = {
        "url": config.livekit_url,
        "token": config.token,
        "avatar": config.avatar_identity,
        "name": config.avatar_name,
        "gestures": config.gestures,
    }

    async def index(_: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    async def config_json(_: web.Request) -> web.Response:
        return web.json_response(joined)

    async def status(_: web.Request) -> web.Response:
        return web.json_response(state.as_json())

    app.router.add_get("/", index)
    app.router.add_get("/config.json", config_json)
    app.router.add_get("/status", status)
    app.router.add_get("/preview.js", _file(ASSETS / "preview.js", "text/javascript"))
    app.router.add_get("/sample.wav", _file(SAMPLE_AUDIO, "audio/wav"))
    if config.livekit_client is not None:
        app.router.add_get(_LOCAL_CLIENT, _file(config.livekit_client, "text/javascript"))
    return app


def _file(path: Path, content_type: str) -> Any:
    async def send(_: web.Request) -> web.FileResponse:
        return web.FileResponse(path, headers={"Content-Type": content_type})

    return send


def _render_index(config: PageConfig) -> str:
    if config.livekit_client is not None:
        client = f'<script src="{_LOCAL_CLIENT}"></script>'
    else:
        client = (
            f'<script src="{LIVEKIT_CLIENT_CDN}" integrity="{LIVEKIT_CLIENT_INTEGRITY}" '
            'crossorigin="anonymous"></script>'
        )
    text = (ASSETS / "index.html").read_text(encoding="utf-8")
    return text.replace("<!-- livekit-client -->", client)


def check_livekit_client(path: str) -> Path:
    """A local livekit-client: its UMD file, or the package folder (``node_modules/...``)."""
    from ..exceptions import ConfigurationError

    given = Path(path)
    candidates = [given, given / "dist" / "livekit-client.umd.js"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigurationError(
        f"--livekit-client {path}: no livekit-client.umd.js there (npm install livekit-client)"
    )
