"""The video generator shared by the LiveKit session and the render command.

bitHuman runtimes hand out BGR images; LiveKit wants RGB24. Each frame is converted in a single
pass into one of a small ring of preallocated buffers, and the bytes are handed to LiveKit
without another copy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import numpy as np
from livekit.agents.voice.avatar import AudioSegmentEnd, VideoGenerator

from livekit import rtc

from .._compat import maybe_await
from ..exceptions import RuntimeLoadError
from ..log import logger
from .runtime import AvatarRuntime

# LiveKit's AVSynchronizer queues up to fps * 100 ms frames; one more sits in its capture loop,
# one in the push that waits on the queue, one is being written. A buffer is rewritten only
# after RING_SPARE further frames, long after LiveKit copied it out.
RING_SPARE = 4
SYNC_QUEUE_MS = 100


def _bgr_to_rgb_converter() -> Any:
    try:
        import cv2
    except ImportError:  # pragma: no cover - opencv is a dependency; keep a numpy path anyway

        def convert(src: np.ndarray, dst: np.ndarray) -> None:
            dst[..., 0] = src[..., 2]
            dst[..., 1] = src[..., 1]
            dst[..., 2] = src[..., 0]

        return convert

    def convert_cv2(src: np.ndarray, dst: np.ndarray) -> None:
        cv2.cvtColor(src, cv2.COLOR_BGR2RGB, dst=dst)

    return convert_cv2


class FrameConverter:
    """BGR ndarray → ``rtc.VideoFrame`` (RGB24) through a ring of reused buffers."""

    def __init__(self, width: int, height: int, ring_size: int) -> None:
        self.width, self.height = width, height
        nbytes = width * height * 3
        # bytearray-backed so LiveKit takes the buffer as is (a numpy memoryview gets copied)
        self._raw = [bytearray(nbytes) for _ in range(ring_size)]
        self._views = [np.frombuffer(b, np.uint8).reshape(height, width, 3) for b in self._raw]
        self._next = 0
        self._convert = _bgr_to_rgb_converter()
        self._warned_size = False

    def __call__(self, bgr: np.ndarray) -> rtc.VideoFrame:
        i = self._next
        self._next = (i + 1) % len(self._raw)
        dst = self._views[i]
        if bgr.shape[0] != self.height or bgr.shape[1] != self.width:
            bgr = self._resize(bgr)
        self._convert(bgr, dst)
        return rtc.VideoFrame(self.width, self.height, rtc.VideoBufferType.RGB24, self._raw[i])

    def _resize(self, bgr: np.ndarray) -> np.ndarray:
        import cv2

        if not self._warned_size:
            self._warned_size = True
            logger.warning(
                "runtime frame size %dx%d differs from the published %dx%d; resizing",
                bgr.shape[1],
                bgr.shape[0],
                self.width,
                self.height,
            )
        return cv2.resize(bgr, (self.width, self.height), interpolation=cv2.INTER_AREA)


class FrameStats:
    """How rendering keeps pace: frames out, frames later than one frame period, current lag.

    Plain counters updated once per frame (read by the metrics, never locked)."""

    __slots__ = ("frames", "lag", "late", "stale")

    def __init__(self) -> None:
        self.frames = 0
        self.late = 0
        self.stale = 0  # catch-up pictures not sent (their audio was)
        self.lag = 0.0


class RuntimeVideoGenerator(VideoGenerator):
    """Drives an ``AvatarRuntime``: audio in, synchronised video and audio frames out.

    Build it with :meth:`create`, which reads the resolution once (the runtime renders a frame
    to answer) off the event loop.
    """

    def __init__(
        self, runtime: AvatarRuntime, *, width: int, height: int, live: bool = False
    ) -> None:
        self._runtime = runtime
        self._live = live
        self.last_audio_at = time.monotonic()
        self._fps = int(runtime.settings.FPS)
        self._sample_rate = int(runtime.settings.INPUT_SAMPLE_RATE)
        ring = int(self._fps * SYNC_QUEUE_MS / 1000) + RING_SPARE
        self._convert = FrameConverter(width, height, ring)
        self.stats = FrameStats()

    @classmethod
    async def create(cls, runtime: AvatarRuntime, *, live: bool = False) -> RuntimeVideoGenerator:
        """``live=True`` for a consumer that paces frames by its own clock (LiveKit's
        AvatarRunner); see :meth:`_stream` for what that changes."""
        first = await asyncio.to_thread(runtime.get_first_frame)
        if first is None or getattr(first, "ndim", 0) != 3:
            raise RuntimeLoadError(
                "the avatar runtime produced no first frame; is the model valid?"
            )
        return cls(runtime, width=int(first.shape[1]), height=int(first.shape[0]), live=live)

    @property
    def runtime(self) -> AvatarRuntime:
        return self._runtime

    @property
    def video_resolution(self) -> tuple[int, int]:
        return self._convert.width, self._convert.height

    @property
    def video_fps(self) -> int:
        return self._fps

    @property
    def audio_sample_rate(self) -> int:
        return self._sample_rate

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        if isinstance(frame, AudioSegmentEnd):
            await self._runtime.flush()
            return
        self.last_audio_at = time.monotonic()  # the avatar service's inactivity rule reads it
        await self._runtime.push_audio(frame.data.tobytes(), frame.sample_rate, last_chunk=False)

    def clear_buffer(self) -> None:
        self._runtime.interrupt()

    def __aiter__(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        return self._stream()

    async def _stream(
        self,
    ) -> AsyncGenerator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd, None]:
        """The runtime's frames, video then audio. Live, after a stall (the event loop blocked,
        say) the runtime catches up with a burst of late frames; LiveKit's synchroniser gives
        up catching up past 300 ms, so those pictures would sit in its video queue, and every
        later frame's audio behind them, for the rest of the session (+40 ms per frame of
        backlog, measured by ``bench/bench_latency.py``). So a picture that is both more than
        a period late and part of a burst is not sent; its audio is, and the mouth catches up
        with the next picture."""
        stats, period, live = self.stats, 1.0 / self._fps, self._live
        clock_start, ticks = time.monotonic(), 0
        arrived = -1.0
        async for frame in self._runtime.run():
            # render lag: how far behind the frame clock this frame arrived
            now = time.monotonic()
            burst, arrived = now - arrived < period / 2, now
            lag = now - (clock_start + ticks * period)
            ticks += 1
            if lag > 1.0 or lag < -period:  # the runtime resynced its clock: follow it
                clock_start, ticks, lag = now - period, 1, 0.0
            stats.frames += 1
            stats.lag = max(0.0, lag)
            if lag > period:
                stats.late += 1
            if frame.bgr_image is not None:
                if live and burst and lag > period:
                    stats.stale += 1
                else:
                    yield self._convert(frame.bgr_image)
            chunk = frame.audio_chunk
            if chunk is not None:
                samples = chunk.array
                yield rtc.AudioFrame(
                    data=chunk.bytes,
                    sample_rate=chunk.sample_rate,
                    num_channels=1,
                    samples_per_channel=len(samples),
                )
            if frame.end_of_speech:
                yield AudioSegmentEnd()

    async def stop(self) -> None:
        await maybe_await(self._runtime.stop())
