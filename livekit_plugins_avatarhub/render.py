"""Render an audio file through an avatar into an MP4 (H.264 + AAC), offline.

It drives the same ``RuntimeVideoGenerator`` a LiveKit session uses, so what the file shows is
what a room would see. The MP4 is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from livekit.agents.voice.avatar import AudioSegmentEnd

from livekit import rtc

from .exceptions import ConfigurationError, ModelFileError
from .generator import RuntimeVideoGenerator
from .runtime import AvatarRuntime

SAMPLE_AUDIO = Path(__file__).with_name("assets") / "hello.wav"
_PUSH_MS = 20


@dataclass(frozen=True)
class RenderResult:
    path: Path
    frames: int
    fps: int
    width: int
    height: int
    audio_seconds: float


def decode_audio(path: Path, sample_rate: int) -> Iterator[np.ndarray]:
    """Any audio file PyAV can read, as int16 mono blocks at ``sample_rate``."""
    import av

    try:
        container = av.open(str(path))
    except (av.error.FileNotFoundError, FileNotFoundError):
        raise ModelFileError(f"audio file {path} does not exist") from None
    except av.error.InvalidDataError:
        raise ConfigurationError(f"{path} is not an audio file PyAV can read") from None
    with container:
        if not container.streams.audio:
            raise ConfigurationError(f"{path} has no audio stream")
        resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
        for frame in container.decode(audio=0):
            for out in resampler.resample(frame):
                yield out.to_ndarray().reshape(-1)
        for out in resampler.resample(None):
            yield out.to_ndarray().reshape(-1)


async def render(
    runtime: AvatarRuntime,
    audio: Path,
    output: Path,
    *,
    crf: int = 23,
    on_frame: Callable[[int, int], None] | None = None,
) -> RenderResult:
    """Render ``audio`` through ``runtime`` into ``output`` (MP4). ``on_frame(done, total)``."""

    generator = await RuntimeVideoGenerator.create(runtime)
    rate = generator.audio_sample_rate
    fps = generator.video_fps
    width, height = generator.video_resolution
    blocks = await asyncio.to_thread(lambda: list(decode_audio(audio, rate)))
    samples = int(sum(b.size for b in blocks))
    if samples == 0:
        raise ConfigurationError(f"{audio} contains no audio")
    per_frame = rate // fps
    expected_frames = -(-samples // per_frame)

    output = await asyncio.to_thread(output.expanduser)
    if await asyncio.to_thread(output.is_dir):
        raise ConfigurationError(f"{output} is a directory; give the MP4 file to write (-o)")
    await asyncio.to_thread(output.parent.mkdir, parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.{os.getpid()}.part")
    # all audio first: the runtime queues it, so no idle frame slips in before the speech
    chunk = rate * _PUSH_MS // 1000
    for block in blocks:
        for start in range(0, block.size, chunk):
            part = block[start : start + chunk]
            await generator.push_audio(rtc.AudioFrame(part.tobytes(), rate, 1, part.size))
    await generator.push_audio(AudioSegmentEnd())

    encoder = await asyncio.to_thread(_Mp4Writer, partial, width, height, fps, rate, crf)
    frames = 0
    try:
        async for item in generator:
            if isinstance(item, AudioSegmentEnd):
                break
            if isinstance(item, rtc.VideoFrame):
                await asyncio.to_thread(encoder.video, item.data)
                frames += 1
                if on_frame is not None:
                    on_frame(frames, expected_frames)
            elif isinstance(item, rtc.AudioFrame):
                await asyncio.to_thread(encoder.audio, item.data)
        await asyncio.to_thread(encoder.close)
        await asyncio.to_thread(os.replace, partial, output)
    finally:
        encoder.abort()
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        await generator.stop()
    return RenderResult(output, frames, fps, width, height, samples / rate)


class _Mp4Writer:
    """H.264 + AAC muxing with PyAV; every method blocks, so callers use a worker thread."""

    def __init__(self, path: Path, width: int, height: int, fps: int, rate: int, crf: int) -> None:
        import av

        self._av = av
        self._width, self._height, self._rate = width, height, rate
        self._container = av.open(str(path), "w", format="mp4")
        self._video = self._container.add_stream("libx264", rate=fps)
        self._video.width, self._video.height, self._video.pix_fmt = width, height, "yuv420p"
        self._video.options = {"crf": str(crf), "preset": "veryfast"}
        self._audio: Any = self._container.add_stream("aac", rate=rate)
        self._audio.layout = "mono"
        self._frames = 0
        self._samples = 0
        self._open = True

    def video(self, rgb: Any) -> None:
        import cv2

        image = np.frombuffer(rgb, np.uint8).reshape(self._height, self._width, 3)
        # the encoder's own format, converted by OpenCV (SIMD) rather than by swscale
        yuv: Any = cv2.cvtColor(image, cv2.COLOR_RGB2YUV_I420)  # uint8, (height * 3 / 2, width)
        frame = self._av.VideoFrame.from_ndarray(yuv, format="yuv420p")
        frame.pts = self._frames
        self._frames += 1
        self._container.mux(self._video.encode(frame))

    def audio(self, pcm: Any) -> None:
        samples = np.frombuffer(pcm, np.int16).reshape(1, -1)
        frame = self._av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = self._rate
        frame.pts = self._samples
        self._samples += samples.shape[1]
        self._container.mux(self._audio.encode(frame))

    def close(self) -> None:
        self._container.mux(self._video.encode(None))
        self._container.mux(self._audio.encode(None))
        self._container.close()
        self._open = False

    def abort(self) -> None:
        if self._open:
            self._open = False
            with contextlib.suppress(Exception):
                self._container.close()
