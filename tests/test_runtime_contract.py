"""The runtime contract (shared/runtime-contract) as both of our runtimes must honour it."""

from __future__ import annotations

import asyncio
import time

import bithuman
import numpy as np
import pytest

from livekit_plugins_avatarhub.rendering.demo import DemoRuntime

from fakes import LEGACY_BITHUMAN, FakeBithuman, write_fake_model


@pytest.fixture(params=["demo", "fake"])
async def runtime(request, tmp_path, monkeypatch):
    if request.param == "demo":
        rt = await DemoRuntime.create(output_size=(160, 120))
    else:
        # 2.x renders at output_size; 0.8.1 at the model's own size (160x120 for this file)
        size = {} if LEGACY_BITHUMAN else {"output_size": (160, 120)}
        rt = await FakeBithuman.create(
            model_path=write_fake_model(tmp_path / "m.imx"), api_secret="secret-for-double", **size
        )
    yield rt
    rt.cleanup()


def tone(seconds: float, rate: int = 16000, amplitude: float = 0.5) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * 200 * t) * amplitude * 32767).astype(np.int16).tobytes()


async def take(rt, n: int) -> list[bithuman.VideoFrame]:
    frames = []
    async for frame in rt.run():
        frames.append(frame)
        if len(frames) == n:
            break
    return frames


async def test_frames_are_bithuman_dataclasses_paced_at_fps(runtime):
    frames, stamps = [], []
    async for frame in runtime.run():
        frames.append(frame)
        stamps.append(time.monotonic())
        if len(frames) == 26:
            break
    elapsed = stamps[-1] - stamps[0]  # the first frame may include one-off setup
    assert all(isinstance(f, bithuman.VideoFrame) for f in frames)
    assert runtime.settings.FPS == 25 and runtime.settings.INPUT_SAMPLE_RATE == 16000
    # 25 frame intervals at 25 FPS is one second
    assert 0.9 < elapsed < 1.5
    idle = frames[0]
    assert idle.audio_chunk is None and idle.bgr_image.shape == (120, 160, 3)
    assert idle.bgr_image.dtype == np.uint8


async def test_talking_frames_carry_one_frame_of_audio_and_end_of_speech(runtime):
    await runtime.push_audio(tone(0.5), 16000, last_chunk=False)
    await runtime.flush()
    frames = await take(runtime, 15)
    talking = [f for f in frames if f.audio_chunk is not None]
    assert len(talking) == 13  # 8000 samples → 12.5 frames, the last padded
    assert all(isinstance(f.audio_chunk, bithuman.AudioChunk) for f in talking)
    assert all(len(f.audio_chunk.array) == 640 for f in talking)
    assert [f.end_of_speech for f in frames].count(True) == 1
    assert talking[-1].end_of_speech
    pcm = np.concatenate([f.audio_chunk.array for f in talking])
    assert np.array_equal(pcm[:8000], np.frombuffer(tone(0.5), np.int16))
    assert not pcm[8000:].any()


async def test_audio_at_another_rate_is_resampled(runtime):
    await runtime.push_audio(tone(0.4, rate=48000), 48000, last_chunk=True)
    frames = await take(runtime, 12)
    talking = [f for f in frames if f.audio_chunk is not None]
    assert len(talking) == 10 and talking[-1].end_of_speech


async def test_interrupt_drops_the_reply_without_end_of_speech(runtime):
    await runtime.push_audio(tone(2.0), 16000, last_chunk=False)
    await runtime.flush()
    frames = []
    async for frame in runtime.run():
        frames.append(frame)
        if len(frames) == 5:
            runtime.interrupt()
        if len(frames) == 10:
            break
    assert all(f.audio_chunk is not None for f in frames[:5])
    assert all(f.audio_chunk is None and not f.end_of_speech for f in frames[5:])


async def test_flush_after_audio_drained_still_ends_speech(runtime):
    await runtime.push_audio(tone(0.08), 16000, last_chunk=False)
    frames = await take(runtime, 3)
    assert [f.audio_chunk is not None for f in frames] == [True, True, False]
    await runtime.flush()
    frames = await take(runtime, 2)
    assert frames[0].end_of_speech and frames[0].audio_chunk is None


async def test_stop_ends_run_and_cleanup_is_idempotent(runtime):
    async def consume():
        return len(await take(runtime, 10_000))

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.2)
    await runtime.stop()
    await runtime.stop()
    assert await asyncio.wait_for(task, 1) < 20
    runtime.cleanup()
    runtime.cleanup()


async def test_first_frame_matches_output_size(runtime):
    frame = await asyncio.to_thread(runtime.get_first_frame)
    assert frame.shape == (120, 160, 3) and frame.dtype == np.uint8


async def test_video_control_carries_audio_and_end_of_speech(runtime):
    chunk = bithuman.AudioChunk(
        data=np.frombuffer(tone(0.2), np.int16), sample_rate=16000, last_chunk=False
    )
    await runtime.push(bithuman.VideoControl(audio=chunk))
    await runtime.push(bithuman.VideoControl(end_of_speech=True))
    frames = await take(runtime, 6)
    assert [f.audio_chunk is not None for f in frames] == [True] * 5 + [False]
    assert frames[4].end_of_speech
