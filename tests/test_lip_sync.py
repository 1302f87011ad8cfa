"""Lip sync at the publisher: each picture goes out once its own sound is being heard, through
LiveKit's own synchroniser and native sources (no room needed to read what they capture)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from livekit.agents.voice.avatar import AudioSegmentEnd

from livekit import rtc
from livekit_plugins_avatarhub.rendering.demo import DemoRuntime
from livekit_plugins_avatarhub.rendering.generator import RuntimeVideoGenerator

RATE, FPS = 16000, 25
PERIOD = 1 / FPS


async def test_each_picture_leaves_while_its_sound_is_heard():
    """A runtime that renders faster than real time (catching up after a stall, say) fills
    LiveKit's 100 ms audio queue, and a picture sent with its sound would reach viewers as early
    as that queue is long. Each picture must leave when its own sound is half heard: then it is
    at most half a period off for a sound starting anywhere in its period."""
    runtime = DemoRuntime(output_size=(320, 180), realtime=False)
    generator = await RuntimeVideoGenerator.create(runtime, live=True)
    audio = rtc.AudioSource(RATE, 1, queue_size_ms=100)
    video = rtc.VideoSource(320, 180)
    sync = rtc.AVSynchronizer(audio_source=audio, video_source=video, video_fps=FPS)
    generator.watch(sync)
    heard: list[float] = []  # when each frame's sound begins to play
    shown: list[float] = []  # when each picture is captured
    capture_audio, capture_video = audio.capture_frame, video.capture_frame

    async def audio_captured(frame: rtc.AudioFrame) -> None:
        await capture_audio(frame)
        heard.append(time.monotonic() + audio.queued_duration - frame.duration)

    def video_captured(frame: rtc.VideoFrame, **kwargs: object) -> None:
        shown.append(time.monotonic())
        capture_video(frame, **kwargs)

    audio.capture_frame = audio_captured  # type: ignore[method-assign]
    video.capture_frame = video_captured  # type: ignore[method-assign]

    tone = (np.sin(np.arange(RATE) / RATE * 2 * np.pi * 300) * 12000).astype(np.int16)
    for start in range(0, tone.size, RATE // 50):  # one second of speech, all there at once
        piece = tone[start : start + RATE // 50]
        await generator.push_audio(rtc.AudioFrame(piece.tobytes(), RATE, 1, piece.size))
    await generator.push_audio(AudioSegmentEnd())

    sound_of: list[int] = []  # per picture handed on: how many sounds were handed on before it

    async def publish() -> None:  # what LiveKit's AvatarRunner does with the stream
        sounds = 0
        async for item in generator:
            if isinstance(item, AudioSegmentEnd):
                return
            if isinstance(item, rtc.AudioFrame):
                sounds += 1
            else:
                sound_of.append(sounds)
            await sync.push(item)

    try:
        await asyncio.wait_for(publish(), 5)
        await sync.wait_for_playout()
    finally:
        await generator.aclose()
        await sync.aclose()

    assert len(heard) == FPS  # a second of speech in 40 ms frames
    assert sound_of == list(range(1, FPS + 1)), "each picture follows its own sound"
    for n, (picture, sound) in enumerate(zip(shown, heard, strict=True)):
        # in the middle of its sound: at most half a period off for a sound starting anywhere
        # in it (5 ms for the clock's resolution)
        early, late = 1000 * (sound + PERIOD / 2 - picture), 1000 * (picture - sound)
        assert early < 5, f"frame {n}: the picture left {early:.0f} ms before its sound's middle"
        assert late < 2 * PERIOD * 1000, f"frame {n}: the picture left {late:.0f} ms late"
