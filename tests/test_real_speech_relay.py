"""The agent's speech as a remote avatar hears it: LiveKit's own agent-side output
(``DataStreamAudioOutput``) through a real server into the avatar's receiver."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from livekit import rtc
from livekit_plugins_avatarhub._compat import receiver_takes_frame_size
from livekit_plugins_avatarhub.remote.receiver import speech_receiver

pytestmark = pytest.mark.livekit_real

RATE = 24000
PIECE = RATE // 50  # the 20 ms frames a streaming TTS sends


async def test_the_avatar_hears_each_20_ms_of_speech_as_it_arrives(real_livekit):
    """A reply's first 20 ms reaches the runtime as soon as it arrives, not once 100 ms of
    it are there (LiveKit's receiver waits for 100 ms frames unless told otherwise)."""
    from livekit.agents.voice.avatar import AudioSegmentEnd, DataStreamAudioOutput

    if not receiver_takes_frame_size():
        pytest.skip("livekit-agents 1.0's receiver always waits for 100 ms of speech")

    room_name = "speech-relay"
    agent, avatar = rtc.Room(), rtc.Room()
    await avatar.connect(real_livekit.url, real_livekit.token("avatar", room_name))
    await agent.connect(real_livekit.url, real_livekit.token("agent", room_name))
    receiver = speech_receiver(avatar, "agent")
    await receiver.start()
    output = DataStreamAudioOutput(
        agent, destination_identity="avatar", sample_rate=RATE, wait_remote_track=None
    )
    heard: list[tuple[float, int]] = []

    async def listen() -> None:
        async for frame in receiver:
            if isinstance(frame, AudioSegmentEnd):
                return
            heard.append((time.monotonic(), frame.samples_per_channel))

    listening = asyncio.create_task(listen())
    try:
        await asyncio.sleep(1.0)  # both ends see each other
        tone = (np.sin(np.arange(PIECE) / RATE * 2 * np.pi * 300) * 8000).astype(np.int16)
        sent: list[float] = []
        for _ in range(10):  # 200 ms of speech at the pace it is spoken
            sent.append(time.monotonic())
            await output.capture_frame(rtc.AudioFrame(tone.tobytes(), RATE, 1, PIECE))
            await asyncio.sleep(0.02)
        output.flush()
        await asyncio.wait_for(listening, 10)
        assert sum(n for _, n in heard) == 10 * PIECE  # nothing lost, nothing added
        # the first 20 ms is heard before the third piece is even sent
        first = heard[0][0] - sent[0]
        assert heard[0][1] <= PIECE, heard[0]
        assert first < 0.04, f"the first 20 ms reached the avatar after {first * 1000:.0f} ms"
    finally:
        listening.cancel()
        await receiver.aclose()
        await agent.disconnect()
        await avatar.disconnect()
