"""Only the agent it serves drives the avatar, in a real room with a second agent and an
intruder: the avatar lip-syncs the agent named in its ``lk.publish_on_behalf`` attribute and no
other, and answers ``trigger_dynamics`` from that agent and the identities the operator allows
(``serve --allow-gestures-from``), with an RPC error for everyone else."""

from __future__ import annotations

import asyncio
import time
import uuid
import wave

import pytest

from livekit import rtc
from livekit_plugins_avatarhub.backends.service import avatar_token
from livekit_plugins_avatarhub.remote.protocol import RPC_NOT_ALLOWED
from livekit_plugins_avatarhub.rendering.mp4 import SAMPLE_AUDIO

from livekit_real import Subscriber, until
from real_processes import avatar_service

pytestmark = [pytest.mark.livekit_real, pytest.mark.slow]

AVATAR = "bithuman-avatar-agent"
OPEN = 0.05


def speech(seconds: float) -> bytes:
    with wave.open(str(SAMPLE_AUDIO)) as f:  # 16 kHz mono int16
        return f.readframes(int(f.getframerate() * seconds))


async def join(server, room: str, identity: str, *, kind: str | None = None) -> rtc.Room:
    participant = rtc.Room()
    await participant.connect(server.url, server.token(identity, room, kind=kind))
    # the avatar reports playback back to whoever streamed it speech
    participant.local_participant.register_rpc_method("lk.playback_finished", lambda _: "ok")
    return participant


async def say(room: rtc.Room, seconds: float) -> tuple[float, float]:
    """Stream speech to the avatar as LiveKit's DataStream audio output does, in real time."""
    pcm, chunk = speech(seconds), 16000 // 10 * 2
    writer = await room.local_participant.stream_bytes(
        f"AUDIO_{uuid.uuid4().hex[:8]}",
        topic="lk.audio_stream",
        destination_identities=[AVATAR],
        attributes={"sample_rate": "16000", "num_channels": "1"},
    )
    started = time.monotonic()
    for i in range(0, len(pcm), chunk):
        await writer.write(pcm[i : i + chunk])
        await asyncio.sleep(0.1)
    await writer.aclose()
    return started, time.monotonic()


async def launch(client, server, token: str, room: str):
    """The cloud launch request, as ``mode="participant"`` and the official plugin send it."""
    return await client.post(
        "/v1/runtime-tokens/request",
        json={
            "agent_id": "demo",
            "livekit_url": server.url,
            "livekit_token": token,
            "room_name": room,
        },
    )


async def gesture(room: rtc.Room) -> str | rtc.RpcError:
    try:
        return await room.local_participant.perform_rpc(
            destination_identity=AVATAR,
            method="trigger_dynamics",
            payload='{"action": "wave"}',
        )
    except rtc.RpcError as err:
        return err


async def test_only_the_served_agent_and_allowed_identities_drive_the_avatar(
    real_livekit, tmp_path
):
    room = "two-agents"
    args = ("--allow-gestures-from", "operator-console")
    async with avatar_service(real_livekit, tmp_path, *args) as (service, client):
        other = await join(real_livekit, room, "agent-b", kind="agent")  # first in the room
        served = await join(real_livekit, room, "agent-a", kind="agent")
        intruder = await join(real_livekit, room, "app-user")
        operator = await join(real_livekit, room, "operator-console")
        try:
            token = avatar_token(
                api_key=real_livekit.api_key,
                api_secret=real_livekit.api_secret,
                room=room,
                identity=AVATAR,
                name="Avatar",
                on_behalf_of="agent-a",
            )
            answer = await launch(client, real_livekit, token, room)
            assert answer.status_code == 200, answer.text
            async with Subscriber(real_livekit, room) as sub:
                avatar, _ = await sub.wait_track(rtc.TrackKind.KIND_VIDEO, identity=AVATAR)
                await sub.wait_track(rtc.TrackKind.KIND_AUDIO, identity=AVATAR)
                sub.record(avatar)
                await asyncio.sleep(1)
                b0, b1 = await say(other, 3.0)  # the other agent: not rendered
                await asyncio.sleep(1.0)
                a0, a1 = await say(served, 3.0)
                await until(lambda: sub.audio and sub.audio[-1].at > a1 + 1.0, 10, "audio")
                await sub.stop_recording()

                answers = {
                    name: await gesture(p)
                    for name, p in (
                        ("intruder", intruder),
                        ("other agent", other),
                        ("served agent", served),
                        ("operator", operator),
                    )
                }
                again = await gesture(intruder)
        finally:
            for p in (other, served, intruder, operator):
                await p.disconnect()
        log = service.text()

    def during(t0: float, t1: float):
        video = [s.mouth for s in sub.video if t0 <= s.at <= t1]
        loud = [s for s in sub.audio if t0 <= s.at <= t1 and s.rms > 0.02]
        return video, loud

    video, loud = during(b0, b1 + 0.5)
    assert video and max(video) < OPEN and not loud, "the avatar rendered the other agent"
    video, loud = during(a0, a1 + 0.5)
    assert sum(m >= OPEN for m in video) >= 10 and loud, "the avatar did not render its agent"

    for name in ("intruder", "other agent"):
        refused = answers[name]
        assert isinstance(refused, rtc.RpcError) and refused.code == RPC_NOT_ALLOWED, (
            name,
            refused,
        )
        assert "may trigger its gestures" in refused.message
    for name in ("served agent", "operator"):
        assert isinstance(answers[name], str) and '"success"' in answers[name], answers[name]
    assert isinstance(again, rtc.RpcError) and again.code == RPC_NOT_ALLOWED
    refusals = [line for line in log.splitlines() if "refused trigger_dynamics from" in line]
    assert len(refusals) == 2, refusals  # once for each refused caller, not once per call
    assert any("'app-user'" in line for line in refusals)


async def test_a_secret_in_the_avatar_token_is_removed_server_side_before_the_join_answers(
    real_livekit, tmp_path
):
    """The official plugin's cloud mode puts its api_secret in the avatar token's attributes;
    the token has no canUpdateOwnMetadata grant. serve has LiveKit credentials: RoomService
    removes it, and a participant joining after the answer never sees it."""
    from livekit import api

    room, secret = "leaky-token", "sk-must-not-reach-the-room-000"
    token = (
        api.AccessToken(real_livekit.api_key, real_livekit.api_secret)
        .with_kind("agent")
        .with_identity(AVATAR)
        .with_name("Avatar")
        .with_grants(api.VideoGrants(room_join=True, room=room))
        .with_attributes({"lk.publish_on_behalf": "agent-a", "api_secret": secret})
        .to_jwt()
    )
    async with avatar_service(real_livekit, tmp_path) as (_, client):
        async with Subscriber(real_livekit, room, identity="early") as early:
            answer = await launch(client, real_livekit, token, room)
            assert answer.status_code == 200, answer.text
            assert "warnings" not in answer.json(), answer.json()
            async with Subscriber(real_livekit, room, identity="late") as late:
                await until(lambda: AVATAR in late.room.remote_participants, 10, "the avatar")
                seen = dict(late.room.remote_participants[AVATAR].attributes)
                assert "api_secret" not in seen, seen
                assert seen.get("lk.publish_on_behalf") == "agent-a"
            await until(
                lambda: (
                    AVATAR in early.room.remote_participants
                    and "api_secret" not in early.room.remote_participants[AVATAR].attributes
                ),
                5,
                "the secret gone for a participant who was there first",
            )
    assert secret not in answer.text
