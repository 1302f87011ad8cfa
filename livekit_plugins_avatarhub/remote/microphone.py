"""Audio from a participant's microphone track, for clients that speak to the avatar directly.

The Flutter join-room flow has no agent streaming ``lk.audio_stream``: the avatar lip-syncs to a
named participant's microphone. Speech segments end after a stretch of silence.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from livekit.agents import utils
from livekit.agents.voice.avatar import AudioReceiver, AudioSegmentEnd

from livekit import rtc

from ..log import logger


class MicrophoneAudioReceiver(AudioReceiver):
    def __init__(
        self,
        room: rtc.Room,
        identity: str,
        *,
        sample_rate: int = 16000,
        silence_threshold: float = 0.01,
        silence_seconds: float = 0.6,
    ) -> None:
        super().__init__()
        self._room = room
        self._identity = identity
        self._sample_rate = sample_rate
        self._threshold = silence_threshold * 32768
        self._silence_seconds = silence_seconds
        self._ch = utils.aio.Chan[rtc.AudioFrame | AudioSegmentEnd]()
        self._task: asyncio.Task[None] | None = None
        self._track_ready: asyncio.Future[rtc.Track] | None = None

    async def start(self) -> None:
        self._track_ready = asyncio.get_running_loop().create_future()
        self._room.on("track_subscribed", self._on_track)
        for participant in list(self._room.remote_participants.values()):
            if participant.identity != self._identity:
                continue
            for publication in participant.track_publications.values():
                if publication.track is not None:
                    self._on_track(publication.track, publication, participant)
        self._task = asyncio.create_task(self._pump())

    def _on_track(self, track: Any, publication: Any, participant: Any) -> None:
        if (
            participant.identity == self._identity
            and getattr(track, "kind", None) == rtc.TrackKind.KIND_AUDIO
            and self._track_ready is not None
            and not self._track_ready.done()
        ):
            self._track_ready.set_result(track)

    async def _pump(self) -> None:
        assert self._track_ready is not None
        track = await self._track_ready
        logger.info("lip-syncing to the microphone of %s", self._identity)
        stream = rtc.AudioStream(track, sample_rate=self._sample_rate, num_channels=1)
        speaking = False
        quiet = 0.0
        try:
            async for event in stream:
                frame = event.frame
                samples = np.frombuffer(frame.data, np.int16)
                loud = (
                    samples.size
                    and float(np.sqrt(np.mean(samples.astype(np.float32) ** 2))) > self._threshold
                )
                if loud:
                    speaking, quiet = True, 0.0
                elif speaking:
                    quiet += frame.duration
                if speaking:
                    await self._ch.send(frame)
                    if quiet >= self._silence_seconds:
                        speaking = False
                        await self._ch.send(AudioSegmentEnd())
        finally:
            await stream.aclose()

    def notify_playback_finished(self, playback_position: float, interrupted: bool) -> None:
        return None

    def notify_playback_started(self) -> None:
        return None

    def __aiter__(self) -> AsyncIterator[rtc.AudioFrame | AudioSegmentEnd]:
        return self._ch

    async def aclose(self) -> None:
        self._room.off("track_subscribed", self._on_track)
        self._ch.close()
        task, self._task = self._task, None  # its CancelledError would hold this receiver
        if task is not None:
            await utils.aio.cancel_and_wait(task)
