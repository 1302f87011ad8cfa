"""The agent's speech over LiveKit's DataStream, surviving a stream cut in the middle of a reply.

LiveKit's ``DataStreamAudioReceiver`` ends for good when a reply's byte stream breaks (the
agent's connection dropped mid-reply, a LiveKit server restarted): the avatar would stop and
leave. ``LastingReceiver`` ends the cut reply instead and listens again with a fresh receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from livekit.agents.voice.avatar import AudioReceiver, AudioSegmentEnd

from livekit import rtc

from ..log import logger

#: the DataStream topic of the agent's speech (the same in every livekit-agents 1.x)
AUDIO_STREAM_TOPIC = "lk.audio_stream"


class LastingReceiver(AudioReceiver):
    """An ``AudioReceiver`` made anew by ``make()`` whenever the current one breaks."""

    def __init__(self, make: Callable[[], AudioReceiver]) -> None:
        super().__init__()
        self._make = make
        self._inner: AudioReceiver | None = None
        self._frames: AsyncIterator[rtc.AudioFrame | AudioSegmentEnd] | None = None
        self._closed = False

    async def start(self) -> None:
        await self._open()

    async def _open(self) -> None:
        inner = self._make()
        inner.on("clear_buffer", self._clear_buffer)
        await inner.start()
        self._inner, self._frames = inner, inner.__aiter__()

    def _clear_buffer(self, *_: Any) -> None:
        self.emit("clear_buffer")

    def notify_playback_finished(self, playback_position: float, interrupted: bool) -> Any:
        assert self._inner is not None
        return self._inner.notify_playback_finished(playback_position, interrupted)

    def notify_playback_started(self) -> Any:
        started = getattr(self._inner, "notify_playback_started", None)  # livekit-agents 1.5+
        return started() if started is not None else None

    def __aiter__(self) -> AsyncIterator[rtc.AudioFrame | AudioSegmentEnd]:
        return self

    async def __anext__(self) -> rtc.AudioFrame | AudioSegmentEnd:
        assert self._inner is not None and self._frames is not None
        try:
            return await self._frames.__anext__()
        except (StopAsyncIteration, asyncio.CancelledError):
            raise
        except Exception as err:
            if self._closed:
                raise StopAsyncIteration from None
            logger.warning("the agent's speech stream broke (%s); listening again", err)
            broken, self._inner = self._inner, None
            broken.off("clear_buffer", self._clear_buffer)
            with contextlib.suppress(Exception):
                await broken.aclose()
            await self._open()
            return AudioSegmentEnd()  # the cut reply ends here

    async def aclose(self) -> None:
        self._closed = True
        if self._inner is not None:
            await self._inner.aclose()


#: how much of the agent's speech the avatar's receiver hands on at a time: LiveKit's receiver
#: waits for 100 ms by default, which the runtime then renders 80 ms late on average
SPEECH_PIECE_MS = 20


def speech_receiver(room: rtc.Room, sender: str | None) -> AudioReceiver:
    """LiveKit's receiver of the agent's speech, handing it on 20 ms at a time where the
    installed livekit-agents lets it (1.1 and later; 1.0 always waits for 100 ms)."""
    from .._compat import datastream_audio_receiver

    # a broken receiver leaves its byte stream handler behind: a new one needs the topic
    unregister = getattr(room, "unregister_byte_stream_handler", None)
    if unregister is not None:
        unregister(AUDIO_STREAM_TOPIC)
    receiver: AudioReceiver = datastream_audio_receiver(room, sender, SPEECH_PIECE_MS)
    return receiver
