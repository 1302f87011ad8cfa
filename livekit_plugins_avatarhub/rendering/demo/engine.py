"""The paced engine behind the demo avatar: audio in, ``bithuman.VideoFrame`` out at FPS.

``PacedRuntime`` implements the timing half of the runtime contract (``runtime.py``): audio
queueing, one frame per 1/FPS, ``sample_rate / FPS`` samples per talking frame, ``end_of_speech``
on a reply's last frame, interrupt/flush/stop. A subclass only draws pixels (``render``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ...log import logger

if TYPE_CHECKING:
    from bithuman import VideoControl, VideoFrame


@dataclass(frozen=True)
class RuntimeSettings:
    FPS: int = 25
    INPUT_SAMPLE_RATE: int = 16000


@dataclass
class _Segment:
    samples: np.ndarray  # int16 mono at INPUT_SAMPLE_RATE
    message_id: str
    last: bool


@dataclass(frozen=True)
class FrameState:
    """What one frame has to show; handed to ``PacedRuntime.render``."""

    index: int
    mouth: float  # 0 (closed) .. 1 (wide open)
    action: str | None
    action_progress: float  # 0..1 through the current action
    talking: bool


def resample_int16(samples: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Linear resampling; good enough to drive lips, and exact when the rates match."""
    if src_rate == dst_rate or samples.size == 0:
        return samples
    n_out = max(1, round(samples.size * dst_rate / src_rate))
    positions = np.linspace(0, samples.size - 1, n_out)
    resampled: np.ndarray = np.interp(positions, np.arange(samples.size), samples).astype(np.int16)
    return resampled


