"""``serve --dispatch``: the service turns requests into LiveKit dispatches and keeps no state.

join-room, leave-room and the cloud launch request become ``CreateDispatch`` /
``DeleteDispatch`` for the room (one avatar per agent and room, through ``ListDispatch``); the
avatar itself runs on whichever avatar worker (``python -m livekit_plugins_avatarhub worker``)
LiveKit assigns the job to. Any number of replicas can run behind any load balancer.
"""

from __future__ import annotations

import time

from ..config import session_limit_setting, tighter
from ..remote.dispatcher import AvatarDispatcher
from ..remote.protocol import AvatarJob, gesture_callers
from ..remote.tokens import token_claims
from .manager import WorkerInfo


class DispatchManager:
    """The avatar service's manager interface, answered by LiveKit's dispatch."""

    max_workers = 0  # no local workers: capacity is the avatar workers' business

    def __init__(self, dispatcher: AvatarDispatcher) -> None:
        self.dispatcher = dispatcher

    def active(self) -> int:
        return 0

    def workers(self) -> list[WorkerInfo]:
        return []  # stateless: LiveKit knows where every avatar runs

    def get(self, agent_id: str, room: str) -> WorkerInfo | None:
        return None

    async def join(
        self,
        *,
        agent_id: str,
        room: str,
        participant_id: str,
        room_url: str,
        token: str,
        model: str | None = None,
        listen_to: str | None = None,
        participant_name: str | None = None,
        max_session_seconds: float | None = None,
    ) -> tuple[WorkerInfo, bool]:
        """Dispatch the avatar, as the participant the client's token describes."""
        claims = token_claims(token)
        attributes = claims.get("attributes") if isinstance(claims.get("attributes"), dict) else {}
        from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF

        behalf = attributes.get(ATTRIBUTE_PUBLISH_ON_BEHALF) if attributes else None
        job = AvatarJob(
            agent_id=agent_id,
            model=model,
            participant_identity=participant_id,
            participant_name=participant_name or claims.get("name") or None,
            publish_on_behalf=behalf if isinstance(behalf, str) and not listen_to else None,
            listen_to=listen_to,
            allow_gestures_from=tuple(sorted(gesture_callers())),  # serve's, for the worker
            # the request's limit within serve's own (the worker applies its own too)
            max_session_seconds=tighter(max_session_seconds, session_limit_setting()),
        )
        dispatch_id, created = await self.dispatcher.ensure(room, job)
        info = WorkerInfo(
            agent_id,
            room,
            participant_id,
            "dispatched",
            time.time(),
            listen_to=listen_to,
            participant_name=job.participant_name,
        )
        info.dispatch_id = dispatch_id
        return info, created

    async def leave(self, agent_id: str, room: str | None = None) -> list[WorkerInfo]:
        if room is None:
            return []  # without state, "every room" cannot be known: name the room
        removed = await self.dispatcher.remove(room, agent_id)
        return [
            WorkerInfo(agent_id, room, job.participant_identity, "stopped", time.time())
            for job in removed
        ]

    async def aclose(self) -> None:
        await self.dispatcher.aclose()
