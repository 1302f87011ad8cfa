"""``preview``: a LiveKit room with the avatar in it, a page that joins it, until Ctrl-C.

Order matters for what a user sees when something is wrong: the avatar word and the page's
port are checked before any server starts, the LiveKit keys before the page is shown, and a
model download or load failure is shown on the page and printed, after which everything that
was started is stopped again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import secrets
import signal
import socket
import sys
import webbrowser
from dataclasses import dataclass
from typing import Any

from ..config import livekit_settings
from ..exceptions import AvatarHubError, ConfigurationError, MissingSecretError
from ..log import logger
from ..remote.server_api import check_livekit_keys
from .livekit_local import HOW_TO_GET_ONE, LocalLiveKit, find_livekit_server

VIEWER_IDENTITY = "preview-viewer"
AVATAR_IDENTITY = "avatarhub-preview-avatar"
DEFAULT_PORT = 8090


@dataclass
class LiveKitTarget:
    url: str
    api_key: str
    api_secret: str
    local: LocalLiveKit | None = None

    def __repr__(self) -> str:  # the secret is a credential: never shown
        return f"LiveKitTarget({self.url!r}, local={self.local is not None})"

    def token(self, identity: str, room: str, *, name: str, viewer: bool) -> str:
        """Least privilege: the viewer subscribes, publishes one microphone, and sends the
        gesture RPC (RPCs are data packets); the avatar publishes and hears that microphone."""
        from livekit import api

        grants = api.VideoGrants(
            room_join=True,
            room=room,
            can_subscribe=True,
            can_publish=True,
            can_publish_data=True,
            can_publish_sources=["microphone"] if viewer else None,
        )
        return (
            api.AccessToken(self.api_key, self.api_secret)
            .with_identity(identity)
            .with_name(name)
            .with_grants(grants)
            .to_jwt()
        )


def bind_page_port(port: int) -> socket.socket:
    """The page's socket, bound before anything starts so a busy port is the first answer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise ConfigurationError(
                f"port {port} on 127.0.0.1 is in use: pass --port with a free one (0 picks one)"
            ) from None
        raise ConfigurationError(f"cannot listen on 127.0.0.1:{port}: {err.strerror}") from None
    sock.listen(64)
    sock.setblocking(False)
    return sock


async def open_livekit(binary: str | None) -> LiveKitTarget:
    """The configured LiveKit (its keys checked), else a local server, else how to get one."""
    url, key, secret = livekit_settings()
    if url:
        if not (key and secret):
            raise ConfigurationError(
                "LIVEKIT_URL is set but LIVEKIT_API_KEY / LIVEKIT_API_SECRET are not: the "
                "preview mints its tokens with them"
            )
        target = LiveKitTarget(url, key, secret)
        await check_livekit_keys(url, key, secret, timeout=10.0)
        return target
    found = find_livekit_server(binary)
    if found is None:
        raise ConfigurationError(HOW_TO_GET_ONE)
    local = LocalLiveKit(found)
    await asyncio.to_thread(local.start)
    return LiveKitTarget(local.url, local.api_key, local.api_secret, local)