class PacedRuntime:
    """Audio in, paced ``bithuman.VideoFrame`` out. Subclasses implement :meth:`render`.

    Rendering runs on one worker thread per runtime so the event loop never waits on pixels;
    queue bookkeeping stays on the loop, so no locks are needed.
    """

    #: action name → length in seconds; subclasses list what they can perform.
    ACTIONS: dict[str, float] = {}

    def __init__(
        self,
        *,
        fps: int = 25,
        sample_rate: int = 16000,
        output_size: tuple[int, int] = (1280, 720),
        realtime: bool = True,
    ) -> None:
        self.settings = RuntimeSettings(FPS=fps, INPUT_SAMPLE_RATE=sample_rate)
        self.output_size = output_size
        self.transaction_id = uuid.uuid4().hex
        self._realtime = realtime
        self._samples_per_frame = sample_rate // fps
        self._queue: deque[_Segment] = deque()
        self._message_id: str | None = None  # the reply being spoken, None when idle
        self._pending_end = False  # flush() arrived after the reply's audio was consumed
        self._action: tuple[str, int, int] | None = None  # name, start frame, length in frames
        self._frame_index = 0
        self._mouth = 0.0
        self._stopped = asyncio.Event()
        self._closed = False
        self._executor: ThreadPoolExecutor | None = None

    # -- the contract -----------------------------------------------------------------------

    async def push_audio(self, data: bytes, sample_rate: int, last_chunk: bool = True) -> None:
        samples = np.frombuffer(data, dtype=np.int16)
        samples = resample_int16(samples, sample_rate, self.settings.INPUT_SAMPLE_RATE)
        if self._message_id is None:
            self._message_id = str(uuid.uuid4())
        self._queue.append(_Segment(samples, self._message_id, last_chunk))
        if last_chunk:
            self._message_id = None

    async def flush(self) -> None:
        """End the current reply: its last frame will carry ``end_of_speech``."""
        if self._message_id is None:
            return
        if self._queue and self._queue[-1].message_id == self._message_id:
            self._queue[-1].last = True
        else:
            self._pending_end = True
        self._message_id = None

    async def push(self, control: VideoControl) -> None:
        if control.action:
            # bithuman types action as str | list[str]; a list plays its first gesture
            action = control.action if isinstance(control.action, str) else control.action[0]
            self._start_action(action, control.force_action)
        if control.audio is not None:
            await self.push_audio(
                control.audio.bytes, control.audio.sample_rate, control.audio.last_chunk
            )
        if control.end_of_speech:
            await self.flush()

    def interrupt(self) -> None:
        """Drop the reply being spoken; keep running."""
        self._queue.clear()
        self._message_id = None
        self._pending_end = False

    async def stop(self) -> None:
        self._stopped.set()

    async def shutdown(self) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stopped.set()
        self.interrupt()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _regenerate_transaction_id(self) -> None:
        self.transaction_id = uuid.uuid4().hex

    async def _initialize_token(self) -> None:
        return None

    def get_first_frame(self) -> np.ndarray | None:
        return self.render(FrameState(0, 0.0, None, 0.0, False))

    async def run(self) -> AsyncIterator[VideoFrame]:
        from bithuman import AudioChunk, VideoFrame

        loop = asyncio.get_running_loop()
        period = 1.0 / self.settings.FPS
        deadline = loop.time()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=type(self).__name__)
        while not self._stopped.is_set():
            samples, message_id, end = self._take_audio()
            state = self._next_state(samples)
            image = await loop.run_in_executor(self._executor, self.render, state)
            chunk = None
            if samples is not None:
                chunk = AudioChunk(
                    data=samples, sample_rate=self.settings.INPUT_SAMPLE_RATE, last_chunk=end
                )
            yield VideoFrame(
                bgr_image=image,
                audio_chunk=chunk,
                frame_index=state.index,
                source_message_id=message_id,
                end_of_speech=end,
            )
            if not self._realtime:
                continue
            deadline += period
            delay = deadline - loop.time()
            if delay < -5 * period:  # fell far behind (suspended host): resync, don't burst
                deadline = loop.time()
            elif delay > 0:
                try:
                    await asyncio.wait_for(self._stopped.wait(), delay)
                except asyncio.TimeoutError:
                    pass

    # -- for subclasses --------------------------------------------------------------------

    def render(self, state: FrameState) -> np.ndarray:
        """Return a (H, W, 3) uint8 BGR image for ``state``. Called on a worker thread."""
        raise NotImplementedError

    # -- internals -------------------------------------------------------------------------

    def _start_action(self, name: str, force: bool = False) -> None:
        seconds = self.ACTIONS.get(name)
        if seconds is None:
            logger.debug("ignoring unknown action %r (known: %s)", name, sorted(self.ACTIONS))
            return
        if self._action is not None and not force and self._action[0] == name:
            return  # already performing it
        self._action = (name, self._frame_index, max(1, round(seconds * self.settings.FPS)))

    def _take_audio(self) -> tuple[np.ndarray | None, str | None, bool]:
        """One frame's worth of audio: never mixes two replies; pads the last frame of one."""
        if not self._queue:
            if self._pending_end:
                self._pending_end = False
                return None, None, True
            return None, None, False
        need = self._samples_per_frame
        parts: list[np.ndarray] = []
        message_id = self._queue[0].message_id
        end = False
        while need and self._queue and self._queue[0].message_id == message_id:
            head = self._queue[0]
            take = head.samples[:need]
            parts.append(take)
            need -= take.size
            if take.size == head.samples.size:
                self._queue.popleft()
                if head.last:
                    end = True
                    break
            else:
                head.samples = head.samples[take.size :]
        if need and not end and not self._queue and self._message_id == message_id:
            # Starved mid-reply: put the partial frame back and wait for more audio, so
            # talking frames always carry exactly sample_rate / FPS samples.
            got = np.concatenate(parts) if len(parts) > 1 else parts[0]
            self._queue.appendleft(_Segment(got, message_id, False))
            return None, None, False
        if need:
            parts.append(np.zeros(need, dtype=np.int16))
        samples = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return samples, message_id, end

    def _next_state(self, samples: np.ndarray | None) -> FrameState:
        index = self._frame_index
        self._frame_index += 1
        if samples is not None and samples.size:
            rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) / 32768.0
            db = 20.0 * np.log10(max(rms, 1e-6))
            target = float(np.clip((db + 50.0) / 30.0, 0.0, 1.0))
        else:
            target = 0.0
        # fast attack, slower release: lips snap open and settle closed
        self._mouth = target if target > self._mouth else self._mouth * 0.45 + target * 0.55
        if self._mouth < 0.02:
            self._mouth = 0.0
        action, progress = None, 0.0
        if self._action is not None:
            name, start, length = self._action
            done = index - start
            if done >= length:
                self._action = None
            else:
                action, progress = name, done / length
        return FrameState(index, self._mouth, action, progress, samples is not None)
