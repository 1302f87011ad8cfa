"""Sending avatar workers into rooms with LiveKit's ``AgentDispatchService`` (livekit-api).

One avatar per (agent, room): :meth:`AvatarDispatcher.ensure` lists the room's dispatches first
and creates one only when none for that avatar exists, so any number of callers (``serve
--dispatch`` replicas, agents in ``mode="dispatch"``) converge on one. LiveKit then hands the job
to an avatar worker with room for it (``avatar_jobs``): there is no scheduler of ours.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..config import livekit_credentials
from ..exceptions import ConfigurationError
from ..log import logger
from .protocol import AvatarJob
from .protocol import agent_name as default_agent_name

if TYPE_CHECKING:
    from livekit import api


class AvatarDispatcher:
    """CreateDispatch / ListDispatch / DeleteDispatch for avatar jobs (LiveKit credentials)."""

    def __init__(
        self,
        *,
        url: str | None = None,
        api_key: str | None = None,
        api_secret: str | None = None,
        agent_name: str | None = None,
    ) -> None:
        self.url, self._key, self._secret = livekit_credentials(
            url, api_key, api_secret, needed_for="dispatching avatar workers"
        )
        self.agent_name = default_agent_name(agent_name)
        self._api: api.LiveKitAPI | None = None

    def __repr__(self) -> str:
        return f"AvatarDispatcher(url={self.url!r}, agent_name={self.agent_name!r})"

    def _client(self) -> api.LiveKitAPI:
        if self._api is None:  # made inside the running loop (aiohttp)
            from livekit import api

            self._api = api.LiveKitAPI(self.url, self._key, self._secret)
        return self._api

    async def find(self, room: str, agent_id: str | None = None) -> list[Any]:
        """This agent name's dispatches in ``room`` (for ``agent_id`` only, when given)."""
        found = []
        for dispatch in await self._client().agent_dispatch.list_dispatch(room_name=room):
            if dispatch.agent_name != self.agent_name:
                continue
            if agent_id is not None:
                try:
                    if AvatarJob.parse(dispatch.metadata).agent_id != agent_id:
                        continue
                except ConfigurationError:
                    continue
            found.append(dispatch)
        return found

    async def ensure(self, room: str, job: AvatarJob) -> tuple[str, bool]:
        """Dispatch ``job`` into ``room`` unless it is there already: (dispatch id, created)."""
        from livekit import api

        existing = await self.find(room, job.agent_id)
        if existing:
            return str(existing[0].id), False
        dispatch = await self._client().agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(
                agent_name=self.agent_name, room=room, metadata=job.to_metadata()
            )
        )
        logger.info("dispatched avatar %s into room %s (%s)", job.agent_id, room, dispatch.id)
        return str(dispatch.id), True

    async def remove(self, room: str, agent_id: str) -> list[AvatarJob]:
        """Delete the avatar's dispatch and take its participant out of the room."""
        from livekit import api

        removed = []
        for dispatch in await self.find(room, agent_id):
            job = AvatarJob.parse(dispatch.metadata)
            await self._client().agent_dispatch.delete_dispatch(dispatch.id, room)
            try:  # a dispatch that was never assigned has no participant
                await self._client().room.remove_participant(
                    api.RoomParticipantIdentity(room=room, identity=job.participant_identity)
                )
            except api.TwirpError as err:
                if err.code != "not_found":
                    raise
            removed.append(job)
        return removed

    async def aclose(self) -> None:
        if self._api is not None:
            await self._api.aclose()
            self._api = None