async def run_preview(
    avatar: str,
    *,
    port: int = DEFAULT_PORT,
    open_browser: bool = False,
    livekit_server: str | None = None,
    livekit_client: str | None = None,
    model: str | None = None,
    api_secret: str | None = None,
) -> int:

    from aiohttp import web

    from ..rendering.loader import check_model_file, split_source
    from ..rendering.source import AvatarSource
    from .page import PageConfig, PreviewState, check_livekit_client, create_page

    avatar_id, model_path = split_source(avatar)
    source = AvatarSource.decide(
        avatar_id, model_path=model_path, model=model, api_secret=api_secret
    )
    if source.model_path is not None:
        await asyncio.to_thread(check_model_file, source.model_path)
    elif not source.is_demo and not source.api_secret:
        raise MissingSecretError(
            f"{avatar} is downloaded from bitHuman: pass --api-secret or set BITHUMAN_API_SECRET"
        )
    client = check_livekit_client(livekit_client) if livekit_client else None
    sock = bind_page_port(port)
    started: list[Any] = []  # what to stop, last first
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        target = await open_livekit(livekit_server)
        if target.local is not None:
            started.append(lambda: asyncio.to_thread(target.local.stop))  # type: ignore[union-attr]
        room = f"avatarhub-preview-{secrets.token_hex(3)}"
        state = PreviewState(avatar=source.name)
        state.gestures = await _gestures(source)
        config = PageConfig(
            livekit_url=target.url,
            token=target.token(VIEWER_IDENTITY, room, name="you", viewer=True),
            avatar_identity=AVATAR_IDENTITY,
            avatar_name=source.name,
            gestures=state.gestures,
            livekit_client=client,
        )
        runner = web.AppRunner(create_page(config, state), access_log=None)
        await runner.setup()
        started.append(runner.cleanup)
        await web.SockSite(runner, sock).start()
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
        where = "a local livekit-server" if target.local else target.url
        print(f"avatarhub preview of {source.name} on {where}: {url}", flush=True)
        if open_browser and not await asyncio.to_thread(_open, url):
            print(f"could not start a browser: open {url} yourself", file=sys.stderr, flush=True)
        worker = await _avatar(source, target, room, state)
        if worker is None:
            await asyncio.sleep(1.5)  # the page polls once a second: let it show the failure
            return 1
        started.append(worker.stop)
        print("the avatar is in the room; Ctrl-C stops the preview", flush=True)
        ended = asyncio.ensure_future(worker.stopped)
        interrupted = asyncio.ensure_future(stop.wait())
        await asyncio.wait({ended, interrupted}, return_when=asyncio.FIRST_COMPLETED)
        interrupted.cancel()
        if ended.done() and worker.error:
            state.phase, state.error = "failed", f"the avatar stopped: {worker.error}"
            print(f"error: {state.error}", file=sys.stderr)
            return 1
        return 0
    finally:
        sock.close()
        for undo in reversed(started):
            with contextlib.suppress(Exception):
                await undo()


async def _avatar(source: Any, target: LiveKitTarget, room: str, state: Any) -> Any:
    """The avatar, joined as the join-room flow does it: lip-syncing the viewer's microphone."""
    from ..hub.resolver import ModelHub
    from ..remote.participant import AvatarWorker
    from ..rendering.loader import OpenedAvatar, open_source

    async def opener(_: str, __: str | None) -> OpenedAvatar:
        resolver = None
        if source.avatar_id is not None and not source.is_demo:
            resolver = ModelHub(api_secret=source.api_secret, progress=state.download_progress)
        state.phase = "loading" if resolver is None else "downloading"
        opened = await open_source(source, resolver=resolver)
        state.phase = "loading"
        return opened

    worker = AvatarWorker(
        agent_id=source.name,
        room_url=target.url,
        token=target.token(AVATAR_IDENTITY, room, name=f"avatar {source.name}", viewer=False),
        listen_to=VIEWER_IDENTITY,
        opener=opener,
        idle_timeout=0,
    )
    try:
        await worker.start()
    except Exception as err:
        message = str(err) if isinstance(err, AvatarHubError) else f"{type(err).__name__}: {err}"
        state.phase, state.error = "failed", message
        print(f"error: {message}", file=sys.stderr, flush=True)
        return None
    state.phase, state.frame_stats = "ready", worker.frame_stats
    return worker


async def _gestures(source: Any) -> list[str]:
    """The buttons the page shows: the demo's gestures, or the agent's (one API request)."""
    if source.is_demo:
        from ..rendering.demo.face import DemoRuntime

        return list(DemoRuntime.ACTIONS)
    if source.avatar_id is None:
        return []  # a model file names no gestures of its own
    from ..api import BithumanAPI

    try:
        async with BithumanAPI(api_secret=source.api_secret) as api:
            return sorted(await api.gestures(source.avatar_id))
    except AvatarHubError as err:
        logger.info("no gesture buttons: %s", err)
        return []


def _open(url: str) -> bool:
    try:
        return webbrowser.open(url)
    except webbrowser.Error:
        return False
