"""The avatar service on 127.0.0.1 with its workers in loopback rooms, for the service tests.

``Harness`` builds workers whose avatars are demo runtimes (agent ``B000000000`` is unknown) and
whose rooms connect through a ``FakeSFU``, so a worker joining with a token shows up, with the
SID, name and attributes the token gives it, in every other room of that name.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
from aiohttp import web

from livekit import api as lkapi
from livekit_plugins_avatarhub.exceptions import AvatarNotFoundError
from livekit_plugins_avatarhub.remote.dispatcher import ASSIGN_TIMEOUT
from livekit_plugins_avatarhub.remote.participant import AvatarWorker
from livekit_plugins_avatarhub.rendering.demo import DemoRuntime
from livekit_plugins_avatarhub.rendering.loader import OpenedAvatar
from livekit_plugins_avatarhub.service.app import create_app
from livekit_plugins_avatarhub.service.manager import WorkerManager

from fakes import FakeRoom, FakeSFU

KEY = "service-key-0123456789"
LK_KEY, LK_SECRET = "devkey", "devsecret-devsecret-devsecret-1234"


def room_token(
    room: str, identity: str = "avatar-1", *, can_update_own_metadata: bool = True, **attributes
) -> str:
    token = (
        lkapi.AccessToken(LK_KEY, LK_SECRET)
        .with_identity(identity)
        .with_kind("agent")
        .with_grants(
            lkapi.VideoGrants(
                room_join=True, room=room, can_update_own_metadata=can_update_own_metadata
            )
        )
    )
    if attributes:
        token = token.with_attributes(attributes)
    return token.to_jwt()


def sid_of(identity: str) -> str:
    """The SID the loopback server gives a participant (LiveKit's are ``PA_`` + random)."""
    return f"PA_{hashlib.sha1(identity.encode()).hexdigest()[:12]}"


class Harness:
    def __init__(self) -> None:
        self.sfu = FakeSFU()
        self.rooms: list[FakeRoom] = []
        self.runtimes: list[DemoRuntime] = []

    async def open(self, agent_id: str, model: str | None) -> OpenedAvatar:
        if agent_id == "B000000000":
            raise AvatarNotFoundError("agent B000000000: HTTP 404 (NOT_FOUND)", status_code=404)
        runtime = await DemoRuntime.create(output_size=(160, 120))
        self.runtimes.append(runtime)
        return OpenedAvatar(runtime)

    def room(self) -> FakeRoom:
        self.rooms.append(self.sfu.room())
        return self.rooms[-1]

    def worker(self, **kwargs) -> AvatarWorker:
        return AvatarWorker(opener=self.open, room_factory=self.room, **kwargs)


@contextlib.asynccontextmanager
async def serve(manager: WorkerManager, *middlewares: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The service's HTTP API for ``manager`` on a free 127.0.0.1 port, and a client with the key."""
    app = create_app(manager, key=KEY)
    app.middlewares.extend(middlewares)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            headers={"authorization": f"Bearer {KEY}"},
            # join-room answers once a worker took the job: up to ASSIGN_TIMEOUT, more than
            # httpx's 5 s default when the first dispatch after registration is slow
            timeout=httpx.Timeout(5.0, read=3 * ASSIGN_TIMEOUT),
        ) as client:
            yield client
    finally:
        await runner.cleanup()
