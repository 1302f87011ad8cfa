"""The video generator shared by the LiveKit session and the render command.

bitHuman runtimes hand out BGR images; LiveKit wants RGB24. Each frame is converted in a single
pass into one of a small ring of preallocated buffers, and the bytes are handed to LiveKit
without another copy.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import Any

import numpy as np
from livekit.agents.voice.avatar import AudioSegmentEnd, VideoGenerator

from livekit import rtc

from .._compat import maybe_await
from ..exceptions import RuntimeLoadError
from ..log import logger
from .failover import AvatarState, AvatarStateChanged, Failover, PendingAudio
from .runtime import AvatarRuntime

# LiveKit's AVSynchronizer queues up to fps * 100 ms frames; one more sits in its capture loop,
# one in the push that waits on the queue, one is being written. A buffer is rewritten only
# after RING_SPARE further frames, long after LiveKit copied it out.
RING_SPARE = 4
SYNC_QUEUE_MS = 100
# a reopened runtime that renders this long has recovered: a later failure starts afresh
HEALTHY_SECONDS = 30.0
# playback latencies a FrameStats keeps for its readers (replies last a second or more, and the
# readers look every few seconds)
LATENCIES_KEPT = 64
#: the metrics' histogram buckets for them, seconds (bitHuman's docs promise 0.1-0.2 s a reply)
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0)
FIRST_FRAME_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


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
    """How rendering keeps pace, for the metrics: plain counters updated a few operations per
    frame (read by the metrics at scrape time, never locked).

    ``late``: frames more than one frame period behind the frame clock; ``stale``: pictures
    not sent at all (their audio was; see :meth:`RuntimeVideoGenerator._render`);
    ``playback_latency``: per reply, the agent's first audio frame in → the first frame
    carrying it out (the last :data:`LATENCIES_KEPT` kept, ``replies`` counts them all);
    ``first_frame``: ``begun_at`` → the first picture out; ``av_offset``: at the publisher,
    how much later the last spoken frame's picture goes out than the middle of its audio
    (< 0: the picture leads; see :meth:`RuntimeVideoGenerator._in_step`)."""

    __slots__ = (
        "av_offset",
        "begun_at",
        "first_frame",
        "fps",
        "frames",
        "lag",
        "late",
        "playback_latency",
        "replies",
        "stale",
    )

    def __init__(self, fps: int = 25, begun_at: float | None = None) -> None:
        self.fps = fps
        self.frames = 0
        self.late = 0
        self.stale = 0  # catch-up pictures not sent (their audio was)
        self.lag = 0.0
        self.begun_at = time.monotonic() if begun_at is None else begun_at
        self.first_frame: float | None = None
        self.playback_latency: deque[float] = deque(maxlen=LATENCIES_KEPT)
        self.replies = 0
        self.av_offset = 0.0

    @property
    def rendered_seconds(self) -> float:
        """Time the runtime has rendered (what bitHuman bills, idle frames included)."""
        return self.frames / self.fps if self.fps else 0.0

    def latencies_since(self, seen: int) -> list[float]:
        """The playback latencies of the replies after the first ``seen`` (for a reader that
        keeps its own count: the service at each scrape, a job's reporter)."""
        new = min(self.replies - seen, len(self.playback_latency))
        return list(self.playback_latency)[-new:] if new > 0 else []


class RuntimeVideoGenerator(VideoGenerator):
    """Drives an ``AvatarRuntime``: audio in, synchronised video and audio frames out.

    Build it with :meth:`create`, which reads the resolution once (the runtime renders a frame
    to answer) off the event loop. Live, a runtime that fails does not end the stream: the
    speech goes on as plain audio (see :mod:`.failover`).
    """

    def __init__(
        self,
        runtime: AvatarRuntime,
        *,
        width: int,
        height: int,
        live: bool = False,
        failover: Failover | None = None,
        still: np.ndarray | None = None,
        begun_at: float | None = None,
    ) -> None:
        self._runtime = runtime
        self._live = live
        self.last_audio_at = time.monotonic()
        self._fps = int(runtime.settings.FPS)
        self._sample_rate = int(runtime.settings.INPUT_SAMPLE_RATE)
        ring = int(self._fps * SYNC_QUEUE_MS / 1000) + RING_SPARE
        self._convert = FrameConverter(width, height, ring)
        self.stats = FrameStats(self._fps, begun_at)
        self._reply_in: float | None = None  # a reply's first audio in, until it goes out
        self._hearing = False  # a reply's audio is coming in
        self._playing = False  # a reply's audio is going out
        self._queues: tuple[Any, Any] | None = None  # LiveKit's video queue and audio source
        self._pacer: Any = None  # LiveKit's video pacing
        self._failover = failover or Failover()
        self._still = still  # BGR: shown while the speech goes on without the runtime
        self._pending = PendingAudio()
        self._state: AvatarState = "rendering"
        self._broken: str | None = None  # why the runtime is to be given up, once noticed
        self._wake: asyncio.Queue[Any] | None = None  # the frame queue being waited on
        self._replacement: AvatarRuntime | None = None
        self._recovery: asyncio.Task[None] | None = None
        self._stopping = False
        self._failed_at = 0.0
        self._back_at: float | None = None  # when a reopened runtime last took over
        self._attempts = 0  # to bring the runtime back, since it last rendered for a while
        self._retired: str | None = None  # why rendering was stopped on purpose
        self._off_runtime = asyncio.Event()  # set while the stream reads no runtime
        self._off_runtime.set()

    @classmethod
    async def create(
        cls,
        runtime: AvatarRuntime,
        *,
        live: bool = False,
        failover: Failover | None = None,
        begun_at: float | None = None,
    ) -> RuntimeVideoGenerator:
        """``live=True`` for a consumer that paces frames by its own clock (LiveKit's
        AvatarRunner); see :meth:`_render` for what that changes. ``begun_at``
        (``time.monotonic()``) is when the avatar was asked for: its time to first frame
        counts from there."""
        first = await asyncio.to_thread(runtime.get_first_frame)
        if first is None or getattr(first, "ndim", 0) != 3:
            raise RuntimeLoadError(
                "the avatar runtime produced no first frame; is the model valid?"
            )
        return cls(
            runtime,
            width=int(first.shape[1]),
            height=int(first.shape[0]),
            live=live,
            failover=failover,
            still=first if live else None,
            begun_at=begun_at,
        )

    @property
    def runtime(self) -> AvatarRuntime:
        return self._runtime

    @property
    def state(self) -> AvatarState:
        """``rendering``, or the speech goes on without the runtime (``recovering``,
        ``audio_only``)."""
        return self._state

    @property
    def video_resolution(self) -> tuple[int, int]:
        return self._convert.width, self._convert.height

    @property
    def video_fps(self) -> int:
        return self._fps

    @property
    def audio_sample_rate(self) -> int:
        return self._sample_rate

    def watch(self, sync: rtc.AVSynchronizer) -> None:
        """Read the publisher's audio/video offset off ``sync``'s queues (see
        :class:`FrameStats`); LiveKit keeps them private, so any it lacks reads as empty."""
        self._queues = (getattr(sync, "_video_queue", None), getattr(sync, "_audio_source", None))
        self._pacer = getattr(sync, "_fps_controller", None)

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        live, rendering = self._live, self._state == "rendering"
        if isinstance(frame, AudioSegmentEnd):
            self._hearing = False
            if live:
                self._pending.end()
            if rendering:
                await self._to_runtime(self._runtime.flush())
            return
        self.last_audio_at = now = time.monotonic()  # the service's inactivity rule reads it
        if not self._hearing:  # a reply begins: its playback latency counts from here, unless
            self._hearing = True  # it waits behind the one still playing
            self._reply_in = None if self._playing else now
        if live:
            self._pending.add(frame)  # a reference: kept until the runtime plays it back
        if rendering:
            data = frame.data.tobytes()
            await self._to_runtime(self._runtime.push_audio(data, frame.sample_rate, False))

    async def _to_runtime(self, call: Awaitable[None]) -> None:
        if not self._live:
            await call
            return
        try:
            await call
        except Exception as err:  # the runtime is broken: the stream notices and goes on
            self._give_up_runtime(f"the runtime raised {type(err).__name__}: {err}")

    def clear_buffer(self) -> None:
        self._pending.clear()
        self._hearing = self._playing = False
        self._reply_in = None
        if self._state == "rendering":
            try:
                self._runtime.interrupt()
            except Exception as err:
                if not self._live:
                    raise
                self._give_up_runtime(f"the runtime raised {type(err).__name__}: {err}")

    def __aiter__(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        return self._stream() if self._live else self._render(self._runtime.run())

    async def _stream(
        self,
    ) -> AsyncGenerator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd, None]:
        """Live: the runtime's frames while it works, the speech alone while it does not."""
        while not self._stopping:
            if self._state == "rendering":
                async for item in self._render(self._watched(self._runtime)):
                    yield item
                if self._stopping:
                    return
                self._fail(self._broken or "the runtime stopped producing frames")
            async for item in self._speech_alone():
                yield item

    async def _watched(self, runtime: AvatarRuntime) -> AsyncGenerator[Any, None]:
        """``runtime.run()``'s frames until it raises, ends, or stalls for ``stall_seconds``
        (then :attr:`_broken` says why). A separate task reads the runtime so that a stall
        can be noticed; a timer checks four times per stall window."""
        loop = asyncio.get_running_loop()
        frames: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
        stall = self._failover.stall_seconds
        asked_at: list[float | None] = [None]  # when the reader began waiting for a frame

        async def read() -> None:
            iterator = runtime.run().__aiter__()
            try:
                while True:
                    asked_at[0] = time.monotonic()
                    frame = await iterator.__anext__()
                    asked_at[0] = None
                    await frames.put(frame)
            except StopAsyncIteration:
                self._give_up_runtime("the runtime stopped producing frames")
            except Exception as err:
                self._give_up_runtime(f"the runtime raised {type(err).__name__}: {err}")

        def check(due: float) -> None:
            now = time.monotonic()
            waiting = asked_at[0]
            if now - due > stall / 4:  # the event loop itself was held: not the runtime's fault
                if waiting is not None:
                    asked_at[0] = now
            elif waiting is not None and now - waiting > stall:
                self._give_up_runtime(f"the runtime produced no frame for {now - waiting:.1f} s")
                return
            timer[0] = loop.call_later(stall / 4, check, now + stall / 4)

        self._broken, self._wake = None, frames
        self._off_runtime.clear()
        reader = asyncio.create_task(read(), name="avatarhub-runtime-frames")
        timer = [loop.call_later(stall / 4, check, time.monotonic() + stall / 4)]
        try:
            while self._broken is None and not self._stopping:
                frame = await frames.get()
                if frame is not _WAKE and self._broken is None:
                    yield frame
        finally:
            timer[0].cancel()
            self._wake = None
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            self._off_runtime.set()

    def _give_up_runtime(self, reason: str) -> None:
        if self._broken is None and not self._stopping:
            self._broken = reason
        self._nudge()

    def _nudge(self) -> None:
        """Wake the stream if it waits for a runtime frame that will not come."""
        wake = self._wake
        if wake is not None and wake.empty():
            wake.put_nowait(_WAKE)

    async def retire(self, reason: str) -> None:
        """Stop rendering on purpose (a cost guard): the speech goes on as plain audio, no
        runtime is reopened, and once this returns the runtime is no longer read, so its
        owner may free it. :meth:`resume` renders again."""
        self._retired = reason
        recovery, self._recovery = self._recovery, None
        if recovery is not None:
            recovery.cancel()
        self._replacement = None
        if self._state == "rendering":
            self._give_up_runtime(reason)
            await self._off_runtime.wait()
            if self._state == "rendering":  # the stream was not running: say so here
                self._set_state("audio_only", reason)
        elif self._state == "recovering":
            self._set_state("audio_only", reason)

    def resume(self, reason: str) -> None:
        """Render again after :meth:`retire`: reopen the runtime, take over between replies."""
        if self._retired is None or self._failover.reopen is None or self._stopping:
            return
        self._retired, self._attempts = None, 0
        self._set_state("recovering", reason)
        self._recovery = asyncio.create_task(self._recover(), name="avatarhub-recover")

    def _fail(self, reason: str) -> None:
        if self._retired is not None:
            if self._state == "rendering":  # retire() may have said it already
                self._set_state("audio_only", self._retired)
            return
        self._failed_at = now = time.monotonic()
        if self._back_at is None or now - self._back_at > HEALTHY_SECONDS:
            self._attempts = 0  # a runtime that failed again at once used an attempt
        new: AvatarState = "recovering" if self._failover.reopen is not None else "audio_only"
        self._set_state(new, reason)
        if self._failover.reopen is not None:
            self._recovery = asyncio.create_task(self._recover(), name="avatarhub-recover")

    def _set_state(self, new: AvatarState, reason: str) -> None:
        old, self._state = self._state, new
        if new == "rendering":
            logger.info("the avatar renders again: %s", reason)
        elif self._retired is not None or (new == "recovering" and old == "audio_only"):
            logger.info("the avatar: %s", reason)
        elif old == "rendering":
            logger.warning(
                "the avatar stopped rendering (%s); the agent's speech goes on as plain audio%s",
                reason,
                ", trying to bring the avatar back" if new == "recovering" else "",
            )
        else:
            logger.error("the avatar could not be brought back (%s); audio only from now", reason)
        callback = self._failover.on_state_changed
        if callback is not None:
            try:
                callback(AvatarStateChanged(old, new, reason))
            except Exception:
                logger.exception("an avatar_state_changed handler failed")

    async def _recover(self) -> None:
        failover = self._failover
        assert failover.reopen is not None
        last = "the runtime failed again"
        while self._attempts < failover.attempts:
            attempt, self._attempts = self._attempts, self._attempts + 1
            await asyncio.sleep(failover.delay(attempt))
            try:
                runtime = await failover.reopen()
            except Exception as err:
                last = f"{type(err).__name__}: {err}"
                logger.warning("attempt %d to bring the avatar back failed: %s", attempt + 1, last)
                continue
            self._replacement = runtime
            self._nudge()
            return
        self._set_state("audio_only", f"{failover.attempts} attempts failed, the last: {last}")

    async def _speech_alone(
        self,
    ) -> AsyncGenerator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd, None]:
        """What the runtime would have sent, without it: each frame period a still picture and
        that period's share of the speech (the part the runtime did not play first). Paced like
        a runtime, so LiveKit's synchroniser sees nothing unusual; until a reopened runtime can
        take over between replies."""
        pending, resample = self._pending, _Resamplers(self._sample_rate)
        still = self._still_frame()
        period = 1.0 / self._fps
        loop = asyncio.get_running_loop()
        due, budget = loop.time(), 0.0
        while not self._stopping:
            if still is not None:
                yield still
            budget = period + min(budget, 0.0)  # an unused share is not saved up
            while budget > 0 and pending:
                item = pending.pop()
                if item is None:
                    for frame in resample.flush():
                        yield frame
                    self._playing = False
                    yield AudioSegmentEnd()
                    continue
                budget -= item.duration
                self._audio_out(time.monotonic())
                for frame in resample(item):
                    yield frame
            if not pending and not pending.in_reply and self._replacement is not None:
                self._take_over()
                return
            due += period
            wait = due - loop.time()
            if wait < -0.5:  # the host stalled: count again rather than burst
                due = loop.time()
            elif wait > 0:
                await asyncio.sleep(wait)

    def _still_frame(self) -> rtc.VideoFrame | None:
        """The picture shown while the runtime is away: its first frame, converted once."""
        if self._still is None:
            return None
        width, height = self.video_resolution
        converter = FrameConverter(width, height, 1)
        return converter(self._still)

    def _take_over(self) -> None:
        runtime, self._replacement = self._replacement, None
        assert runtime is not None
        self._runtime = runtime
        self._back_at = now = time.monotonic()
        outage = now - self._failed_at
        self._set_state("rendering", f"a reopened runtime took over after {outage:.1f} s")

    async def _render(
        self, frames: AsyncIterator[Any]
    ) -> AsyncGenerator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd, None]:
        """The runtime's frames, video then audio. Live, after a stall (the event loop blocked,
        say) the runtime catches up with a burst of late frames; LiveKit's synchroniser gives
        up catching up past 300 ms, so those pictures would sit in its video queue, and every
        later frame's audio behind them, for the rest of the session (+40 ms per frame of
        backlog, measured by ``bench/bench_latency.py``). So a picture that is both more than
        a period late and part of a burst is not sent; its audio is, and the mouth catches up
        with the next picture."""
        stats, period, live = self.stats, 1.0 / self._fps, self._live
        pending = self._pending
        clock_start, ticks = time.monotonic(), 0
        arrived = -1.0
        async for frame in frames:
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
            picture = None
            if frame.bgr_image is not None:
                if live and burst and lag > period:
                    stats.stale += 1
                else:
                    if stats.first_frame is None:
                        stats.first_frame = now - stats.begun_at
                    picture = self._convert(frame.bgr_image)
            chunk = frame.audio_chunk
            if chunk is not None:
                samples = chunk.array
                self._audio_out(now)
                if live:
                    pending.played(len(samples), chunk.sample_rate)
                # the sound first, then its picture once that sound is being heard
                yield rtc.AudioFrame(
                    data=chunk.bytes,
                    sample_rate=chunk.sample_rate,
                    num_channels=1,
                    samples_per_channel=len(samples),
                )
                if picture is not None and self._queues is not None:
                    duration = len(samples) / chunk.sample_rate
                    stats.av_offset = await self._in_step(duration, period)
            if picture is not None:
                yield picture
            if frame.end_of_speech:
                self._playing = False
                if live:
                    pending.played_end()
                yield AudioSegmentEnd()

    def _audio_out(self, now: float) -> None:
        """A frame of a reply's audio goes out: that reply's playback latency, once."""
        self._playing = True
        began = self._reply_in
        if began is not None:
            self._reply_in = None
            self.stats.playback_latency.append(now - began)
            self.stats.replies += 1

    async def _in_step(self, duration: float, period: float) -> float:
        """Hold a picture until half of its audio (``duration``, just queued) has been heard,
        and say how much later than its audio the picture leaves (> 0: the picture is late).

        A picture shows what its period of audio says: shown in the middle of that audio, it
        is at most half a period early or late for a sound that begins anywhere inside. LiveKit
        sends audio in real time from a queue of up to 100 ms and captures a picture at once,
        so a picture sent with its audio reached viewers as early as that queue was long
        (70-125 ms at a real subscriber, on a busy machine). The hold also paces a runtime's
        catch-up burst out at real time rather than filling LiveKit's queues with it."""
        assert self._queues is not None
        video, audio = self._queues
        queued = float(getattr(audio, "queued_duration", 0.0) or 0.0)
        start = time.monotonic() + queued - duration  # when this audio begins to be heard
        hold = min(queued - duration / 2, SYNC_QUEUE_MS / 1000 + period)
        if hold > 0:
            await asyncio.sleep(hold)
        self._send_now()
        ahead = video.qsize() if video is not None else 0  # pictures LiveKit has yet to send
        return time.monotonic() + max(0.0, ahead - 0.5) * period - start - duration / 2

    def _send_now(self) -> None:
        """Let LiveKit send the next picture as soon as it has it.

        LiveKit's synchroniser sends pictures on a frame clock of its own whose phase is set by
        the first picture of the session: against it, a picture timed to its sound waited
        0-40 ms more, a different amount each session (measured: 7 ms late at a subscriber
        in one session, 48 ms in the next). Pictures timed here are a period apart already."""
        pacer = self._pacer
        due = getattr(pacer, "_next_frame_time", None)
        if isinstance(due, float) and due > time.perf_counter():
            pacer._next_frame_time = time.perf_counter()

    async def aclose(self) -> None:
        """End the stream and any attempt to bring the runtime back (the runtime is left to
        its owner)."""
        self._stopping = True
        recovery, self._recovery = self._recovery, None
        if recovery is not None:
            recovery.cancel()
            await asyncio.gather(recovery, return_exceptions=True)
        self._nudge()

    async def stop(self) -> None:
        await self.aclose()
        try:
            await maybe_await(self._runtime.stop())
        except Exception:
            if not self._live or self._state == "rendering":
                raise  # a runtime that failed already may fail to stop too


class _Resamplers:
    """Speech kept at the agent's rate, played at the track's (LiveKit's native resampler)."""

    def __init__(self, rate: int) -> None:
        self._rate = rate
        self._by_rate: dict[int, rtc.AudioResampler] = {}

    def __call__(self, frame: rtc.AudioFrame) -> list[rtc.AudioFrame]:
        if frame.sample_rate == self._rate:
            return [frame]
        resampler = self._by_rate.get(frame.sample_rate)
        if resampler is None:
            resampler = rtc.AudioResampler(frame.sample_rate, self._rate, num_channels=1)
            self._by_rate[frame.sample_rate] = resampler
        return list(resampler.push(frame))

    def flush(self) -> list[rtc.AudioFrame]:
        return [frame for resampler in self._by_rate.values() for frame in resampler.flush()]


_WAKE = object()  # put in a waited-on queue to make the stream look again
