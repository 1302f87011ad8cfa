"""Sending avatar workers into rooms with LiveKit's ``AgentDispatchService`` (livekit-api).

One avatar per (agent, room): :meth:`AvatarDispatcher.ensure` lists the room's dispatches first
and creates one only when none for that avatar exists; callers that create one at the same moment
then keep the oldest and withdraw their own. So any number of callers (``serve --dispatch``
replicas in front of any LiveKit node, agents in ``mode="dispatch"``) converge on one. LiveKit
then hands the job to an avatar worker with room for it (``remote.jobs``), weighted by the load
each reports: there is no scheduler of ours.

LiveKit offers a dispatch's job once, when it is created, and drops it without a word when no
worker takes it (none registered under the agent name, or every one full); the dispatch stays
listed, jobless, for good. So ``ensure`` waits until LiveKit lists a job for it and otherwise
withdraws it and raises :class:`CapacityError`: the caller is told to try again, and the next
try is a fresh dispatch LiveKit offers again, instead of a request lost in a dead one.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from ..config import livekit_credentials
from ..exceptions import CapacityError, ConfigurationError
from ..log import logger
from .protocol import AvatarJob
from .protocol import agent_name as default_agent_name

if TYPE_CHECKING:
    from livekit import api

#: how long LiveKit may take to hand a new dispatch's job to a worker: ~1 s when one has room,
#: ~5 s for the first dispatch after a worker registers or once a minute (LiveKit then asks
#: every node which agent names are served, waiting up to 5 s), and it waits up to 10 s for a
#: worker's answer; then when a refused caller should ask again (a slot frees when an avatar
#: leaves, and workers report their load every few seconds)
ASSIGN_TIMEOUT = 10.0
RETRY_AFTER = 5.0


def oldest(dispatches: list[Any]) -> Any:
    """The dispatch LiveKit created first (None for none): the one a room keeps."""
    return min(dispatches, key=lambda d: (d.state.created_at, d.id), default=None)


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

    async def ensure(
        self, room: str, job: AvatarJob, *, assign_timeout: float | None = None
    ) -> tuple[str, bool]:
        """Dispatch ``job`` into ``room`` unless it is there already, and wait until a worker
        took it (up to ``assign_timeout``, :data:`ASSIGN_TIMEOUT` by default): (dispatch id,
        created). :class:`CapacityError` when none did."""
        from livekit import api

        if assign_timeout is None:
            assign_timeout = ASSIGN_TIMEOUT

        existing = await self.find(room, job.agent_id)
        for dispatch in existing:
            if dispatch.state.jobs:
                return str(dispatch.id), False
        if existing:  # another caller's, perhaps still being placed: wait for it a while
            if await self._assigned(room, existing[0].id, assign_timeout / 2):
                return str(existing[0].id), False
            for dispatch in existing:  # LiveKit dropped it and will never offer it again
                await self._withdraw(room, dispatch.id)
            logger.info("withdrew avatar %s's unassigned dispatch in room %s", job.agent_id, room)
        dispatch = await self._client().agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(
                agent_name=self.agent_name, room=room, metadata=job.to_metadata()
            )
        )
        first = await self._first(room, job.agent_id, dispatch)
        if first.id != dispatch.id:  # another caller's came first: the room keeps that one
            await self._withdraw(room, dispatch.id)
            logger.info(
                "avatar %s was dispatched into room %s by another caller", job.agent_id, room
            )
            if await self._assigned(room, first.id, assign_timeout):
                return str(first.id), False
            raise CapacityError(
                f"no avatar worker took the avatar {job.agent_id} for room {room} within "
                f"{assign_timeout:g}s",
                retry_after=RETRY_AFTER,
            )
        if not await self._assigned(room, dispatch.id, assign_timeout):
            await self._withdraw(room, dispatch.id)
            raise CapacityError(
                f"no avatar worker took the avatar {job.agent_id} for room {room} within "
                f"{assign_timeout:g}s: none is registered as {self.agent_name!r} (`python -m "
                "livekit_plugins_avatarhub worker start`), or every one is full",
                retry_after=RETRY_AFTER,
            )
        logger.info("dispatched avatar %s into room %s (%s)", job.agent_id, room, dispatch.id)
        return str(dispatch.id), True

    async def _first(self, room: str, agent_id: str, mine: Any) -> Any:
        """Of the avatar's dispatches in the room, the oldest (callers that created one at the
        same moment all see every dispatch older than their own, so they agree on it)."""
        return oldest(await self.find(room, agent_id)) or mine

    async def _assigned(self, room: str, dispatch_id: str, timeout: float) -> bool:
        """Whether LiveKit lists a job for the dispatch within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            dispatch = await self._client().agent_dispatch.get_dispatch(dispatch_id, room)
            if dispatch is None:
                return False  # withdrawn meanwhile (leave-room)
            if dispatch.state.jobs:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.1)

    async def _withdraw(self, room: str, dispatch_id: str) -> None:
        from livekit import api

        try:
            await self._client().agent_dispatch.delete_dispatch(dispatch_id, room)
        except api.TwirpError as err:
            if err.code != "not_found":  # another caller withdrew it first
                raise

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
