"""A loopback stand-in for the LiveKit server's control plane, written from livekit-protocol.

It speaks LiveKit's real wire protocols, so the real clients drive it unchanged:

* Twirp (protobuf over HTTP POST, errors as ``{"code", "msg"}`` JSON) for
  ``livekit.AgentDispatchService`` (CreateDispatch, ListDispatch, DeleteDispatch) and
  ``livekit.RoomService/RemoveParticipant``, checking the caller's JWT and its grants
  (``livekit-api`` is the client);
* the agent-worker WebSocket at ``/agent``: ``WorkerMessage`` / ``ServerMessage`` protobufs.
  A worker registers under an agent name and reports load; a dispatch for that name is
  offered to the available workers (``AvailabilityRequest``) and assigned to the first that
  accepts (``JobAssignment`` with a token minted from its answer). ``livekit-agents``' own
  worker is the client.

Rooms and media are out of scope: a job's room is the tests' duck-typed room.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web
from livekit.protocol import agent, agent_dispatch, models, room

from livekit import api

_ids = itertools.count(1)


@dataclass
class RegisteredWorker:
    ws: web.WebSocketResponse
    worker_id: str
    agent_name: str
    status: int = agent.WorkerStatus.WS_AVAILABLE
    load: float = 0.0
    job_count: int = 0
    loads: list[float] = field(default_factory=list)
    answers: dict[str, asyncio.Future[agent.AvailabilityResponse]] = field(default_factory=dict)


class FakeLiveKitServer:
    def __init__(self, api_key: str, api_secret: str) -> None:
        self.api_key, self.api_secret = api_key, api_secret
        self.dispatches: dict[str, list[agent_dispatch.AgentDispatch]] = {}
        self.workers: list[RegisteredWorker] = []
        self.offers: list[tuple[str, agent.AvailabilityResponse]] = []  # (worker id, answer)
        self.assigned: list[agent.JobAssignment] = []
        self.job_updates: list[agent.UpdateJobStatus] = []
        self.removed: list[tuple[str, str]] = []
        self.twirp_calls: list[str] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeLiveKitServer:
        app = web.Application()
        app.router.add_post("/twirp/livekit.{service}/{method}", self._twirp)
        app.router.add_get("/agent", self._agent_ws)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        for worker in self.workers:
            await worker.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- Twirp ------------------------------------------------------------------------------

    def _claims(self, request: web.Request) -> api.Claims | None:
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            return None
        try:
            return api.TokenVerifier(self.api_key, self.api_secret).verify(auth[7:])
        except Exception:
            return None

    @staticmethod
    def _error(status: int, code: str, msg: str) -> web.Response:
        return web.json_response({"code": code, "msg": msg}, status=status)

    async def _twirp(self, request: web.Request) -> web.Response:
        service, method = request.match_info["service"], request.match_info["method"]
        self.twirp_calls.append(f"{service}/{method}")
        claims = self._claims(request)
        if claims is None:
            return self._error(401, "unauthenticated", "invalid token")
        if request.content_type != "application/protobuf":
            return self._error(400, "malformed", "expected a protobuf body")
        body = await request.read()
        grants = claims.video
        if not (grants and grants.room_admin):
            return self._error(403, "permission_denied", "needs roomAdmin")
        handler = getattr(self, f"_{service}_{method}", None)
        if handler is None:
            return self._error(404, "bad_route", f"no {service}/{method}")
        reply, status = await handler(body, grants)
        if status != 200:
            return self._error(status, *reply)
        return web.Response(body=reply.SerializeToString(), content_type="application/protobuf")

    async def _AgentDispatchService_CreateDispatch(self, body: bytes, grants: Any) -> Any:
        req = agent_dispatch.CreateAgentDispatchRequest.FromString(body)
        if grants.room and grants.room != req.room:
            return ("permission_denied", "the token is for another room"), 403
        dispatch = agent_dispatch.AgentDispatch(
            id=f"AD_{next(_ids)}", agent_name=req.agent_name, room=req.room, metadata=req.metadata
        )
        dispatch.state.created_at = time.time_ns()  # as LiveKit stamps it
        self.dispatches.setdefault(req.room, []).append(dispatch)
        asyncio.get_running_loop().create_task(self._place(dispatch))
        return dispatch, 200

    async def _AgentDispatchService_ListDispatch(self, body: bytes, grants: Any) -> Any:
        req = agent_dispatch.ListAgentDispatchRequest.FromString(body)
        found = [
            d
            for d in self.dispatches.get(req.room, [])
            if not req.dispatch_id or d.id == req.dispatch_id
        ]
        return agent_dispatch.ListAgentDispatchResponse(agent_dispatches=found), 200

    async def _AgentDispatchService_DeleteDispatch(self, body: bytes, grants: Any) -> Any:
        req = agent_dispatch.DeleteAgentDispatchRequest.FromString(body)
        kept = self.dispatches.get(req.room, [])
        for dispatch in kept:
            if dispatch.id == req.dispatch_id:
                kept.remove(dispatch)
                return dispatch, 200
        return ("not_found", "dispatch not found"), 404

    async def _RoomService_RemoveParticipant(self, body: bytes, grants: Any) -> Any:
        req = room.RoomParticipantIdentity.FromString(body)
        assigned = any(
            a.job.room.name == req.room and self._identity_of(a) == req.identity
            for a in self.assigned
        )
        if not assigned:
            return ("not_found", "participant not found"), 404
        self.removed.append((req.room, req.identity))
        return room.RemoveParticipantResponse(), 200

    def _identity_of(self, assignment: agent.JobAssignment) -> str:
        return api.TokenVerifier(self.api_key, self.api_secret).verify(assignment.token).identity

    # -- dispatching ------------------------------------------------------------------------

    async def _place(self, dispatch: agent_dispatch.AgentDispatch) -> None:
        """Offer the job to each available worker of that agent name; assign it to the first
        that accepts, with a token made from its answer (as LiveKit does)."""
        job = agent.Job(
            id=f"AJ_{next(_ids)}",
            dispatch_id=dispatch.id,
            type=agent.JobType.JT_ROOM,
            room=models.Room(sid=f"RM_{dispatch.room}", name=dispatch.room),
            metadata=dispatch.metadata,
            agent_name=dispatch.agent_name,
        )
        for worker in list(self.workers):
            if worker.agent_name != dispatch.agent_name or worker.status != agent.WS_AVAILABLE:
                continue
            answer = asyncio.get_running_loop().create_future()
            worker.answers[job.id] = answer
            await worker.ws.send_bytes(
                agent.ServerMessage(
                    availability=agent.AvailabilityRequest(job=job)
                ).SerializeToString()
            )
            reply = await asyncio.wait_for(answer, 10)
            self.offers.append((worker.worker_id, reply))
            if not reply.available:
                continue
            token = (
                api.AccessToken(self.api_key, self.api_secret)
                .with_identity(reply.participant_identity)
                .with_name(reply.participant_name)
                .with_kind("agent")
                .with_attributes(dict(reply.participant_attributes))
                .with_grants(api.VideoGrants(room_join=True, room=dispatch.room, agent=True))
                .to_jwt()
            )
            assignment = agent.JobAssignment(
                job=job, url=self.url.replace("http", "ws"), token=token
            )
            self.assigned.append(assignment)
            dispatch.state.jobs.append(job)  # as LiveKit lists the dispatch's jobs
            await worker.ws.send_bytes(
                agent.ServerMessage(assignment=assignment).SerializeToString()
            )
            return

    # -- the agent-worker WebSocket -----------------------------------------------------------

    async def _agent_ws(self, request: web.Request) -> web.StreamResponse:
        claims = self._claims(request)
        if claims is None or not (claims.video and claims.video.agent):
            return self._error(401, "unauthenticated", "a worker needs an agent grant")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        first = await ws.receive()
        msg = agent.WorkerMessage.FromString(first.data)
        if not msg.HasField("register"):
            await ws.close()
            return ws
        worker = RegisteredWorker(ws, f"AW_{next(_ids)}", msg.register.agent_name)
        self.workers.append(worker)
        await ws.send_bytes(
            agent.ServerMessage(
                register=agent.RegisterWorkerResponse(
                    worker_id=worker.worker_id,
                    server_info=models.ServerInfo(region="loopback", protocol=16),
                )
            ).SerializeToString()
        )
        try:
            async for frame in ws:
                if frame.type != WSMsgType.BINARY:
                    continue
                message = agent.WorkerMessage.FromString(frame.data)
                which = message.WhichOneof("message")
                if which == "update_worker":
                    update = message.update_worker
                    worker.status, worker.load = update.status, update.load
                    worker.job_count = update.job_count
                    worker.loads.append(update.load)
                elif which == "availability":
                    answer = worker.answers.pop(message.availability.job_id, None)
                    if answer is not None and not answer.done():
                        answer.set_result(message.availability)
                elif which == "update_job":
                    self.job_updates.append(message.update_job)
                elif which == "ping":
                    await ws.send_bytes(
                        agent.ServerMessage(
                            pong=agent.WorkerPong(last_timestamp=message.ping.timestamp)
                        ).SerializeToString()
                    )
        finally:
            self.workers.remove(worker)
        return ws
