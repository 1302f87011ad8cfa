"""Avatars on LiveKit's multi-node mode: two real server nodes sharing one Redis.

An avatar worker registers with node A only. Users, agents and ``serve --dispatch`` replicas
talk to either node: LiveKit places each room on a node, relays signalling and job dispatch
between nodes over Redis, and the worker's job reaches it wherever the room lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import pytest
from livekit.agents import AgentSession

from livekit import api, rtc
from livekit_plugins_avatarhub import AvatarSession
from livekit_plugins_avatarhub.remote.dispatcher import AvatarDispatcher
from livekit_plugins_avatarhub.service.dispatched import DispatchManager

from livekit_real import Subscriber, until
from real_processes import avatar_worker, join_room
from service_harness import serve

pytestmark = [pytest.mark.livekit_real, pytest.mark.slow, pytest.mark.real_once]

AGENT_NAME = "avatars-cluster"


async def dispatches(server, room: str) -> list[str]:
    """The avatar dispatches the node lists for the room (LiveKit adds one of its own, for
    agent name "", to every room it creates)."""
    lkapi = server.api()
    try:
        listed = await lkapi.agent_dispatch.list_dispatch(room_name=room)
    finally:
        await lkapi.aclose()
    return [d.id for d in listed if d.agent_name == AGENT_NAME]


async def watched(sub: Subscriber, seconds: float = 4.0) -> tuple[rtc.RemoteParticipant, float]:
    """The avatar ``sub`` sees, and the frame rate of its video over ``seconds`` (20 at
    least)."""
    avatar, _ = await sub.wait_track(rtc.TrackKind.KIND_VIDEO, timeout=60)
    await sub.wait_track(rtc.TrackKind.KIND_AUDIO, identity=avatar.identity)
    sub.record(avatar)
    await until(lambda: len(sub.video) > 0, 20, "the avatar's first frame")
    await asyncio.sleep(1.0)  # past the call's ramp-up
    since = time.monotonic()
    await asyncio.sleep(seconds)
    fps = sub.fps(since, time.monotonic())
    assert fps >= 20, f"{fps:.1f} FPS: {sub.frames_each_second(since, time.monotonic())}"
    return avatar, fps


async def test_replicas_on_both_nodes_converge_on_one_avatar_rendered_via_the_other_node(
    livekit_cluster, tmp_path
):
    """The Flutter join-room flow, asked of two ``serve --dispatch`` replicas at once, one in
    front of each node; the room's user is on node B, the worker on node A."""
    node_a, node_b = livekit_cluster
    room = "cluster-join"
    async with (
        avatar_worker(node_a, tmp_path, AGENT_NAME) as worker,
        serve(DispatchManager(AvatarDispatcher(**creds(node_a), agent_name=AGENT_NAME))) as on_a,
        serve(DispatchManager(AvatarDispatcher(**creds(node_b), agent_name=AGENT_NAME))) as on_b,
        Subscriber(node_b, room, identity="user") as user,
    ):

        async def join(service, node) -> object:
            return await join_room(service, node, room, "avatar", listen_to="user", timeout=30)

        answers = await asyncio.gather(join(on_a, node_a), join(on_b, node_b))
        if all(a.status_code == 503 for a in answers):
            # seen once in a CI run of many (no worker took the job within 10 s, both replicas
            # said so): an app is told to ask again after Retry-After, and so does this test
            wait = float(answers[0].headers["Retry-After"])
            print(f"two nodes: both joins refused ({answers[0].json()['error']['code']}), again")
            await asyncio.sleep(wait)
            answers = await asyncio.gather(join(on_a, node_a), join(on_b, node_b))
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        avatar, fps = await watched(user)
        print(f"two nodes: the avatar reaches the user on node B at {fps:.1f} FPS")
        assert avatar.identity == "avatar"
        # one avatar: one dispatch kept, and both nodes list the same one
        await until(
            lambda: worker.text().count("is rendering in room") >= 1, 10, "the worker renders"
        )
        listed = [await dispatches(node, room) for node in (node_a, node_b)]
        assert listed[0] == listed[1] and len(listed[0]) == 1, listed
        assert worker.text().count("is rendering in room") == 1, "one avatar, not two"
        agents = [
            p.identity
            for p in user.room.remote_participants.values()
            if p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
        ]
        assert agents == ["avatar"], agents

        gone = await on_b.post("/v1/agents/demo/leave-room", json={"room_name": room}, timeout=30)
        assert gone.status_code == 200, gone.text
        await user.wait_gone("avatar", 20)
        assert await dispatches(node_a, room) == []


async def test_an_agent_on_node_b_gets_its_avatar_from_a_worker_on_node_a(
    livekit_cluster, tmp_path, monkeypatch
):
    """``AvatarSession(mode="dispatch")`` of an agent connected to node B, whose LiveKit API
    is node B's: the job goes over Redis to the worker registered with node A."""
    node_a, node_b = livekit_cluster
    for name, value in node_b.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AVATARHUB_AGENT_NAME", AGENT_NAME)
    room_name = "cluster-agent"
    async with (
        avatar_worker(node_a, tmp_path, AGENT_NAME) as worker,
        Subscriber(node_b, room_name, identity="user") as user,
    ):
        room = rtc.Room()
        await room.connect(node_b.url, node_b.token("agent", room_name, kind="agent"))
        avatar, session = AvatarSession(avatar_id="demo", mode="dispatch"), AgentSession()
        try:
            await avatar.start(session, room=room)
            seen, fps = await watched(user)
            print(f"two nodes: an agent on node B, its avatar at {fps:.1f} FPS")
            assert "is rendering in room" in worker.text()
            lkapi = node_a.api()
            try:
                listed = await lkapi.room.list_participants(
                    api.ListParticipantsRequest(room=room_name)
                )
            finally:
                await lkapi.aclose()
            on_a = {p.identity for p in listed.participants}
            assert {"agent", "user", seen.identity} <= on_a, "node A lists the room of node B"
        finally:
            await avatar.aclose()
            await session.aclose()
            await room.disconnect()


