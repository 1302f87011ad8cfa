"""The package's own processes beside a real LiveKit server, started as a user starts them:
the speaking agent worker (``tests/speaking_agent.py``), ``serve`` and ``worker start``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from livekit import api, rtc

from livekit_real import LiveKitServer, Subscriber, clean_env, free_port, until

HERE = Path(__file__).resolve().parent
SERVICE_KEY = "service-key-for-real-rooms"


def times(log: str, line: str) -> list[float]:
    """When each line of a process's log (``say()``: a monotonic time, then what happened)
    that ends with ``line`` was printed."""
    return [float(row.split()[0]) for row in log.splitlines() if row.endswith(line)]


class Process:
    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc, self.log = proc, log

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        if self.proc.returncode is not None:
            raise AssertionError(f"{self.log.name} exited:\n{self.text()[-3000:]}")
        return True

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def spawn(name: str, tmp_path: Path, *argv: str, **env: str) -> Process:
    log = tmp_path / f"{name}.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *argv, env=clean_env(**env), stdout=out, stderr=out
        )
    return Process(proc, log)


@contextlib.asynccontextmanager
async def registered(process: Process) -> AsyncIterator[Process]:
    """Until LiveKit's worker in ``process`` says it registered; stops it on the way out."""
    try:
        await until(
            lambda: process.alive() and "registered worker" in process.text(), 90, "registration"
        )
        yield process
    finally:
        await process.stop()


@contextlib.asynccontextmanager
async def speaking_agent(
    server: LiveKitServer, tmp_path: Path, agent_name: str, **env: str
) -> AsyncIterator[Process]:
    """``python tests/speaking_agent.py start``, registered with LiveKit."""
    agent = await spawn(
        agent_name,
        tmp_path,
        str(HERE / "speaking_agent.py"),
        "start",
        **server.env(),
        AVATARHUB_TEST_AGENT_NAME=agent_name,
        BITHUMAN_AVATAR_ID="demo",
        **env,
    )
    async with registered(agent):
        yield agent


async def dispatch(server: LiveKitServer, agent_name: str, room: str, metadata: str = "") -> str:
    """A dispatch of ``agent_name`` to ``room`` through LiveKit's API: its id."""
    lkapi = server.api()
    try:
        made = await lkapi.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name=agent_name, room=room, metadata=metadata)
        )
    finally:
        await lkapi.aclose()
    return str(made.id)


async def dispatched_avatar(
    sub: Subscriber, agent_name: str, metadata: str = ""
) -> rtc.RemoteParticipant:
    """Dispatch the agent worker ``agent_name`` to ``sub``'s room through LiveKit's API, as an
    app's backend does; the avatar, once ``sub`` receives its video and its audio."""
    await dispatch(sub.server, agent_name, sub.room_name, metadata)
    avatar, _ = await sub.wait_track(rtc.TrackKind.KIND_VIDEO, timeout=90)
    await sub.wait_track(rtc.TrackKind.KIND_AUDIO, identity=avatar.identity)
    return avatar


@contextlib.asynccontextmanager
async def avatar_worker(
    server: LiveKitServer, tmp_path: Path, agent_name: str, *args: str, **env: str
) -> AsyncIterator[Process]:
    """``python -m livekit_plugins_avatarhub worker start``, registered under ``agent_name``:
    named the way a fleet names it on every machine, with ``AVATARHUB_AGENT_NAME``."""
    worker = await spawn(
        f"worker-{agent_name}",
        tmp_path,
        "-m",
        "livekit_plugins_avatarhub",
        "worker",
        "--http-port",
        "0",
        *args,
        "start",
        **server.env(),
        **{"AVATARHUB_AGENT_NAME": agent_name, **env},
    )
    async with registered(worker):
        yield worker


@contextlib.asynccontextmanager
async def avatar_service(
    server: LiveKitServer | None,
    tmp_path: Path,
    *args: str,
    command: tuple[str, ...] = ("-m", "livekit_plugins_avatarhub", "serve"),
    **env: str,
) -> AsyncIterator[tuple[Process, httpx.AsyncClient]]:
    """``python -m livekit_plugins_avatarhub serve`` (or ``command``), answering /health; and
    a client."""
    port = free_port()
    lk: dict[str, Any] = server.env() if server is not None else {}
    service = await spawn(
        f"serve-{port}",
        tmp_path,
        *command,
        "--port",
        str(port),
        *args,
        AVATARHUB_SERVICE_KEY=SERVICE_KEY,
        **lk,
        **env,
    )
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(
        base_url=base, headers={"authorization": f"Bearer {SERVICE_KEY}"}, timeout=30
    ) as client:
        try:

            async def answers() -> bool:
                try:
                    return (await client.get("/health")).status_code == 200
                except httpx.TransportError:
                    return False

            deadline = asyncio.get_running_loop().time() + 60
            while not await answers():
                service.alive()
                if asyncio.get_running_loop().time() > deadline:
                    raise AssertionError(f"serve did not answer:\n{service.text()[-3000:]}")
                await asyncio.sleep(0.1)
            yield service, client
        finally:
            await service.stop()


async def join_room(
    client: httpx.AsyncClient,
    server: LiveKitServer,
    room: str,
    identity: str,
    *,
    name: str = "BitHuman Agent",
    listen_to: str = "app-user",
    agent: str = "demo",
    **request: Any,
) -> httpx.Response:
    """The Flutter app's ``POST /v1/agents/{agent}/join-room``, with a token it minted
    (``request``: httpx's options for the call, such as ``timeout``)."""
    return await client.post(
        f"/v1/agents/{agent}/join-room",
        json={
            "room_url": server.url,
            "room_token": server.token(identity, room, kind="agent"),
            "participant_name": name,
            "listen_to": listen_to,
        },
        **request,
    )


@contextlib.asynccontextmanager
async def avatar_backend(
    mode: str, server: LiveKitServer, tmp_path: Path
) -> AsyncIterator[dict[str, str]]:
    """What renders the avatar in ``mode``, and the agent's environment that points at it."""
    if mode in ("local", "official-local"):  # rendered in the agent's own job
        yield {}
    elif mode in ("participant", "official"):
        async with avatar_service(server, tmp_path, "--allow-gestures-from", "viewer") as (
            _,
            client,
        ):
            base = str(client.base_url)
            if mode == "participant":
                yield {
                    "AVATARHUB_TEST_AVATAR_KWARGS": json.dumps({"mode": "participant"}),
                    "AVATARHUB_SERVICE_URL": base,
                    "AVATARHUB_SERVICE_KEY": SERVICE_KEY,
                }
            else:
                yield {
                    "BITHUMAN_API_URL": f"{base}/v1/runtime-tokens/request",
                    "BITHUMAN_API_SECRET": SERVICE_KEY,
                }
    elif mode == "dispatch":
        async with avatar_worker(
            server, tmp_path, "avatars-real", "--allow-gestures-from", "viewer"
        ):
            yield {
                "AVATARHUB_TEST_AVATAR_KWARGS": json.dumps({"mode": "dispatch"}),
                "AVATARHUB_AGENT_NAME": "avatars-real",
            }
    else:
        raise AssertionError(mode)
