"""One avatar in one room, as its own participant.

The worker connects with the token it was given, renders the audio it receives (LiveKit's
DataStream avatar protocol: ``lk.audio_stream`` in, ``lk.playback_started`` /
``lk.playback_finished`` back, ``lk.clear_buffer`` honoured; or a named participant's
microphone) and publishes video and audio. The cloud dynamics RPC ``trigger_dynamics`` pushes
``VideoControl(action=...)``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from livekit.agents.voice.avatar import AudioReceiver, AvatarRunner

from livekit import rtc

from ..generator import RuntimeVideoGenerator
from ..loader import OpenedAvatar
from ..log import logger
from ..publish import VideoPublishOptions, avatar_runner
from ..runtime import AvatarRuntime

RPC_TRIGGER_DYNAMICS = "trigger_dynamics"

#: (agent_id, model) → the avatar loaded and its model file leased (``loader.open_avatar``)
AvatarOpener = Callable[[str, "str | None"], Awaitable[OpenedAvatar]]
RoomFactory = Callable[[], Any]


class AvatarWorker:
    """Lifecycle: ``start()`` (connect, load, publish) … ``stopped`` resolves; ``stop()``."""

    def __init__(
        self,
        *,
        agent_id: str,
        room_url: str,
        token: str,
        model: str | None = None,
        listen_to: str | None = None,
        opener: AvatarOpener,
        room_factory: RoomFactory = rtc.Room,
        video_options: VideoPublishOptions | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.model = model
        self.listen_to = listen_to
        self._room_url = room_url
        self._token = token
        self._opener = opener
        self._room_factory = room_factory
        self._video_options = video_options or VideoPublishOptions()
        self.room: Any = None
        self._opened: OpenedAvatar | None = None
        self._runner: AvatarRunner | None = None
        self._watch: asyncio.Task[None] | None = None
        self.stopped: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.error: str | None = None
        self._closing = False

    @property
    def runtime(self) -> AvatarRuntime | None:
        return self._opened.runtime if self._opened is not None else None

    def __repr__(self) -> str:  # the token is a credential: never shown
        return f"AvatarWorker(agent_id={self.agent_id!r}, room_url={self._room_url!r})"

    async def start(self) -> None:
        """Load the avatar and join the room; raises if either fails (nothing is left running)."""
        try:
            self._opened = await self._opener(self.agent_id, self.model)
            generator = await RuntimeVideoGenerator.create(self._opened.runtime)
            self.room = self._room_factory()
            await self.room.connect(self._room_url, self._token)
            self.room.on("disconnected", self._on_disconnected)
            self.room.local_participant.register_rpc_method(RPC_TRIGGER_DYNAMICS, self._on_trigger)
        except BaseException:
            await self._cleanup()
            raise
        receiver = self._receiver(generator.audio_sample_rate)
        self._runner = avatar_runner(self.room, generator, receiver, self._video_options)
        # the runner waits for the agent (or microphone) to show up: don't hold the caller
        self._watch = asyncio.create_task(self._run(), name=f"avatar-{self.agent_id}")

    def _receiver(self, sample_rate: int) -> AudioReceiver:
        if self.listen_to:
            from .microphone import MicrophoneAudioReceiver

            return MicrophoneAudioReceiver(self.room, self.listen_to, sample_rate=sample_rate)
        from livekit.agents.voice.avatar import DataStreamAudioReceiver

        return DataStreamAudioReceiver(self.room)

    async def _run(self) -> None:
        assert self._runner is not None
        try:
            await self._runner.start()
            await _wait_for_complete(self._runner)
            if not self._closing:
                raise RuntimeError("the avatar stopped rendering")
        except asyncio.CancelledError:
            pass
        except Exception as err:  # reported through .error and the service's worker list
            self.error = f"{type(err).__name__}: {err}"
            logger.error("avatar worker %s crashed: %s", self.agent_id, self.error)
        finally:
            await self._cleanup()

    def _on_disconnected(self, *_: Any) -> None:
        if not self._closing:
            logger.info("room closed; stopping avatar %s", self.agent_id)
            asyncio.get_running_loop().create_task(self.stop())

    async def _on_trigger(self, data: rtc.RpcInvocationData) -> str:
        try:
            payload = json.loads(data.payload or "{}")
            action = payload.get("action") if isinstance(payload, dict) else None
        except ValueError:
            action = None
        if not isinstance(action, str) or not action:
            return json.dumps({"success": False, "error": 'payload must be {"action": "<name>"}'})
        if self.runtime is None:
            return json.dumps({"success": False, "error": "the avatar is not running"})
        from bithuman import VideoControl

        await self.runtime.push(VideoControl(action=action))
        return json.dumps({"success": True, "action": action})

    async def stop(self) -> None:
        self._closing = True
        if self._watch is not None and not self._watch.done():
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        # a task cancelled before its first step never runs its ``finally``: clean up here too
        await self._cleanup()

    async def _cleanup(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None and getattr(runner, "_read_audio_atask", None) is not None:
            await runner.aclose()  # AvatarRunner.aclose() before start() raises
        opened, self._opened = self._opened, None
        if opened is not None:
            await opened.aclose()
        room, self.room = self.room, None
        if room is not None:
            room.off("disconnected", self._on_disconnected)
            await room.disconnect()
        if not self.stopped.done():
            self.stopped.set_result(None)


async def _wait_for_complete(runner: AvatarRunner) -> None:
    """``AvatarRunner.wait_for_complete`` arrived in livekit-agents 1.1; before it, its tasks."""
    wait = getattr(runner, "wait_for_complete", None)
    if wait is not None:
        await wait()
        return
    tasks = [
        t
        for t in (
            getattr(runner, "_read_audio_atask", None),
            getattr(runner, "_forward_video_atask", None),
        )
        if t is not None
    ]
    await asyncio.gather(*tasks)
