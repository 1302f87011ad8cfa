"""A fleet of avatar workers on a real LiveKit server's own job dispatch.

Two ``worker start --max-avatars 2`` processes registered under one agent name; six avatars
asked for at once, three through ``serve --dispatch`` (the Flutter join-room flow) and three
by agents with ``AvatarSession(mode="dispatch")``. LiveKit places each job by the load the
workers report; the package adds only what LiveKit lacks: a worker refuses a job it has no
slot for (LiveKit offers it to the next), and a job no worker takes is withdrawn and refused
with a time to try again, instead of lost in a dispatch LiveKit never offers again.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from livekit.agents import AgentSession

from livekit import api, rtc
from livekit_plugins_avatarhub import AvatarSession, CapacityError
from livekit_plugins_avatarhub.remote.dispatcher import AvatarDispatcher
from livekit_plugins_avatarhub.service.dispatched import DispatchManager

from real_processes import avatar_worker, join_room
from service_harness import serve

pytestmark = [pytest.mark.livekit_real, pytest.mark.slow]

AGENT_NAME = "avatars-fleet"


async def who(server, room: str) -> list[tuple[str, int, list[int]]]:
    """Who is in the room, their kind and the types of what they publish, as LiveKit lists it."""
    lkapi = server.api()
    try:
        found = await lkapi.room.list_participants(api.ListParticipantsRequest(room=room))
    finally:
        await lkapi.aclose()
    return [(p.identity, p.kind, [t.type for t in p.tracks]) for p in found.participants]


async def rendering(server, room: str) -> bool:
    """Whether the room has an avatar participant publishing video, as LiveKit lists it."""
    from livekit.protocol import models

    return any(
        kind == models.ParticipantInfo.Kind.AGENT and models.TrackType.VIDEO in types
        for _, kind, types in await who(server, room)
    )


def listen(publication: rtc.RemoteTrackPublication, participant: rtc.RemoteParticipant) -> None:
    if publication.kind == rtc.TrackKind.KIND_AUDIO:
        publication.set_subscribed(True)


async def test_six_avatars_on_two_workers_of_two_slots(real_livekit, tmp_path, monkeypatch):
    for name, value in real_livekit.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AVATARHUB_AGENT_NAME", AGENT_NAME)  # the agents' and the service's
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    agents: list[tuple[rtc.Room, AvatarSession, AgentSession]] = []
    users: list[rtc.Room] = []
    async with (
        avatar_worker(real_livekit, tmp_path / "a", AGENT_NAME, "--max-avatars", "2") as one,
        avatar_worker(real_livekit, tmp_path / "b", AGENT_NAME, "--max-avatars", "2") as two,
        serve(DispatchManager(AvatarDispatcher())) as service,
    ):
        # both registered (the helper waits for it): a dispatch nobody is registered for
        # would be dropped by LiveKit

        # a user in each room (LiveKit closes a room with nobody but agents in it), who listens
        # to the avatar's audio (LiveKit's avatar runner publishes the video once someone
        # does) and decodes no video: what is rendered is read off LiveKit's own listing
        for n in range(1, 7):
            user = rtc.Room()
            user.on("track_published", listen)
            await user.connect(
                real_livekit.url,
                real_livekit.token(f"user-{n}", f"fleet-{n}", publish=False),
                rtc.RoomOptions(auto_subscribe=False),
            )
            users.append(user)

        async def by_flutter(n: int) -> tuple[str, object]:
            room = f"fleet-{n}"
            started = time.monotonic()
            answer = await service.post(
                "/v1/agents/demo/join-room",
                json={
                    "room_url": real_livekit.url,
                    "room_token": real_livekit.token(f"avatar-{n}", room, kind="agent"),
                    "listen_to": f"user-{n}",  # the app's user, whose microphone it follows
                },
                timeout=30,
            )
            return room, (answer, time.monotonic() - started)

        async def avatar_for(room: rtc.Room) -> None:
            """An agent's dispatch-mode avatar in ``room`` (closed on the way out)."""
            avatar = AvatarSession(avatar_id="demo", mode="dispatch")
            session = AgentSession()
            agents.append((room, avatar, session))
            await avatar.start(session, room=room)

        async def by_agent(n: int) -> tuple[str, object]:
            room = rtc.Room()
            await room.connect(
                real_livekit.url, real_livekit.token(f"agent-{n}", f"fleet-{n}", kind="agent")
            )
            started = time.monotonic()
            try:
                await avatar_for(room)
            except CapacityError as err:
                return room.name, (err, time.monotonic() - started)
            return room.name, ("joined", time.monotonic() - started)

        try:
            results = dict(
                await asyncio.gather(
                    *(by_flutter(n) for n in (1, 2, 3)), *(by_agent(n) for n in (4, 5, 6))
                )
            )
            placed, refused = [], []
            for room, (outcome, took) in results.items():
                if isinstance(outcome, CapacityError):
                    refused.append((room, str(outcome), took))
                elif outcome == "joined" or outcome.status_code == 200:
                    placed.append(room)
                else:
                    assert outcome.status_code == 503, outcome.text
                    assert outcome.headers["retry-after"] == "5"
                    refused.append((room, outcome.json()["error"]["message"], took))
            print(f"placed {sorted(placed)}, refused {[(r, round(t, 2)) for r, _, t in refused]}")
            assert len(placed) == 4 and len(refused) == 2, (placed, refused)
            for room, message, took in refused:  # told at once, with what to do
                assert "every one is full" in message, message
                assert took < 20, f"{room} refused after {took:.1f} s"
            # four render, two on each worker: none above its cap
            deadline = time.monotonic() + 30
            while not all([await rendering(real_livekit, r) for r in placed]):
                if time.monotonic() > deadline:
                    raise AssertionError(
                        "every placed avatar publishes video: "
                        + str({r: await who(real_livekit, r) for r in placed})
                    )
                await asyncio.sleep(0.5)
            per_worker = [w.text().count("is rendering in room") for w in (one, two)]
            assert sorted(per_worker) == [2, 2], per_worker
            admitted = sum(w.text().count("refused: this worker is full") for w in (one, two))
            print(f"avatars per worker {per_worker}; offers a full worker refused: {admitted}")
            # a slot frees: the refused avatar's retry (after Retry-After) lands
            leaving = next(r for r in placed if r in ("fleet-1", "fleet-2", "fleet-3"))
            gone = await service.post(
                "/v1/agents/demo/leave-room", json={"room_name": leaving}, timeout=30
            )
            assert gone.status_code == 200, gone.text
            retried = refused[0][0]
            await asyncio.sleep(5)  # Retry-After
            if retried in ("fleet-1", "fleet-2", "fleet-3"):
                room, (answer, _) = await by_flutter(int(retried.split("-")[1]))
                assert answer.status_code == 200, answer.text
            else:
                await avatar_for(next(r for r, _, _ in agents if r.name == retried))
            deadline = time.monotonic() + 30
            while not await rendering(real_livekit, retried):
                assert time.monotonic() < deadline, f"the retried avatar renders in {retried}"
                await asyncio.sleep(0.5)
        finally:
            for room, avatar, session in agents:
                await avatar.aclose()
                await session.aclose()
                await room.disconnect()
            for user in users:
                await user.disconnect()


