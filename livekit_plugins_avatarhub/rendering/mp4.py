"""Render an audio file through an avatar into an MP4 (H.264 + AAC), offline.

It drives the same ``RuntimeVideoGenerator`` a LiveKit session uses, so what the file shows is
what a room would see. The MP4 is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from livekit.agents.voice.avatar import AudioSegmentEnd

from livekit import rtc

from ..exceptions import ConfigurationError, ModelFileError
from .generator import RuntimeVideoGenerator
from .runtime import AvatarRuntime

SAMPLE_AUDIO = Path(__file__).with_name("assets") / "hello.wav"
# libx264: superfast at CRF 26 encodes faster than veryfast at 23 with higher PSNR and SSIM and
# its deblocking filter kept, into a larger file (bench/bench_render.py)
DEFAULT_PRESET = "superfast"
DEFAULT_CRF = 26
_PUSH_MS = 20
#: encoder calls queued while the next frame is drawn (0: draw and encode take turns)
PIPELINE_DEPTH = 3
#: libx264's presets, fastest first: faster ones encode sooner into larger files
PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
)


@dataclass(frozen=True)
class Encoder:
    """libx264's options, checked once (:func:`check_encoder`) before anything is loaded."""

    preset: str = DEFAULT_PRESET
    crf: int = DEFAULT_CRF


def check_preset(preset: str) -> str:
    if preset not in PRESETS:
        raise ConfigurationError(f"preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    return preset


def check_crf(crf: int) -> int:
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise ConfigurationError(f"crf must be a whole number from 0 to 51, not {crf!r}")
    return crf


def check_encoder(preset: str = DEFAULT_PRESET, crf: int = DEFAULT_CRF) -> Encoder:
    return Encoder(check_preset(preset), check_crf(crf))


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
    crf: int = DEFAULT_CRF,
    preset: str = DEFAULT_PRESET,
    encoder: Encoder | None = None,
    on_frame: Callable[[int, int], None] | None = None,
) -> RenderResult:
    """Render ``audio`` through ``runtime`` into ``output`` (MP4). ``on_frame(done, total)``.

    ``crf`` (0-51, lower is better and larger) and ``preset`` (:data:`PRESETS`) are libx264's;
    an ``encoder`` from :func:`check_encoder` is taken as already checked.
    """
    if encoder is None:
        encoder = check_encoder(preset, crf)
    crf, preset = encoder.crf, encoder.preset
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

    writer = await asyncio.to_thread(_Mp4Writer, partial, width, height, fps, rate, crf, preset)
    # one thread per stream, each fed in order while the next frame is drawn: drawing, H.264
    # and AAC overlap instead of taking turns; a failure on either stops both
    failed = threading.Event()
    video_line = _Pipeline(PIPELINE_DEPTH, failed)
    audio_line = _Pipeline(PIPELINE_DEPTH, failed)
    frames = 0
    try:
        async for item in generator:
            if isinstance(item, AudioSegmentEnd):
                break
            if isinstance(item, rtc.VideoFrame):
                # converted here, so the generator's reused buffer is free once this returns
                await video_line.submit(writer.video, writer.to_i420(item.data))
                frames += 1
                if on_frame is not None:
                    on_frame(frames, expected_frames)
            elif isinstance(item, rtc.AudioFrame):
                await audio_line.submit(writer.audio, bytes(item.data))
        await audio_line.drain()
        await video_line.submit(writer.close)
        await video_line.drain()
        await asyncio.to_thread(os.replace, partial, output)
    finally:
        # nothing touches the writer after this
        await asyncio.gather(video_line.close(), audio_line.close())
        writer.abort()
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        await generator.stop()
    return RenderResult(output, frames, fps, width, height, samples / rate)


class _Pipeline:
    """Calls run in submission order on one worker thread, at most ``depth`` waiting. Once a
    call fails (here or on a pipeline sharing ``failed``), the calls not yet started are
    skipped: nothing touches a broken encoder."""

    def __init__(self, depth: int, failed: threading.Event) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="avatarhub-render")
        self._pending: deque[asyncio.Future[None]] = deque()
        self._depth = depth
        self._failed = failed

    def _run(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        if self._failed.is_set():
            return
        try:
            fn(*args)
        except BaseException:
            self._failed.set()
            raise

    async def submit(self, fn: Callable[..., None], *args: Any) -> None:
        loop = asyncio.get_running_loop()
        self._pending.append(loop.run_in_executor(self._executor, self._run, fn, args))
        while len(self._pending) > self._depth or (self._pending and self._pending[0].done()):
            await self._pending.popleft()  # raises the first failure

    async def drain(self) -> None:
        while self._pending:
            await self._pending.popleft()

    async def close(self) -> None:
        """Wait for whatever is running or queued (failures were reported already)."""
        for future in self._pending:
            future.cancel()  # not started yet: never runs
        await asyncio.gather(*self._pending, return_exceptions=True)
        self._pending.clear()
        await asyncio.to_thread(self._executor.shutdown, wait=True)


class _Mp4Writer:
    """H.264 + AAC muxing with PyAV. The methods that encode block, so they run on worker
    threads: ``video`` on one, ``audio`` on another (separate codecs), the muxer shared under
    a lock."""

    def __init__(
        self, path: Path, width: int, height: int, fps: int, rate: int, crf: int, preset: str
    ) -> None:
        import av

        self._av = av
        self._width, self._height, self._rate = width, height, rate
        self._container = av.open(str(path), "w", format="mp4")
        self._video = self._container.add_stream("libx264", rate=fps)
        self._video.width, self._video.height, self._video.pix_fmt = width, height, "yuv420p"
        self._video.options = {"crf": str(crf), "preset": preset}
        self._audio: Any = self._container.add_stream("aac", rate=rate)
        self._audio.layout = "mono"
        # both encoders opened and the header written here, before the two threads start: left
        # to the first mux, PyAV opens every stream's encoder then, the audio one included,
        # while the audio thread may be opening it too (a broken file, or a crash, now and then)
        self._container.start_encoding()
        self._frames = 0
        self._samples = 0
        self._open = True
        self._mux = threading.Lock()

    def to_i420(self, rgb: Any) -> np.ndarray:
        """The encoder's own format, converted by OpenCV (SIMD) rather than by swscale."""
        import cv2

        image = np.frombuffer(rgb, np.uint8).reshape(self._height, self._width, 3)
        yuv: np.ndarray = cv2.cvtColor(image, cv2.COLOR_RGB2YUV_I420)  # (height * 3 / 2, width)
        return yuv

    def video(self, yuv: np.ndarray) -> None:
        frame = self._av.VideoFrame.from_ndarray(yuv, format="yuv420p")
        frame.pts = self._frames
        self._frames += 1
        packets = self._video.encode(frame)
        with self._mux:
            self._container.mux(packets)

    def audio(self, pcm: bytes) -> None:
        samples = np.frombuffer(pcm, np.int16).reshape(1, -1)
        frame = self._av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = self._rate
        frame.pts = self._samples
        self._samples += samples.shape[1]
        packets = self._audio.encode(frame)
        with self._mux:
            self._container.mux(packets)

    def close(self) -> None:
        with self._mux:
            self._container.mux(self._video.encode(None))
            self._container.mux(self._audio.encode(None))
            self._container.close()
            self._open = False

    def abort(self) -> None:
        with self._mux:
            if not self._open:
                return
            self._open = False
            with contextlib.suppress(Exception):
                self._container.close()
