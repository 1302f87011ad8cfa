"""``mode="dispatch"``: the agent dispatches an avatar worker into its own room with its
LiveKit credentials (no service in between), waits for it to join, and speaks to it.

The worker (``python -m livekit_plugins_avatarhub worker start``, registered under the agent
name ``remote.protocol.agent_name()`` reads) joins as its own participant, publishing on the
agent's behalf; speech and gestures then travel as in ``mode="participant"``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from livekit import rtc

from ..exceptions import AvatarHubError, CapacityError
from ..log import logger
from ..remote.dispatcher import AvatarDispatcher
from ..remote.protocol import AvatarJob
from ..remote.server_api import livekit_refusal
from ..rendering.failover import AvatarState, OnStateChanged
from .base import (
    LIMIT_BACKSTOP,
    Attach,
    LiveKitKeys,
    RemoteAvatar,
    avatar_joined,
    end_at_limit,
    push_gesture,
    route_audio_to,
    stop_speaking_to_avatar,
)
from .relay import AvatarRelay

if TYPE_CHECKING:
    from bithuman import VideoControl
    from livekit.agents import AgentSession


class DispatchBackend:
    """Dispatch, wait for the join, speak and gesture to the avatar; withdraw it on close."""

    own_participant = True

    def __init__(
        self,
        *,
        avatar: RemoteAvatar,
        agent_name: str,
        join_timeout: float,
        max_session_seconds: float | None = None,
    ) -> None:
        self.avatar = avatar
        self._limit = max_session_seconds
        self._guard: asyncio.Task[None] | None = None
        self.agent_name, self.join_timeout = agent_name, join_timeout
        self._dispatcher: AvatarDispatcher | None = None
        self._room: rtc.Room | None = None
        self._relay: AvatarRelay | None = None
        self.on_state_changed: OnStateChanged | None = None

    @property
    def avatar_state(self) -> AvatarState:
        return self._relay.state if self._relay is not None else "rendering"

    def identity(self, room: rtc.Room | None) -> str:
        return self.avatar.identity

    async def start(
        self, agent_session: AgentSession[Any], room: rtc.Room, keys: LiveKitKeys, attach: Attach
    ) -> None:
        dispatcher = AvatarDispatcher(
            url=keys.url,
            api_key=keys.api_key,
            api_secret=keys.api_secret,
            agent_name=self.agent_name,
        )
        avatar = self.avatar
        job = AvatarJob(
            agent_id=avatar.agent_id,
            model=avatar.model,
            participant_identity=avatar.identity,
            participant_name=avatar.name,
            publish_on_behalf=room.local_participant.identity,
            max_session_seconds=self._limit + LIMIT_BACKSTOP if self._limit else None,
        )
        try:
            await dispatcher.ensure(room.name, job)
        except CapacityError:  # no worker took it: withdrawn, and the error says what to do
            await dispatcher.aclose()
            raise
        except Exception as err:
            await dispatcher.aclose()
            raise livekit_refusal(err, dispatcher.url) from None
        self._dispatcher, self._room = dispatcher, room
        try:
            await asyncio.wait_for(avatar_joined(room, avatar.identity), self.join_timeout)
        except asyncio.TimeoutError:
            await self.aclose()
            raise AvatarHubError(
                f"no avatar worker took the avatar {avatar.agent_id} within "
                f"{self.join_timeout:.0f}s; is `python -m livekit_plugins_avatarhub worker "
                f"start` running with agent name {self.agent_name!r}, with room for another?"
            ) from None
        await attach()

        async def dispatch_again() -> None:  # the old dispatch's job is gone with its worker
            await dispatcher.remove(room.name, avatar.agent_id)
            await dispatcher.ensure(room.name, job)

        self._relay = route_audio_to(
            agent_session,
            room,
            avatar.identity,
            relaunch=dispatch_again,
            on_state_changed=self.on_state_changed,
        )
        if self._limit:

            async def send_away() -> None:
                await dispatcher.remove(room.name, avatar.agent_id)

            self._guard = asyncio.create_task(end_at_limit(self._limit, self._relay, send_away))
        logger.info(
            "avatar %s renders on a dispatched worker as %s", avatar.agent_id, avatar.identity
        )

    async def push(self, control: VideoControl) -> None:
        await push_gesture(self._room, self.avatar.identity, control, "dispatch")

    async def aclose(self) -> None:
        guard, self._guard = self._guard, None
        relay, self._relay = self._relay, None
        await stop_speaking_to_avatar(guard, relay)
        dispatcher, self._dispatcher = self._dispatcher, None
        room, self._room = self._room, None
        if dispatcher is None:
            return
        try:
            if room is not None:
                await dispatcher.remove(room.name, self.avatar.agent_id)
        except Exception as err:  # the job ends with the room anyway
            logger.debug("removing the avatar dispatch failed: %s", err)
        finally:
            await dispatcher.aclose()