def scrape(text: str) -> dict[str, float]:
    """Prometheus text as ``{"name{label=value,...}": value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def total(metrics: dict[str, float], name: str) -> float | None:
    """The sum of a metric's samples over all their labels (LiveKit labels each by node)."""
    found = [v for k, v in metrics.items() if k == name or k.startswith(name + "{")]
    return sum(found) if found else None


async def count_frames(track: rtc.Track, into: list[int]) -> None:
    """Count the frames a viewer's decoder delivers (no conversion: a count is all it needs)."""
    from livekit_real import ViewerVideoStream

    stream = ViewerVideoStream(track)
    try:
        async for _ in stream:
            into[0] += 1
    finally:
        await stream.aclose()


@pytest.mark.real_once
async def test_the_fleets_metrics_add_up_to_what_the_subscribers_saw(
    real_livekit, tmp_path, monkeypatch
):
    """Two workers of one slot, two avatars asked for through ``serve --dispatch``, a viewer in
    each room: each worker's Prometheus endpoint counts the avatar LiveKit lists in its room
    and the frames its viewer received; ``serve`` (stateless) counts the joins that put them
    there."""
    from livekit_real import Subscriber, free_port

    for name, value in real_livekit.env().items():
        monkeypatch.setenv(name, value)
    agent_name = "avatars-metrics"
    monkeypatch.setenv("AVATARHUB_AGENT_NAME", agent_name)
    ports = [free_port(), free_port()]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    rooms = ["metrics-1", "metrics-2"]
    received = {room: [0] for room in rooms}
    counting: list[asyncio.Task[None]] = []

    async with (
        avatar_worker(
            real_livekit,
            tmp_path / "a",
            agent_name,
            *("--max-avatars", "1"),
            *("--prometheus-port", str(ports[0])),
        ) as one,
        avatar_worker(
            real_livekit,
            tmp_path / "b",
            agent_name,
            *("--max-avatars", "1"),
            *("--prometheus-port", str(ports[1])),
        ) as two,
        serve(DispatchManager(AvatarDispatcher())) as service,
        Subscriber(real_livekit, rooms[0], "viewer-1") as first,
        Subscriber(real_livekit, rooms[1], "viewer-2") as second,
    ):
        viewers = {rooms[0]: first, rooms[1]: second}
        for room, viewer in viewers.items():  # from the moment the avatar's video is there

            def counted(track: rtc.Track, *_: object, room: str = room) -> None:
                if track.kind == rtc.TrackKind.KIND_VIDEO:
                    counting.append(asyncio.create_task(count_frames(track, received[room])))

            viewer.room.on("track_subscribed", counted)
        try:
            for room, viewer in viewers.items():  # the Flutter flow: the avatar follows the user
                answer = await join_room(
                    service,
                    real_livekit,
                    room,
                    f"avatar-{room}",
                    listen_to=viewer.identity,
                    timeout=30,
                )
                assert answer.status_code == 200, answer.text
            for viewer in viewers.values():
                await viewer.wait_track(rtc.TrackKind.KIND_VIDEO, timeout=60)
            await asyncio.sleep(8)

            # while they render: one avatar per worker by LiveKit's own gauge, two in serve
            served = {}  # room -> the worker's Prometheus port
            for worker, port in zip((one, two), ports, strict=True):
                room = next(r for r in rooms if f"is rendering in room {r}" in worker.text())
                served[room] = port
                live = await worker_metrics(port)
                assert total(live, "lk_agents_active_job_count") == 1, live
                assert await rendering(real_livekit, room)
            assert sorted(served) == rooms, "one avatar on each worker"
            answer = scrape((await service.get("/metrics")).text)
            # serve keeps no state: its joins add up to the avatars the workers count
            assert answer["avatarhub_joins_total{result=created}"] == 2, answer

            for room, viewer in viewers.items():
                gone = await service.post(
                    "/v1/agents/demo/leave-room", json={"room_name": room}, timeout=30
                )
                assert gone.status_code == 200, gone.text
                await viewer.wait_gone(f"avatar-{room}", timeout=30)
        finally:
            for task in counting:
                task.cancel()
            await asyncio.gather(*counting, return_exceptions=True)

        # each job's last report is in once LiveKit's gauge says the job has ended
        for room, port in served.items():
            await until_async(port, "lk_agents_active_job_count", 0)
            published = (await worker_metrics(port))["avatarhub_job_frames_published_total"]
            seen = received[room][0]
            print(f"{room}: {published:.0f} frames published, {seen} received by the viewer")
            # the first frames go out while the viewer is still subscribing (7-10 in 3 runs)
            assert published - 20 <= seen <= published, (room, published, seen)


async def worker_metrics(port: int) -> dict[str, float]:
    """A worker's Prometheus endpoint (LiveKit's, with its job processes' numbers added up)."""
    import httpx

    async with httpx.AsyncClient() as client:
        return scrape((await client.get(f"http://127.0.0.1:{port}/metrics")).text)


async def until_async(port: int, name: str, value: float, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while total(await worker_metrics(port), name) != value:
        assert time.monotonic() < deadline, f"{name} never became {value}"
        await asyncio.sleep(0.5)
