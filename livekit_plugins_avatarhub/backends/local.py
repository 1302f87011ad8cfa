"""``mode="local"``: the avatar renders in the agent's process and the agent publishes it.

The runtime (prewarmed, or opened from the session's ``AvatarSource``) feeds LiveKit's
``AvatarRunner`` through our video generator; the AgentSession's speech reaches it through a
queue. LiveKit's server never delivers a participant's RPC to itself, so bitHuman's documented
``trigger_dynamics`` call to ``avatar_identity`` (here: the agent) is answered in the process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from livekit import rtc

from .. import _compat
from .._retry import RetryPolicy
from ..exceptions import AvatarHubError
from ..log import logger
from ..remote.protocol import RPC_TRIGGER_DYNAMICS, Push, handle
from ..rendering.failover import AvatarState, Failover, OnStateChanged
from ..rendering.generator import RuntimeVideoGenerator
from ..rendering.loader import OpenedAvatar, open_source
from ..rendering.publish import VideoPublishOptions, avatar_runner, close_runner
from ..rendering.runtime import AvatarRuntime, renew_for_job
from ..rendering.source import AvatarSource
from .base import Attach, LiveKitKeys
from .relay import nobody_but_agents

if TYPE_CHECKING:
    from bithuman import VideoControl
    from livekit.agents import AgentSession
    from livekit.agents.voice.avatar import AvatarRunner

    from ..hub.resolver import AvatarResolver


class LocalBackend:
    """One avatar rendered here: load, run, answer gestures, close mid-reply cleanly."""

    own_participant = False

    def __init__(
        self,
        *,
        source: AvatarSource | None,
        runtime: AvatarRuntime | None,
        resolver: AvatarResolver | None,
        retry: RetryPolicy,
        timeout: float,
        video_options: VideoPublishOptions,
        fallback_identity: str,
        on_state_changed: OnStateChanged | None = None,
        max_session_seconds: float | None = None,
        idle_timeout: float = 0.0,
    ) -> None:
        self._source, self._runtime = source, runtime
        self._given = runtime is not None  # the caller's: reused, never freed here
        self._resolver, self._retry, self._timeout = resolver, retry, timeout
        self._video_options = video_options
        self._fallback_identity = fallback_identity
        self._opened: OpenedAvatar | None = None  # what this backend loaded (runtime + lease)
        self._runner: AvatarRunner | None = None
        self.generator: RuntimeVideoGenerator | None = None
        self._audio_sink: Any = None
        self._stop_answering: Callable[[], None] | None = None
        self.on_state_changed = on_state_changed
        self._max_session_seconds, self._idle_timeout = max_session_seconds, idle_timeout
        self._guards: list[asyncio.Task[None]] = []
        self._room: rtc.Room | None = None

    @property
    def runtime(self) -> AvatarRuntime | None:
        return self._runtime

    @property
    def avatar_state(self) -> AvatarState:
        return self.generator.state if self.generator is not None else "rendering"

    def identity(self, room: rtc.Room | None) -> str:
        if room is not None:  # the agent's own participant publishes the avatar
            try:
                return str(room.local_participant.identity)
            except Exception:  # not connected yet
                pass
        return self._fallback_identity

    async def push(self, control: VideoControl) -> None:
        if self._runtime is None and self.generator is None:
            raise AvatarHubError("the avatar runtime is not loaded yet; call start() first")
        if self.generator is not None and self.generator.state != "rendering":
            raise AvatarHubError(
                f"the avatar is not rendering ({self.generator.state}): the agent speaks as "
                "plain audio, and gestures wait until the avatar is back"
            )
        assert self._runtime is not None
        await self._runtime.push(control)

    async def _trigger(self, action: str, force: bool) -> None:
        from bithuman import VideoControl

        await self.push(VideoControl(action=action, force_action=force))

    async def start(
        self, agent_session: AgentSession[Any], room: rtc.Room, keys: LiveKitKeys, attach: Attach
    ) -> None:
        """Load the runtime, then route the agent's speech through it into ``room``. The
        LiveKit credentials are not needed: the agent's own connection publishes."""
        begun_at = time.monotonic()  # its time to first frame counts from here
        try:
            runtime = await self._load_runtime()
            failover = Failover(reopen=self._reopen, on_state_changed=self.on_state_changed)
            generator = await RuntimeVideoGenerator.create(
                runtime, live=True, failover=failover, begun_at=begun_at
            )
        except BaseException:
            await self._release_runtime()
            raise
        self.generator = generator
        await attach()
        audio_sink = _compat.queue_audio_output(generator.audio_sample_rate)
        self._audio_sink = audio_sink
        self._runner = avatar_runner(room, generator, audio_sink, self._video_options)
        await self._runner.start()
        _compat.replace_audio_output(agent_session, audio_sink)
        self._stop_answering = answer_in_process(room.local_participant, self._trigger)
        self._room = room
        if self._max_session_seconds:
            self._guards.append(asyncio.create_task(self._end_session(self._max_session_seconds)))
        if self._idle_timeout > 0:
            self._guards.append(asyncio.create_task(self._pause_when_alone(room)))
        logger.info(
            "avatar started",
            extra={
                "avatar": self._source.name if self._source else type(runtime).__name__,
                "size": "x".join(map(str, generator.video_resolution)),
                "fps": generator.video_fps,
            },
        )

    async def _load_runtime(self) -> AvatarRuntime:
        if self._runtime is not None:  # prewarmed: make it ready for this job
            await renew_for_job(self._runtime)
            return self._runtime
        assert self._source is not None
        self._opened = await open_source(
            self._source, resolver=self._resolver, retry=self._retry, timeout=self._timeout
        )
        self._runtime = self._opened.runtime
        return self._runtime

    async def _reopen(self) -> AvatarRuntime:
        """A runtime to render with again after the last one failed: loaded afresh when it
        was loaded here (the model is in the cache by now), else the caller's, interrupted."""
        if self._source is None or self._given:
            assert self._runtime is not None
            self._runtime.interrupt()
            return self._runtime
        failed, self._opened = self._opened, None
        if failed is not None:  # (None: the last attempt freed it, then failed to load)
            try:
                await failed.aclose()
            except Exception as err:  # a broken runtime may fail to clean up: free the lease
                failed.release()
                logger.debug("freeing the failed runtime: %s", err)
        self._opened = await open_source(
            self._source, resolver=self._resolver, retry=self._retry, timeout=self._timeout
        )
        self._runtime = self._opened.runtime
        await asyncio.to_thread(self._runtime.get_first_frame)  # renders, or raises here
        return self._runtime

    async def _end_session(self, seconds: float) -> None:
        """The session's time limit: stop rendering for good (the agent speaks on)."""
        await asyncio.sleep(seconds)
        await self._stop_rendering(f"the session limit of {seconds:g} s was reached")
        self._guards = [t for t in self._guards if t is not asyncio.current_task()]
        for guard in self._guards:  # nothing to pause or resume any more
            guard.cancel()

    async def _pause_when_alone(self, room: rtc.Room) -> None:
        """Nobody but agents in the room for ``idle_timeout`` s: stop rendering and free the
        runtime; render again when someone joins."""
        timeout = self._idle_timeout
        check = min(5.0, timeout / 4)
        alone_since: float | None = None
        paused = False
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(check)
            now = loop.time()
            if not nobody_but_agents(room):
                alone_since = None
                if paused and self.generator is not None:
                    paused = False
                    self.generator.resume("someone joined the room: rendering again")
                continue
            alone_since = alone_since or now
            if not paused and now - alone_since >= timeout:
                paused = True
                await self._stop_rendering(f"nobody but agents in the room for {timeout:g} s")

    async def _stop_rendering(self, reason: str) -> None:
        generator = self.generator
        if generator is None:
            return
        await generator.retire(reason)
        await self._release_runtime()

    async def _release_runtime(self) -> None:
        opened, self._opened = self._opened, None
        if opened is not None:  # loaded here: free the runtime and the model's lease
            self._runtime = None
            await opened.aclose()
        elif self._runtime is not None:  # the caller's (runtime=): stop talking, keep it
            self._runtime.interrupt()

    async def aclose(self) -> None:
        """Stop rendering and free what was loaded; a runtime passed in stays usable."""
        guards, self._guards = self._guards, []
        for guard in guards:
            guard.cancel()
        await asyncio.gather(*guards, return_exceptions=True)
        stop_answering, self._stop_answering = self._stop_answering, None
        if stop_answering is not None:
            stop_answering()
        if self.generator is not None:
            await self.generator.aclose()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await close_runner(runner)
            # a reply cut off by the close must still end for the AgentSession
            position = float(getattr(runner, "_playback_position", 0.0) or 0.0)
            _compat.finish_interrupted_playback(self._audio_sink, position)
        await self._release_runtime()


def answer_in_process(participant: rtc.LocalParticipant, push: Push) -> Callable[[], None]:
    """Answer ``trigger_dynamics`` as ``participant``, its own calls included; returns undo."""

    async def on_call(data: rtc.RpcInvocationData) -> str:
        return await handle(data.payload, push)

    participant.register_rpc_method(RPC_TRIGGER_DYNAMICS, on_call)
    through_livekit = participant.perform_rpc

    async def perform_rpc(
        *, destination_identity: str, method: str, payload: str, **kw: Any
    ) -> str:
        if destination_identity == participant.identity and method == RPC_TRIGGER_DYNAMICS:
            # the avatar renders here: LiveKit would not route this call back to its sender
            logger.debug("trigger_dynamics to the avatar in this process")
            return await handle(payload, push)
        return await through_livekit(
            destination_identity=destination_identity, method=method, payload=payload, **kw
        )

    participant.perform_rpc = perform_rpc  # type: ignore[method-assign]

    def undo() -> None:
        if participant.__dict__.get("perform_rpc") is perform_rpc:
            del participant.perform_rpc
        try:
            participant.unregister_rpc_method(RPC_TRIGGER_DYNAMICS)
        except Exception:  # the room is gone already
            pass

    return undo
