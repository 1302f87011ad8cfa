"""An ``AsyncBithuman`` stand-in that costs (almost) nothing: precomputed frames, real pacing.

Benchmarks use it to measure what the plugin itself spends per avatar: it keeps the runtime's
contract (one frame per 1/FPS on a deadline clock, ``INPUT_SAMPLE_RATE / FPS`` samples per
talking frame, ``end_of_speech`` on a reply's last frame, interrupt/flush/stop), but draws
nothing: every frame is one of two images made once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import numpy as np


class ZeroCostRuntime:
    class settings:  # bithuman spells it so: runtime.settings.FPS
        FPS = 25
        INPUT_SAMPLE_RATE = 16000

    def __init__(self, width: int = 1280, height: int = 720) -> None:
        rng = np.random.default_rng(7)
        self._images = [rng.integers(0, 255, (height, width, 3), dtype=np.uint8) for _ in range(2)]
        self.transaction_id = uuid.uuid4().hex
        self._pcm = bytearray()
        self._ended = deque[int]()  # byte offsets in _pcm where a reply ends
        self._per_frame = 2 * self.settings.INPUT_SAMPLE_RATE // self.settings.FPS
        self._stop = asyncio.Event()
        self._index = 0

    @classmethod
    async def create(cls, **_: Any) -> ZeroCostRuntime:
        return cls()

    async def push_audio(self, data: bytes, sample_rate: int, last_chunk: bool = True) -> None:
        self._pcm += data  # the benchmarks push 16 kHz already
        if last_chunk:
            self._ended.append(len(self._pcm))

    async def flush(self) -> None:
        if not self._ended or self._ended[-1] != len(self._pcm):
            self._ended.append(len(self._pcm))

    async def push(self, control: Any) -> None:
        if control.audio is not None:
            await self.push_audio(control.audio.bytes, control.audio.sample_rate, False)
        if control.end_of_speech:
            await self.flush()

    def interrupt(self) -> None:
        self._pcm.clear()
        self._ended.clear()

    async def stop(self) -> None:
        self._stop.set()

    def cleanup(self) -> None:
        self._stop.set()

    def _regenerate_transaction_id(self) -> None:
        self.transaction_id = uuid.uuid4().hex

    async def _initialize_token(self) -> None:
        return None

    def get_first_frame(self) -> np.ndarray:
        return self._images[0]

    async def run(self) -> AsyncIterator[Any]:
        from bithuman import AudioChunk, VideoFrame

        loop = asyncio.get_running_loop()
        period = 1.0 / self.settings.FPS
        due = loop.time()
        while not self._stop.is_set():
            self._index += 1
            image = self._images[self._index % len(self._images)]
            end = self._ended[0] if self._ended else None
            limit = end if end is not None else len(self._pcm)
            if limit >= self._per_frame or (end is not None and limit > 0):
                take = min(self._per_frame, limit)
                chunk = bytes(self._pcm[:take]).ljust(self._per_frame, b"\0")
                del self._pcm[:take]
                self._ended = deque(e - take for e in self._ended)
                last = bool(self._ended) and self._ended[0] == 0
                if last:
                    self._ended.popleft()
                samples = np.frombuffer(chunk, np.int16)
                yield VideoFrame(
                    bgr_image=image,
                    audio_chunk=AudioChunk(data=samples, sample_rate=16000, last_chunk=last),
                    frame_index=self._index,
                    end_of_speech=last,
                )
            elif end == 0:
                self._ended.popleft()
                yield VideoFrame(bgr_image=image, frame_index=self._index, end_of_speech=True)
            else:
                yield VideoFrame(bgr_image=image, frame_index=self._index)
            due += period
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.5:
                due = loop.time()
