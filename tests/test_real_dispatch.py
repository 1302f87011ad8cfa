"""Avatars on LiveKit's own job dispatch, against the real AgentDispatchService.

``livekit-api`` creates, lists and deletes dispatches on a real ``livekit-server``; what the
package asked for is read back from the server itself (``ListDispatch``), not from a stand-in.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from livekit.agents import AgentSession, APIConnectOptions

from livekit import api, rtc
from livekit_plugins_avatarhub import AvatarSession, CapacityError
from livekit_plugins_avatarhub.remote.dispatcher import AvatarDispatcher
from livekit_plugins_avatarhub.remote.protocol import AvatarJob
from livekit_plugins_avatarhub.service.dispatched import DispatchManager

from livekit_real import until
from service_harness import serve

pytestmark = pytest.mark.livekit_real


async def dispatches(server, room: str, agent_name: str = "avatarhub-avatar") -> list:
    """The room's dispatches for ``agent_name`` (LiveKit lists its automatic one, with agent
    name "", beside them)."""
    lkapi = server.api()
    try:
        found = await lkapi.agent_dispatch.list_dispatch(room_name=room)
        return [d for d in found if d.agent_name == agent_name]
    finally:
        await lkapi.aclose()


@pytest.fixture
async def job_taker(livekit_env):
    """LiveKit's own worker, registered as the avatar workers are, that takes every job and
    does nothing with it: LiveKit lists a job for each dispatch it hands out, which is what
    the dispatcher waits for, without an avatar rendering in these bookkeeping tests."""
    from livekit.agents import JobExecutorType, WorkerOptions

    from livekit_plugins_avatarhub._compat import agent_worker

    async def take(ctx) -> None:
        return None

    worker, run = agent_worker(
        WorkerOptions(
            entrypoint_fnc=take,
            agent_name="avatarhub-avatar",
            job_executor_type=JobExecutorType.THREAD,
            port=0,
            ws_url=livekit_env.url,
            api_key=livekit_env.api_key,
            api_secret=livekit_env.api_secret,
        )
    )
    registered = asyncio.Event()  # LiveKit drops a dispatch nobody is registered for
    worker.on("worker_registered", lambda *_: registered.set())
    running = asyncio.create_task(run())
    await asyncio.wait_for(registered.wait(), 30)
    yield worker
    await worker.aclose()
    await asyncio.wait_for(asyncio.gather(running, return_exceptions=True), 20)


@pytest.fixture
async def rooms(livekit_env):
    """Makes rooms exist, as an app or agent in them does: LiveKit answers ListDispatch for a
    room nobody created with 503 "no response from servers"."""
    lkapi = livekit_env.api()

    async def create(*names: str) -> None:
        for name in names:
            await lkapi.room.create_room(api.CreateRoomRequest(name=name, empty_timeout=30))

    yield create
    await lkapi.aclose()


async def test_dispatcher_keeps_one_avatar_per_agent_and_room(livekit_env, rooms, job_taker):
    await rooms("dispatch-a")
    one, other = AvatarDispatcher(), AvatarDispatcher()  # two replicas of a service
    try:
        job = AvatarJob("demo", participant_identity="avatar-1")
        first = await one.ensure("dispatch-a", job)
        again = await other.ensure("dispatch-a", job)
        assert first[1] is True and again == (first[0], False)
        (stored,) = await dispatches(livekit_env, "dispatch-a")
        assert stored.agent_name == "avatarhub-avatar" and stored.id == first[0]
        assert AvatarJob.parse(stored.metadata) == job
        assert (await one.ensure("dispatch-a", AvatarJob("A91XMB7113")))[1] is True
        removed = await other.remove("dispatch-a", "demo")
        assert [j.participant_identity for j in removed] == ["avatar-1"]
        left = await dispatches(livekit_env, "dispatch-a")
        assert [AvatarJob.parse(d.metadata).agent_id for d in left] == ["A91XMB7113"]
    finally:
        await one.aclose()
        await other.aclose()


async def test_dispatcher_with_wrong_credentials_gets_livekits_refusal(livekit_env, rooms):
    await rooms("dispatch-b")
    dispatcher = AvatarDispatcher(api_secret="not-the-secret-not-the-secret-00")
    try:
        with pytest.raises(Exception) as info:
            await dispatcher.ensure("dispatch-b", AvatarJob("demo"))
        # the real server answers 401 with code "unknown" (not Twirp's "unauthenticated")
        assert getattr(info.value, "status", None) == 401, repr(info.value)
    finally:
        await dispatcher.aclose()
    assert await dispatches(livekit_env, "dispatch-b") == []


async def test_serve_dispatch_turns_requests_into_dispatches(livekit_env, rooms, job_taker):
    await rooms("dispatch-f", "dispatch-l")
    replicas = [DispatchManager(AvatarDispatcher()) for _ in range(2)]
    server = livekit_env
    async with serve(replicas[0]) as a, serve(replicas[1]) as b:
        flutter = {
            "room_url": server.url,
            "room_token": server.token("avatar-flutter", "dispatch-f", kind="agent"),
            "participant_name": "BitHuman Agent",
            "listen_to": "user-7",
        }
        first = await a.post("/v1/agents/demo/join-room", json=flutter)
        second = await b.post("/v1/agents/demo/join-room", json=flutter)  # another replica
        assert first.status_code == second.status_code == 200, first.text
        assert first.json()["status"] == "dispatched" and first.json()["created"] is True
        assert second.json()["created"] is False
        assert second.json()["dispatch_id"] == first.json()["dispatch_id"]
        (dispatch,) = await dispatches(server, "dispatch-f")
        assert json.loads(dispatch.metadata) == {
            "agent_id": "demo",
            "participant_identity": "avatar-flutter",
            "participant_name": "BitHuman Agent",
            "listen_to": "user-7",
        }
        # the official plugin's launch: the avatar publishes on behalf of the agent
        launch = await b.post(
            "/v1/runtime-tokens/request",
            json={
                "agent_id": "A91XMB7113",
                "model": "expression",
                "livekit_url": server.url,
                "livekit_token": server.token(
                    "bithuman-avatar-agent",
                    "dispatch-l",
                    kind="agent",
                    attributes={"lk.publish_on_behalf": "agent-9"},
                ),
                "room_name": "dispatch-l",
            },
        )
        assert launch.status_code == 200, launch.text
        meta = json.loads((await dispatches(server, "dispatch-l"))[0].metadata)
        assert meta["publish_on_behalf"] == "agent-9" and meta["model"] == "expression"
        assert meta["participant_identity"] == "bithuman-avatar-agent"
        left = await a.post("/v1/agents/demo/leave-room", json={"room_name": "dispatch-f"})
        assert left.status_code == 200 and await dispatches(server, "dispatch-f") == []
        assert (await a.get("/health")).json()["dispatch"] is True


@pytest.fixture
async def agent_room(livekit_env, request):
    room = rtc.Room()
    await room.connect(
        livekit_env.url, livekit_env.token("agent-test", request.node.name[:40], kind="agent")
    )
    yield room
    await room.disconnect()


async def test_session_in_dispatch_mode_sends_a_worker_into_its_own_room(
    livekit_env, agent_room, job_taker
):
    from livekit.agents.voice.avatar import DataStreamAudioOutput

    from livekit_plugins_avatarhub.backends.relay import AvatarRelay

    avatar = AvatarSession(avatar_id="demo", mode="dispatch", model="expression")
    session = AgentSession()
    starting = asyncio.create_task(avatar.start(session, room=agent_room))
    found: list = []

    async def dispatched() -> None:
        while not found:
            found.extend(await dispatches(livekit_env, agent_room.name))
            await asyncio.sleep(0.1)

    await asyncio.wait_for(dispatched(), 15)
    assert json.loads(found[0].metadata) == {
        "agent_id": "demo",
        "model": "expression",
        "participant_identity": "bithuman-avatar-agent",
        "participant_name": "bithuman-avatar-agent",
        "publish_on_behalf": "agent-test",
    }
    assert not starting.done(), "start() waits for the avatar to join"
    stand_in = rtc.Room()  # what the assigned avatar worker does: join as that identity
    await stand_in.connect(
        livekit_env.url,
        livekit_env.token("bithuman-avatar-agent", agent_room.name, kind="agent"),
    )
    try:
        await asyncio.wait_for(starting, 10)
        sink = session.output.audio
        while sink is not None and not isinstance(sink, AvatarRelay):
            sink = getattr(sink, "next_in_chain", None)
        assert isinstance(sink, AvatarRelay) and isinstance(sink._remote, DataStreamAudioOutput), (
            "speech goes to the avatar worker"
        )
        assert avatar.avatar_identity == "bithuman-avatar-agent"
        await avatar.aclose()
        await session.aclose()
        assert await dispatches(livekit_env, agent_room.name) == [], "aclose withdrew it"
        await until(lambda: stand_in.connection_state != rtc.ConnectionState.CONN_CONNECTED, 10)
    finally:
        await stand_in.disconnect()


async def test_dispatch_mode_says_when_no_worker_takes_the_avatar(livekit_env, agent_room):
    """Nobody registered under the agent name: LiveKit drops the dispatch without a word and
    lists no job for it, so the session withdraws it within seconds, well before its join
    timeout, and says what to run."""
    import time

    avatar = AvatarSession(avatar_id="demo", mode="dispatch", conn_options=APIConnectOptions())
    started = time.monotonic()
    with pytest.raises(CapacityError, match="worker start") as info:
        await avatar.start(AgentSession(), room=agent_room)
    assert time.monotonic() - started < 20, "told after the assignment wait, not the join's"
    assert info.value.retry_after > 0
    assert await dispatches(livekit_env, agent_room.name) == [], "withdrawn"
