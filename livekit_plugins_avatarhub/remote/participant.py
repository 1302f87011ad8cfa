"""One avatar in one room, as its own participant.

The worker connects with the token it was given, renders the audio it receives (LiveKit's
DataStream avatar protocol: ``lk.audio_stream`` in, ``lk.playback_started`` /
``lk.playback_finished`` back, ``lk.clear_buffer`` honoured; or a named participant's
microphone) and publishes video and audio. The cloud dynamics RPC ``trigger_dynamics`` pushes
``VideoControl(action=...)`` and answers in bitHuman's documented shape.

Right after joining it takes the display name it was asked for and removes an ``api_secret``
attribute (LiveKit's bithuman plugin copies its secret into the avatar token, where everyone
in the room could read it); both need the token's ``canUpdateOwnMetadata`` grant, and what
could not be done is reported in ``warnings``. It leaves by itself when the room has had no
other participant and no audio for ``idle_timeout`` seconds, and rides out LiveKit's
reconnects (``reconnecting`` meanwhile).

It serves one participant (:attr:`AvatarWorker.serves`): the ``listen_to`` microphone, else the
agent named by its own ``lk.publish_on_behalf`` attribute (every launch path sets it). Only
that participant's audio is rendered, and only that participant, plus the identities the
operator allows (``allow_gestures_from``, ``AVATARHUB_ALLOW_GESTURES_FROM``), may trigger its
gestures; anyone else gets an RPC error. Without either, it follows LiveKit's rule: the first
agent participant, and gestures from agent participants only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from livekit.agents.voice.avatar import AudioReceiver, AvatarRunner

from livekit import rtc

from ..config import livekit_settings, session_limit_setting, tighter
from ..exceptions import AvatarHubError
from ..log import logger
from ..rendering.failover import AvatarState, AvatarStateChanged, Failover
from ..rendering.generator import FrameStats, RuntimeVideoGenerator
from ..rendering.loader import OpenedAvatar
from ..rendering.publish import VideoPublishOptions, avatar_runner, close_runner, leave_room
from ..rendering.runtime import AvatarRuntime
from .protocol import (
    DEFAULT_IDLE_TIMEOUT,
    RPC_NOT_ALLOWED,
    RPC_TRIGGER_DYNAMICS,
    gesture_callers,
    handle,
)
from .server_api import http_url, same_server
from .tokens import token_claims, token_room

#: what LiveKit's bithuman plugin puts in the avatar token's attributes besides the agent's id
_LEAKED_ATTRIBUTES = ("api_secret",)

#: (agent_id, model) → the avatar loaded and its model file leased (``loader.open_avatar``)
AvatarOpener = Callable[[str, "str | None"], Awaitable[OpenedAvatar]]
RoomFactory = Callable[[], Any]


class AvatarWorker:
    """Lifecycle: ``start()`` (connect, load, publish) … ``stopped`` resolves; ``stop()``.

    With ``token`` the worker connects ``room_factory()``'s room itself (the avatar service);
    without, the room comes connected (a LiveKit job's, see ``avatar_jobs``).
    """

    def __init__(
        self,
        *,
        agent_id: str,
        room_url: str | None = None,
        token: str | None = None,
        model: str | None = None,
        listen_to: str | None = None,
        participant_name: str | None = None,
        opener: AvatarOpener,
        room_factory: RoomFactory = rtc.Room,
        video_options: VideoPublishOptions | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        allow_gestures_from: Iterable[str] = (),
        max_session_seconds: float | None = None,
    ) -> None:
        self.agent_id = agent_id
        #: leave after this long: the request's limit, within the operator's
        #: (``AVATARHUB_MAX_SESSION_SECONDS``, ``--max-session-seconds``)
        self.max_session_seconds = tighter(max_session_seconds, session_limit_setting())
        self.model = model
        self.listen_to = listen_to
        self.participant_name = participant_name
        self.idle_timeout = idle_timeout
        #: who may trigger gestures besides the participant it serves
        self.allowed = gesture_callers(allow_gestures_from)
        #: the participant whose audio it renders (decided once it has joined)
        self.serves: str | None = listen_to
        self._refused: set[str] = set()
        self.participant_sid: str | None = None
        self.warnings: list[str] = []
        self.reconnecting = False
        #: rendering, or the agent's speech goes on without the runtime (and why)
        self.avatar_state: AvatarState = "rendering"
        self.avatar_state_reason: str | None = None
        self._generator: RuntimeVideoGenerator | None = None
        self._idle: asyncio.Task[None] | None = None
        self._limit: asyncio.Task[None] | None = None
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
    def frame_stats(self) -> FrameStats | None:
        return self._generator.stats if self._generator is not None else None

    @property
    def runtime(self) -> AvatarRuntime | None:
        return self._opened.runtime if self._opened is not None else None

    def __repr__(self) -> str:  # the token is a credential: never shown
        return f"AvatarWorker(agent_id={self.agent_id!r}, room_url={self._room_url!r})"

    async def start(self) -> None:
        """Load the avatar and join the room; raises if either fails (nothing is left running)."""
        begun_at = time.monotonic()  # its time to first frame counts from here
        try:
            self._opened = await self._opener(self.agent_id, self.model)
            failover = Failover(reopen=self._reopen, on_state_changed=self._on_avatar_state)
            generator = await RuntimeVideoGenerator.create(
                self._opened.runtime, live=True, failover=failover, begun_at=begun_at
            )
            self._generator = generator
            self.room = self._room_factory()
            if self._token is not None:  # else the room came connected (a LiveKit job's)
                await self.room.connect(self._room_url, self._token)
            self.room.on("disconnected", self._on_disconnected)
            self.room.on("reconnecting", self._on_reconnecting)
            self.room.on("reconnected", self._on_reconnected)
            self.serves = self.listen_to or _on_behalf_of(self.room.local_participant)
            self.room.local_participant.register_rpc_method(RPC_TRIGGER_DYNAMICS, self._on_trigger)
            await self._present_self()
        except BaseException:
            await self._cleanup()
            raise
        receiver = self._receiver(generator.audio_sample_rate)
        self._runner = avatar_runner(self.room, generator, receiver, self._video_options)
        # the runner waits for the agent (or microphone) to show up: don't hold the caller
        self._watch = asyncio.create_task(self._run(), name=f"avatar-{self.agent_id}")
        if self.idle_timeout > 0:
            self._idle = asyncio.create_task(self._leave_when_idle())
        if self.max_session_seconds:
            self._limit = asyncio.create_task(self._leave_at_limit(self.max_session_seconds))

    async def _leave_at_limit(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        logger.info(
            "avatar %s leaves: its session limit of %g s was reached", self.agent_id, seconds
        )
        await self.stop()

    async def _reopen(self) -> AvatarRuntime:
        """The runtime failed: free it and load the avatar again (from the model cache)."""
        failed, self._opened = self._opened, None
        if failed is not None:
            try:
                await failed.aclose()
            except Exception as err:  # a broken runtime may fail to clean up
                failed.release()
                logger.debug("freeing the failed runtime of %s: %s", self.agent_id, err)
        opened = await self._opener(self.agent_id, self.model)
        if self._closing:
            await opened.aclose()
            raise asyncio.CancelledError
        self._opened = opened
        await asyncio.to_thread(opened.runtime.get_first_frame)  # renders, or raises here
        return opened.runtime

    def _on_avatar_state(self, event: AvatarStateChanged) -> None:
        self.avatar_state = event.new_state
        self.avatar_state_reason = None if event.new_state == "rendering" else event.reason

    async def _present_self(self) -> None:
        """Its LiveKit SID, the display name asked for, and no secret in its attributes.

        With LiveKit credentials (``LIVEKIT_URL`` / ``LIVEKIT_API_KEY`` /
        ``LIVEKIT_API_SECRET``) the service removes a leaked secret server side through
        RoomService, whatever the token allows. Otherwise, and for the name, the avatar updates
        itself, which needs the token's ``canUpdateOwnMetadata`` grant (without it LiveKit
        ignores the request silently)."""
        me = self.room.local_participant
        self.participant_sid = getattr(me, "sid", None) or None
        name = self.participant_name
        rename = name if name and getattr(me, "name", None) != name else None
        attributes = getattr(me, "attributes", {}) or {}
        leaked = {k: "" for k in _LEAKED_ATTRIBUTES if k in attributes}  # "" deletes it
        if not rename and not leaked:
            return
        # the secret goes server side whenever the service can: whatever the token allows,
        # RoomService removes it before the join is answered
        if leaked and await self._update_through_livekit(me.identity, rename, leaked):
            return
        if self._token is None or _may_update_itself(self._token):
            await self._update_itself(me, rename, leaked)
            return
        if not leaked and await self._update_through_livekit(me.identity, rename, leaked):
            return
        if rename:
            self._warn(
                f"could not set the display name {rename!r}: the room token has no "
                "canUpdateOwnMetadata grant and the service no LiveKit credentials "
                "(LIVEKIT_API_KEY / LIVEKIT_API_SECRET); give the room token the name"
            )
        if leaked:
            self._warn(
                "the room token carries an api_secret attribute that every participant can "
                "read, and it could not be removed; give the service LiveKit credentials, "
                "or grant canUpdateOwnMetadata"
            )

    async def _update_itself(self, me: Any, rename: str | None, leaked: dict[str, str]) -> None:
        if rename:
            try:
                await me.set_name(rename)
            except Exception as err:
                self._warn(
                    f"could not set the display name {rename!r} ({err}); give the "
                    "room token the name, or the canUpdateOwnMetadata grant"
                )
        if leaked:
            try:
                await me.set_attributes(leaked)
            except Exception as err:
                self._warn(
                    f"the room token carries an api_secret attribute that every participant can "
                    f"read, and it could not be removed ({err}); use a service key that can only "
                    "launch avatars, or grant canUpdateOwnMetadata"
                )

    async def _update_through_livekit(
        self, identity: str, rename: str | None, leaked: dict[str, str]
    ) -> bool:
        """RoomService.UpdateParticipant with the service's credentials; False without them.

        Only on the service's own server (``LIVEKIT_URL``): a token signed with its key is
        never sent to a room URL a client named."""
        url, key, secret = livekit_settings()
        room_name = token_room(self._token or "")
        if not (url and key and secret and self._room_url and room_name):
            return False
        if not same_server(url, self._room_url):
            logger.info("avatar %s: the room is not on LIVEKIT_URL's server", self.agent_id)
            return False
        from livekit import api

        request = api.UpdateParticipantRequest(room=room_name, identity=identity, attributes=leaked)
        if rename:
            request.name = rename
        lkapi = api.LiveKitAPI(http_url(url), key, secret)
        try:
            await lkapi.room.update_participant(request)
        except Exception as err:
            logger.warning("avatar %s: RoomService.UpdateParticipant: %s", self.agent_id, err)
            return False
        finally:
            await lkapi.aclose()
        return True

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        logger.warning("avatar %s: %s", self.agent_id, message)

    def _on_reconnecting(self, *_: Any) -> None:
        self.reconnecting = True
        logger.info("avatar %s lost its connection; LiveKit is reconnecting", self.agent_id)

    def _on_reconnected(self, *_: Any) -> None:
        self.reconnecting = False
        logger.info("avatar %s reconnected", self.agent_id)

    async def _leave_when_idle(self) -> None:
        """Leave after ``idle_timeout`` s with no other participant in the room and no audio."""
        check = min(5.0, self.idle_timeout / 4)
        alone_since = time.monotonic()
        while not self._closing:
            await asyncio.sleep(check)
            now = time.monotonic()
            if self.room is None or self.room.remote_participants:
                alone_since = now
                continue
            heard = self._generator.last_audio_at if self._generator is not None else 0.0
            if now - max(alone_since, heard) >= self.idle_timeout:
                logger.info(
                    "avatar %s leaves: no one in the room and no audio for %.0fs",
                    self.agent_id,
                    self.idle_timeout,
                )
                asyncio.get_running_loop().create_task(self.stop())
                return

    def _receiver(self, sample_rate: int) -> AudioReceiver:
        if self.listen_to:
            from .microphone import MicrophoneAudioReceiver

            return MicrophoneAudioReceiver(self.room, self.listen_to, sample_rate=sample_rate)
        if self.serves is None:
            logger.info(
                "avatar %s has no lk.publish_on_behalf attribute: it renders the first agent "
                "participant's audio",
                self.agent_id,
            )
        from .receiver import LastingReceiver, speech_receiver

        room, serves = self.room, self.serves
        return LastingReceiver(lambda: speech_receiver(room, serves))

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
        """bitHuman's cloud dynamics RPC, answered in its documented shape, for the
        participant it serves and the allowed identities; an RPC error for anyone else."""
        caller = data.caller_identity
        if not self.may_drive(caller):
            if caller not in self._refused:  # one warning per intruder, not one per call
                self._refused.add(caller)
                logger.warning(
                    "avatar %s refused %s from %r: it serves %r (allowed besides: %s)",
                    self.agent_id,
                    RPC_TRIGGER_DYNAMICS,
                    caller,
                    self.serves or "the room's agents",
                    ", ".join(sorted(self.allowed)) or "nobody",
                )
            raise rtc.RpcError(
                RPC_NOT_ALLOWED,
                "only the agent this avatar serves, and identities its operator allows, may "
                "trigger its gestures",
            )
        return await handle(data.payload, self._push if self.runtime is not None else None)

    def may_drive(self, identity: str) -> bool:
        """May ``identity`` trigger gestures? The participant it serves and the allowed
        identities; with no one to serve, agent participants only (never an app's user)."""
        if identity in self.allowed or (self.serves is not None and identity == self.serves):
            return True
        if self.serves is not None or self.room is None:
            return False
        caller = self.room.remote_participants.get(identity)
        return getattr(caller, "kind", None) == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT

    async def _push(self, action: str, force: bool) -> None:
        from bithuman import VideoControl

        if self.runtime is None or self.avatar_state != "rendering":
            raise AvatarHubError(
                f"the avatar is not rendering ({self.avatar_state}); gestures wait until it is back"
            )
        await self.runtime.push(VideoControl(action=action, force_action=force))

    async def stop(self) -> None:
        self._closing = True
        watch, self._watch = self._watch, None  # a cancelled task's error holds this worker
        if watch is not None and not watch.done():
            watch.cancel()
            # not gather(): a stop() cancelled meanwhile must not cancel the cleanup under way
            await asyncio.wait({watch})
        # a task cancelled before its first step never runs its ``finally``: clean up here too
        await self._cleanup()

    async def _cleanup(self) -> None:
        if self._generator is not None:
            await self._generator.aclose()  # no runtime reopened from now on
        for name in ("_idle", "_limit"):
            task = getattr(self, name)
            setattr(self, name, None)
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        runner, self._runner = self._runner, None
        if runner is not None:
            await close_runner(runner)
        opened, self._opened = self._opened, None
        if opened is not None:
            await opened.aclose()
        self._generator = None  # its frame buffers go now, whoever still holds the worker
        room, self.room = self.room, None
        if room is not None:
            room.off("disconnected", self._on_disconnected)
            room.off("reconnecting", self._on_reconnecting)
            room.off("reconnected", self._on_reconnected)
            await leave_room(room)
        if not self.stopped.done():
            self.stopped.set_result(None)


def _on_behalf_of(me: Any) -> str | None:
    """The agent named in its own ``lk.publish_on_behalf`` attribute (from its token)."""
    from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF

    value = (getattr(me, "attributes", None) or {}).get(ATTRIBUTE_PUBLISH_ON_BEHALF)
    return value if isinstance(value, str) and value else None


def _may_update_itself(token: str) -> bool:
    video = token_claims(token).get("video")
    return isinstance(video, dict) and bool(video.get("canUpdateOwnMetadata"))


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