def creds(node) -> dict[str, str]:
    return {"url": node.url, "api_key": node.api_key, "api_secret": node.api_secret}


async def test_redis_gone_for_five_seconds(tmp_path):
    """Redis, which the nodes share, is gone for 5 s, twice: first unresponsive (``CLIENT
    PAUSE``: a network blip), then shut down and started again empty (a restart without
    persistence; LiveKit keeps its cluster state there). What the fleet does is LiveKit's,
    measured here: the avatar in a room keeps reaching its user throughout; a join asked for
    meanwhile gets an answer in seconds, never a hang; after the blip joins render again.
    Each join is for a room its user is already in (the Flutter flow)."""
    from livekit_real import find_tool, running_redis, running_server

    binary, redis = find_tool("livekit-server"), find_tool("redis-server")
    assert binary and redis, "run `bash scripts/install-tools`"
    cluster = contextlib.ExitStack()
    address = cluster.enter_context(running_redis(redis, tmp_path))
    node_a = cluster.enter_context(running_server(binary, tmp_path, redis=address))
    node_b = cluster.enter_context(running_server(binary, tmp_path, redis=address))
    restarted = contextlib.ExitStack()  # Redis started again: stopped after the nodes
    waiting: list[rtc.Room] = []  # a user in each room a join is asked for
    with restarted, cluster:
        async with (
            avatar_worker(node_a, tmp_path, AGENT_NAME) as worker,
            serve(
                DispatchManager(AvatarDispatcher(**creds(node_b), agent_name=AGENT_NAME))
            ) as on_b,
            Subscriber(node_b, "redis-0", identity="user") as user,
        ):
            for n in range(1, 9):
                room = rtc.Room()
                await room.connect(
                    node_b.url,
                    node_b.token("user", f"redis-{n}", publish=False),
                    rtc.RoomOptions(auto_subscribe=False),
                )
                waiting.append(room)
            joins = 0

            async def join() -> tuple[int, str, str | None, float]:
                """The next room's join-room request: its status, error code, Retry-After and
                how long it took."""
                nonlocal joins
                started = time.monotonic()
                answer = await join_room(
                    on_b, node_b, f"redis-{joins}", "avatar", listen_to="user", timeout=60
                )
                joins += 1
                took = round(time.monotonic() - started, 1)
                error = {} if answer.status_code == 200 else answer.json()["error"]
                code = f"{error['code']}: {error['message'][:100]}" if error else ""
                return answer.status_code, code, answer.headers.get("retry-after"), took

            first = await join()
            assert first[0] == 200, first
            await watched(user, seconds=2)
            seen: dict[str, object] = {}

            async def until_a_join_renders(since: float, tries: int, pause: float) -> None:
                for _ in range(tries):
                    answer = await join()
                    if answer[0] == 200:
                        seen["joins renders again after (s)"] = round(time.monotonic() - since, 1)
                        return
                    seen.setdefault("refused after", []).append(answer)  # type: ignore[union-attr]
                    await asyncio.sleep(pause)

            # 1. a blip: Redis answers nobody for 5 s
            blip = time.monotonic()
            await asyncio.to_thread(redis_command, address, "CLIENT PAUSE 5000 ALL")
            seen["join during the blip"] = during_blip = await join()
            await asyncio.sleep(max(0.0, 5.0 - (time.monotonic() - blip)))
            await until_a_join_renders(blip + 5, 3, 2)
            after_blip = seen.pop("joins renders again after (s)", None)
            seen["blip over -> a join renders (s)"] = after_blip
            seen["frames each second, blip"] = user.frames_each_second(blip, blip + 5)

            # 2. Redis shut down, and started again 5 s later, empty
            gone = time.monotonic()
            await asyncio.to_thread(redis_command, address, "SHUTDOWN NOSAVE")
            seen["join while Redis is down"] = while_down = await join()
            await asyncio.sleep(max(0.0, 5.0 - (time.monotonic() - gone)))
            port = int(address.rsplit(":", 1)[1])
            restarted.enter_context(running_redis(redis, tmp_path, port=port))
            back = time.monotonic()
            seen["frames each second, Redis down"] = user.frames_each_second(gone, back)
            # how soon LiveKit places an avatar again varies from 11 s to over 80 s (printed)
            await until_a_join_renders(back, 4, 10)
            seen["worker alive"] = worker.alive()
            for what, value in seen.items():
                print(f"{what}: {value}")

            for status, code, retry_after, took in (during_blip, while_down):
                assert took < 30, f"a join waited {took:.0f} s"  # an answer, never a hang
                # LiveKit's "try later", passed on as one: 503 with Retry-After
                assert status == 200 or (
                    (status, retry_after) == (503, "5") and code.startswith("LIVEKIT_UNAVAILABLE")
                ), (status, code, retry_after)
            assert after_blip is not None, "no join rendered after the blip"
            for span in ("frames each second, blip", "frames each second, Redis down"):
                assert min(seen[span]) >= 20, f"{span}: {seen[span]}"  # media needs no Redis
            for room in waiting:
                await room.disconnect()
        for node in (node_a, node_b):
            node.stop()  # before Redis goes


def redis_command(address: str, command: str) -> None:
    """One command to Redis, as its own client would send it; an answer is not waited for
    (``SHUTDOWN`` sends none)."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(command.encode() + b"\r\n")
        with contextlib.suppress(OSError):
            conn.recv(64)
