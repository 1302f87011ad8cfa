"""The Flutter join-room flow in a real room, with clients we did not write.

LiveKit's ``lk`` CLI is the app's microphone (``lk room join --publish speech.ogg``); the app
asks ``serve`` for an avatar (``POST /v1/agents/{id}/join-room`` with ``listen_to``); a real
subscriber finds the avatar by ``participant.name`` as the app does, and decodes its video.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time

import pytest

from livekit import rtc
from livekit_plugins_avatarhub.rendering.mp4 import SAMPLE_AUDIO

from livekit_real import Subscriber, clean_env, find_tool, until
from real_processes import avatar_service, join_room

pytestmark = [pytest.mark.livekit_real, pytest.mark.slow]


@pytest.fixture(scope="module")
def speech_ogg(tmp_path_factory):
    """The bundled sample as Opus in Ogg, what ``lk --publish`` takes for audio."""
    path = tmp_path_factory.mktemp("media") / "speech.ogg"
    subprocess.run(
        [
            *("ffmpeg", "-loglevel", "error", "-i", str(SAMPLE_AUDIO), "-ar", "48000", "-ac", "1"),
            *("-c:a", "libopus", "-page_duration", "20000", str(path)),
        ],
        check=True,
    )
    return path


def lk_join(server, room: str, identity: str, *publish: str) -> subprocess.Popen:
    lk = find_tool("lk")
    if lk is None:
        pytest.fail("lk is not installed: run `bash scripts/install-livekit`")
    args = [lk, "room", "join", "--url", server.url, "--api-key", server.api_key]
    args += ["--api-secret", server.api_secret, "--identity", identity]
    for path in publish:
        args += ["--publish", str(path)]
    return subprocess.Popen(
        [*args, "--exit-after-publish", room],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )


async def test_an_app_joins_the_avatar_to_its_room_and_it_lip_syncs_the_microphone(
    real_livekit, tmp_path, speech_ogg
):
    room, name = "flutter-room", "BitHuman Agent"
    async with avatar_service(real_livekit, tmp_path, "--idle-timeout", "4") as (_, client):
        async with Subscriber(real_livekit, room, identity="app-viewer") as sub:
            answer = await join_room(client, real_livekit, room, "avatar-flutter")
            assert answer.status_code == 200, answer.text
            avatar, _ = await sub.wait_track(rtc.TrackKind.KIND_VIDEO, name=name, timeout=60)
            assert answer.json()["participant_id"] == avatar.sid, "the SID the app looks up"
            sub.record(avatar)
            await until(lambda: len(sub.video) > 25, 20, "the avatar's first second")
            resting = [s.mouth for s in sub.video]
            microphone = lk_join(real_livekit, room, "app-user", speech_ogg)
            try:
                await until(lambda: microphone.poll() is not None, 60, "lk to publish the file")
            finally:
                microphone.kill()
                errors = microphone.communicate()[1].decode(errors="replace")
            # lk v2.18.2 sometimes panics on its way out ("close of closed channel") after a
            # complete publish; what matters here is that the file went out
            assert "published track" in errors, errors[-2000:]
            spoke_until = time.monotonic()
            await asyncio.sleep(1.5)
            await sub.stop_recording()
            talking = [s.mouth for s in sub.video if s.at < spoke_until]
            after = [s.mouth for s in sub.video if s.at > spoke_until + 1]
            assert statistics.mean(resting) < 0.01 and max(resting) < 0.05, "silent before"
            assert max(talking) > 0.15, "the mouth opened with the app user's speech"
            assert sum(m > 0.05 for m in talking) > 20
            assert after and max(after) < 0.05, "and rests once the speech is over"

            left = await client.post("/v1/agents/demo/leave-room", json={"room_name": room})
            assert left.status_code == 200, left.text
            await sub.wait_gone(avatar.identity)

            # idle leave: once nobody else is in the room, the avatar goes by itself
            again = await join_room(client, real_livekit, room, "avatar-flutter")
            assert again.status_code == 200, again.text
            await sub.wait_track(rtc.TrackKind.KIND_VIDEO, name=name, timeout=60)
        left_at = time.monotonic()
        lkapi = real_livekit.api()
        try:

            async def avatar_present() -> bool:
                from livekit import api

                listed = await lkapi.room.list_participants(api.ListParticipantsRequest(room=room))
                return any(p.name == name for p in listed.participants)

            while await avatar_present():
                assert time.monotonic() - left_at < 20, "the idle avatar did not leave"
                await asyncio.sleep(0.25)
        finally:
            await lkapi.aclose()
        idle = time.monotonic() - left_at
        assert 3.5 < idle < 20, f"left {idle:.1f} s after the room emptied (idle timeout 4 s)"
        # the worker finishes leaving (its tracks, its connection) a moment after LiveKit
        # stops listing it
        for _ in range(50):
            workers = (await client.get("/v1/workers")).json()["data"]
            if not workers:
                break
            await asyncio.sleep(0.2)
        assert workers == [], f"the service let the idle worker go: {workers}"


async def test_serve_dispatch_sends_a_worker_that_joins_speaks_and_leaves_when_withdrawn(
    real_livekit, tmp_path, speech_ogg
):
    """``serve --dispatch`` in front of a ``worker start`` process, on LiveKit's own dispatch.

    Both are named only by ``AVATARHUB_AGENT_NAME``, as a fleet sets it on every machine (the
    dispatch mode test sets it for the agent, the third side)."""
    from real_processes import avatar_worker

    room, name = "dispatched-room", "BitHuman Agent"
    async with (
        avatar_worker(real_livekit, tmp_path, "avatars-serve"),
        avatar_service(
            real_livekit, tmp_path, "--dispatch", AVATARHUB_AGENT_NAME="avatars-serve"
        ) as (_, client),
        Subscriber(real_livekit, room, identity="app-viewer") as sub,
    ):
        answer = await join_room(client, real_livekit, room, "avatar-dispatched")
        assert answer.status_code == 200 and answer.json()["status"] == "dispatched", answer.text
        avatar, _ = await sub.wait_track(rtc.TrackKind.KIND_VIDEO, name=name, timeout=60)
        assert avatar.identity == "avatar-dispatched"
        sub.record(avatar)
        microphone = lk_join(real_livekit, room, "app-user", speech_ogg)
        try:
            await until(lambda: microphone.poll() is not None, 60, "lk to publish the file")
        finally:
            microphone.kill()
            microphone.communicate()
        await sub.stop_recording()
        assert max(s.mouth for s in sub.video) > 0.15, "it lip-synced the app user"
        left = await client.post("/v1/agents/demo/leave-room", json={"room_name": room})
        assert left.status_code == 200, left.text
        await sub.wait_gone(avatar.identity, timeout=20)
