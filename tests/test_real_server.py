"""The real LiveKit server itself, before the package meets it: media crosses it on loopback.

These are the harness's own checks: two ``livekit.rtc`` participants exchange video and
audio through ``livekit-server`` over ICE/UDP, and a bad URL or key fails the way LiveKit says.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from livekit import rtc

from livekit_real import Subscriber, until

pytestmark = pytest.mark.livekit_real


async def test_media_crosses_the_server_over_udp(real_livekit):
    room_name = "harness-media"
    publisher = rtc.Room()
    await publisher.connect(real_livekit.url, real_livekit.token("publisher", room_name))
    try:
        source = rtc.VideoSource(320, 240)
        audio = rtc.AudioSource(48000, 1)
        video_track = rtc.LocalVideoTrack.create_video_track("v", source)
        audio_track = rtc.LocalAudioTrack.create_audio_track("a", audio)
        await publisher.local_participant.publish_track(video_track)
        await publisher.local_participant.publish_track(audio_track)

        async def feed() -> None:
            red = np.zeros((240, 320, 4), np.uint8)
            red[..., 0], red[..., 3] = 220, 255
            tone = (np.sin(np.arange(480) / 480 * 2 * np.pi * 4) * 12000).astype(np.int16)
            while True:
                source.capture_frame(
                    rtc.VideoFrame(320, 240, rtc.VideoBufferType.RGBA, red.tobytes())
                )
                for _ in range(4):
                    await audio.capture_frame(rtc.AudioFrame(tone.tobytes(), 48000, 1, 480))

        feeding = asyncio.create_task(feed())
        async with Subscriber(real_livekit, room_name) as sub:
            participant, track = await sub.wait_track(
                rtc.TrackKind.KIND_VIDEO, identity="publisher"
            )
            await sub.wait_track(rtc.TrackKind.KIND_AUDIO, identity="publisher")
            sub.record(participant)
            await until(lambda: len(sub.video) >= 30 and len(sub.audio) >= 100, 20, "media")
            assert {(s.width, s.height) for s in sub.video[-5:]} == {(320, 240)}
            assert max(s.rms for s in sub.audio) > 0.1
            stats = await track.get_stats()
            pairs = [s.candidate_pair for s in stats if s.WhichOneof("stats") == "candidate_pair"]
            nominated = [p for p in pairs if p.candidate_pair.nominated]
            local = {
                s.local_candidate.candidate.protocol
                for s in stats
                if s.WhichOneof("stats") == "local_candidate"
            }
            assert nominated, "a nominated candidate pair"
            assert "udp" in local
        feeding.cancel()
    finally:
        await publisher.disconnect()


async def test_a_url_nobody_answers_fails_within_a_bounded_time():
    from livekit_real import free_port

    room = rtc.Room()
    started = time.monotonic()
    with pytest.raises(rtc.ConnectError):
        await room.connect(f"ws://127.0.0.1:{free_port()}", "x", rtc.RoomOptions(connect_timeout=5))
    assert time.monotonic() - started < 15
