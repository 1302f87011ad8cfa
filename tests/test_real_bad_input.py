"""Bad LiveKit settings against a real server: a URL nobody answers fails within a bounded time,
and wrong API keys get LiveKit's own refusal in one line, for the session, ``serve`` and
``worker``."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
from livekit.agents import AgentSession

from livekit import rtc
from livekit_plugins_avatarhub import AvatarSession
from livekit_plugins_avatarhub.exceptions import (
    APIConnectionError,
    APIStatusError,
    ConfigurationError,
)

from livekit_real import LiveKitServer, Subscriber, free_port, until
from real_processes import SERVICE_KEY, avatar_service, dispatch, dispatched_avatar, spawn

pytestmark = pytest.mark.livekit_real

WRONG_SECRET = "not-the-secret-not-the-secret-0123"


@pytest.fixture
async def agent_room(real_livekit):
    room = rtc.Room()
    await room.connect(real_livekit.url, real_livekit.token("agent-bad", "bad-input", kind="agent"))
    yield room
    await room.disconnect()


async def test_the_session_says_when_livekit_refuses_its_keys_or_is_not_there(
    real_livekit, agent_room, tmp_path
):
    nobody = f"ws://127.0.0.1:{free_port()}"
    cases = [
        ("dispatch", real_livekit.url, WRONG_SECRET, ConfigurationError, "refused the API key"),
        ("dispatch", nobody, real_livekit.api_secret, APIConnectionError, "unreachable"),
    ]
    async with avatar_service(real_livekit, tmp_path) as (_, client):
        service = {"service_url": str(client.base_url), "service_key": SERVICE_KEY}
        cases += [
            ("participant", real_livekit.url, WRONG_SECRET, APIStatusError, "401"),
            ("participant", nobody, real_livekit.api_secret, APIStatusError, "(?i)connect"),
        ]
        for mode, url, secret, error, words in cases:
            avatar = AvatarSession(
                avatar_id="demo", mode=mode, **(service if mode == "participant" else {})
            )
            started = time.monotonic()
            with pytest.raises(error, match=words) as caught:
                await avatar.start(
                    AgentSession(),
                    room=agent_room,
                    livekit_url=url,
                    livekit_api_key=real_livekit.api_key,
                    livekit_api_secret=secret,
                )
            took = time.monotonic() - started
            message = str(caught.value)
            assert "\n" not in message and secret not in message, message
            assert "bitHuman's API" not in message, "the service failed, not bitHuman"
            assert took < 30, f"{mode} at {url}: {took:.1f} s"


async def test_serve_answers_502_with_livekits_refusal(real_livekit, tmp_path):
    async with avatar_service(real_livekit, tmp_path) as (service, client):
        for url, token, words in [
            (real_livekit.url, _wrong_token(real_livekit, "bad-serve"), "401"),
            (
                f"ws://127.0.0.1:{free_port()}",
                real_livekit.token("avatar-x", "bad-serve"),
                "connect",
            ),
        ]:
            started = time.monotonic()
            answer = await client.post(
                "/v1/agents/demo/join-room", json={"room_url": url, "room_token": token}
            )
            assert answer.status_code == 502, answer.text
            message = answer.json()["error"]["message"]
            assert words in message.lower() or words in message, message
            assert "\n" not in message and time.monotonic() - started < 30
        workers = (await client.get("/v1/workers")).json()["data"]
        assert {w["status"] for w in workers} == {"failed"}, "kept to be seen, not running"


async def test_a_worker_started_before_livekit_says_so_once_and_serves_once_it_is_up(
    real_livekit, tmp_path
):
    """LiveKit not up yet (a compose file starting everything at once, a restart): the worker
    starts, says so in one line, and registers by itself once the server answers. Then a
    dispatch with malformed metadata fails that job only: the next one renders."""
    later = LiveKitServer(
        real_livekit.binary,
        tmp_path,
        port=free_port(),
        rtc_tcp_port=free_port(),
        rtc_udp_port=free_port(socket.SOCK_DGRAM),
    )
    worker = await spawn(
        "worker-before-livekit",
        tmp_path,
        *("-m", "livekit_plugins_avatarhub", "worker", "--http-port", "0", "start"),
        **later.env(),
        AVATARHUB_AGENT_NAME="avatars-later",
    )
    try:
        await until(
            lambda: worker.alive() and "cannot reach LiveKit" in worker.text(), 60, "its line"
        )
        await asyncio.sleep(5)  # a few of LiveKit's tries go by, unsaid
        worker.alive()
        await asyncio.to_thread(later.start)
        up = time.monotonic()
        await until(lambda: "registered worker" in worker.text(), 30, "registration")
        print(f"registered {time.monotonic() - up:.1f} s after the server answered")
        async with Subscriber(later, "after-livekit") as sub:
            # a dispatch whose metadata is not JSON fails that job alone, with its reason
            await dispatch(later, "avatars-later", sub.room_name, "not json")
            await until(lambda: "metadata is not JSON" in worker.text(), 30, "the bad job's line")
            job = json.dumps({"agent_id": "demo", "listen_to": sub.identity})
            await dispatched_avatar(sub, "avatars-later", job)  # its video and audio arrive
            worker.alive()
    finally:
        await worker.stop()
        later.stop()
    lines = worker.text().splitlines()
    said = [line for line in lines if "cannot reach LiveKit" in line]
    assert len(said) == 1 and later.url in said[0], said
    assert not [line for line in lines if "failed to connect to livekit" in line]
    reached = [line for line in lines if "reached LiveKit at" in line]
    assert len(reached) == 1 and "after" in reached[0], reached


def _wrong_token(server, room: str) -> str:
    from livekit import api

    return (
        api.AccessToken(server.api_key, WRONG_SECRET)
        .with_identity("avatar-x")
        .with_grants(api.VideoGrants(room_join=True, room=room))
        .to_jwt()
    )


async def test_a_worker_with_wrong_keys_says_so_once_and_stops(real_livekit, tmp_path):
    worker = await spawn(
        "worker-wrong-keys",
        tmp_path,
        *("-m", "livekit_plugins_avatarhub", "worker", "--http-port", "0", "start"),
        **{**real_livekit.env(), "LIVEKIT_API_SECRET": WRONG_SECRET},
    )
    try:
        await until(lambda: worker.proc.returncode is not None, 60, "the worker to stop")
    finally:
        await worker.stop()
    assert worker.proc.returncode == 1
    refusals = [line for line in worker.text().splitlines() if "refused" in line]
    assert len(refusals) == 1 and "LIVEKIT_API_SECRET" in refusals[0], refusals
    assert WRONG_SECRET not in worker.text()
