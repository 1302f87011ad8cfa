"""Past one machine: avatar workers, against a stand-in of LiveKit's agent protocol.

What a real server shows is proven in ``test_real_dispatch.py`` and ``test_real_modes.py``.
Here the LiveKit side is a loopback stand-in (``livekit_server``) for what a real server does
not let a test see: the load each worker reports, the answers it gives to job offers, and a
worker leaving the pool on SIGTERM. ``livekit-agents``' own worker is the client; the job's
room is the duck-typed room.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from livekit import rtc

pytest.importorskip("aiohttp")

from livekit import api as lkapi
from livekit_plugins_avatarhub._compat import agent_worker
from livekit_plugins_avatarhub.exceptions import ConfigurationError
from livekit_plugins_avatarhub.remote import jobs as avatar_jobs
from livekit_plugins_avatarhub.remote.dispatcher import AvatarDispatcher
from livekit_plugins_avatarhub.remote.jobs import worker_options
from livekit_plugins_avatarhub.remote.protocol import AvatarJob

from fakes import FakeRoom
from livekit_real import until
from livekit_server import FakeLiveKitServer
from service_harness import LK_KEY, LK_SECRET


@pytest.fixture
async def livekit_server(monkeypatch):
    server = await FakeLiveKitServer(LK_KEY, LK_SECRET).start()
    monkeypatch.setenv("LIVEKIT_URL", server.url.replace("http", "ws"))
    monkeypatch.setenv("LIVEKIT_API_KEY", LK_KEY)
    monkeypatch.setenv("LIVEKIT_API_SECRET", LK_SECRET)
    yield server
    await server.stop()


# --- the job's metadata ---------------------------------------------------------------------


def test_job_metadata_round_trips_and_bad_metadata_says_why():
    job = AvatarJob("A91XMB7113", model="expression", participant_name="BitHuman Agent")
    assert AvatarJob.parse(job.to_metadata()) == job
    limited = AvatarJob("demo", max_session_seconds=90.0)
    assert AvatarJob.parse(limited.to_metadata()).max_session_seconds == 90.0
    for metadata, words in [
        ("", "not JSON"),
        ("[1]", "JSON object"),
        ('{"agent_id": "nope"}', "not a bitHuman agent code"),
        ('{"agent_id": "demo", "model": "essense"}', "unknown model"),
        ('{"agent_id": "demo", "colour": "red"}', "unknown fields"),
        ('{"agent_id": "demo", "listen_to": "u", "publish_on_behalf": "a"}', "not both"),
        ('{"agent_id": "demo", "participant_name": 7}', "participant_name"),
        ('{"agent_id": "demo", "max_session_seconds": 0}', "max_session_seconds"),
        ('{"agent_id": "demo", "max_session_seconds": "1h"}', "max_session_seconds"),
    ]:
        with pytest.raises(ConfigurationError, match=words):
            AvatarJob.parse(metadata)


# --- the Twirp AgentDispatchService through livekit-api -----------------------------------


# --- the avatar worker: the real livekit-agents worker against the stand-in -----------------


@pytest.fixture
def job_rooms(monkeypatch):
    """Each job's room: a duck-typed room with the agent it serves already in it."""
    rooms: list[FakeRoom] = []

    async def join_room(ctx):
        room = FakeRoom(ctx.job.room.name)
        room.local_participant.identity = "bithuman-avatar-agent"
        room.join("agent-9")
        rooms.append(room)
        return room

    monkeypatch.setattr(avatar_jobs, "join_room", join_room)
    return rooms


async def test_avatar_worker_registers_reports_load_and_runs_dispatched_jobs(
    livekit_server, job_rooms, caplog, bithuman_env
):
    import logging

    from livekit.agents import JobExecutorType

    caplog.set_level(logging.INFO)
    options = worker_options(
        max_avatars=8,
        ws_url=livekit_server.url.replace("http", "ws"),
        api_key=LK_KEY,
        api_secret=LK_SECRET,
        job_executor_type=JobExecutorType.THREAD,
    )
    worker, run = agent_worker(options)
    running = asyncio.create_task(run())
    dispatcher = AvatarDispatcher()
    try:
        await until(lambda: livekit_server.workers, what="the worker to register")
        assert livekit_server.workers[0].agent_name == "avatarhub-avatar"
        job = AvatarJob(
            "demo",
            participant_identity="bithuman-avatar-agent",
            participant_name="BitHuman Agent",
            publish_on_behalf="agent-9",
        )
        await dispatcher.ensure("room-w", job)
        await until(lambda: livekit_server.assigned, what="the job to be assigned")
        # accepted as the participant the metadata asks for
        worker_id, answer = livekit_server.offers[0]
        assert answer.available and answer.participant_identity == "bithuman-avatar-agent"
        assert answer.participant_name == "BitHuman Agent"
        assert answer.participant_attributes["lk.publish_on_behalf"] == "agent-9"
        # our job runs: the avatar publishes video into its room
        await until(lambda: job_rooms, what="the job to start")
        await job_rooms[0].wait_published(rtc.TrackKind.KIND_VIDEO)
        # load = active avatars / capacity, reported to LiveKit
        await until(lambda: 0.125 in livekit_server.workers[0].loads, what="load 1/8")

        # a malformed job fails alone; the worker stays healthy and takes the next one
        bad = lkapi.CreateAgentDispatchRequest(
            agent_name="avatarhub-avatar", room="room-bad", metadata='{"agent_id": "nope"}'
        )
        await dispatcher._client().agent_dispatch.create_dispatch(bad)
        await until(lambda: len(livekit_server.assigned) == 2, what="the bad job's assignment")
        # so does an avatar bitHuman does not know (its job joins, then fails loading it)
        await dispatcher.ensure("room-u", AvatarJob("B000000000", publish_on_behalf="agent-9"))
        await until(lambda: len(livekit_server.assigned) == 3, what="the unknown avatar's job")
        await until(
            lambda: any(
                "B000000000" in r.getMessage() and "404" in r.getMessage() for r in caplog.records
            ),
            what="the unknown avatar's failure",
        )
        await dispatcher.ensure("room-x", AvatarJob("demo", publish_on_behalf="agent-9"))
        await until(
            lambda: any(r.name == "room-x" for r in job_rooms), timeout=30, what="the next job"
        )
        await next(r for r in job_rooms if r.name == "room-x").wait_published(
            rtc.TrackKind.KIND_VIDEO
        )
        # replicas asking for one avatar at the same moment keep one dispatch between them
        twin = AvatarDispatcher()
        try:
            kept = await asyncio.gather(
                *(
                    d.ensure("room-y", AvatarJob("demo", publish_on_behalf="agent-9"))
                    for d in (dispatcher, twin)
                )
            )
        finally:
            await twin.aclose()
        listed = [d.id for d in livekit_server.dispatches["room-y"]]
        assert len(listed) == 1 and {i for i, _ in kept} == set(listed), (kept, listed)
        # and a worker offered a newer dispatch of an avatar already in its room leaves it
        newer = await dispatcher._client().agent_dispatch.create_dispatch(
            lkapi.CreateAgentDispatchRequest(
                agent_name="avatarhub-avatar",
                room="room-y",
                metadata=AvatarJob("demo", publish_on_behalf="agent-9").to_metadata(),
            )
        )
        await until(
            lambda: any(
                f"dispatch {listed[0]} put avatar demo" in r.getMessage() for r in caplog.records
            ),
            what="the newer dispatch's job to leave",
        )
        assert newer.id != listed[0]
        assert [r.name for r in job_rooms].count("room-y") == 1, "the avatar joined once"
        assert len(livekit_server.workers) == 1, "the worker stayed registered"
        from prometheus_client import REGISTRY

        await until(
            lambda: (REGISTRY.get_sample_value("avatarhub_job_frames_published_total") or 0) > 0,
            what="the jobs' frame counts in Prometheus",
        )
        frames = REGISTRY.get_sample_value("avatarhub_job_frames_published_total") or 0
        rendered = REGISTRY.get_sample_value("avatarhub_job_rendered_seconds_total") or 0
        assert rendered > 0 and abs(rendered - frames / 25) < 1.0, "billed time follows frames"
        # each job that published video has its time to first frame in the histogram
        await until(
            lambda: (
                (REGISTRY.get_sample_value("avatarhub_job_first_frame_seconds_count") or 0) >= 2
            ),
            what="the jobs' first frames in Prometheus",
        )
        failure = [r for r in caplog.records if "not a bitHuman agent code" in r.getMessage()]
        assert failure, "the bad job failed saying why"
        assert all(r.name != "room-bad" for r in job_rooms), "a bad job never entered a room"
    finally:
        await dispatcher.aclose()
        await worker.aclose()
        await asyncio.wait_for(asyncio.gather(running, return_exceptions=True), 20)


def join_request(server: FakeLiveKitServer, identity: str, room: str) -> dict[str, str]:
    """The Flutter app's join-room body, with the avatar's token for ``room``."""
    token = (
        lkapi.AccessToken(LK_KEY, LK_SECRET)
        .with_identity(identity)
        .with_kind("agent")
        .with_grants(lkapi.VideoGrants(room_join=True, room=room))
    )
    return {"room_url": server.url, "room_token": token.to_jwt()}


async def test_a_dispatch_no_worker_takes_is_withdrawn_and_refused_with_retry_after(
    livekit_server, monkeypatch
):
    """LiveKit drops a dispatch no worker takes and never offers it again. `serve --dispatch`
    must not answer "dispatched" for it: it withdraws it and answers 503 with Retry-After, and
    the next try, once a worker has room, is a fresh dispatch that lands."""
    from livekit_plugins_avatarhub.remote import dispatcher
    from livekit_plugins_avatarhub.service.dispatched import DispatchManager

    from service_harness import serve

    monkeypatch.setattr(dispatcher, "ASSIGN_TIMEOUT", 1.0)  # 10 s against a real LiveKit

    flutter = join_request(livekit_server, "avatar-7", "room-full")
    manager = DispatchManager(AvatarDispatcher())
    async with serve(manager) as client:
        refused = await client.post("/v1/agents/demo/join-room", json=flutter, timeout=15)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "5"
        error = refused.json()["error"]
        assert error["code"] == "CAPACITY" and "worker start" in error["message"], error
        assert livekit_server.dispatches.get("room-full", []) == [], "withdrawn, not left dead"
        # a dispatch from before (a replica's, or one LiveKit dropped) is not mistaken for one
        # that runs: it is withdrawn and asked for afresh
        stale = await manager.dispatcher._client().agent_dispatch.create_dispatch(
            lkapi.CreateAgentDispatchRequest(
                agent_name="avatarhub-avatar",
                room="room-full",
                metadata=AvatarJob("demo", participant_identity="avatar-7").to_metadata(),
            )
        )
        again = await client.post("/v1/agents/demo/join-room", json=flutter, timeout=15)
        assert again.status_code == 503
        assert livekit_server.dispatches.get("room-full", []) == []
        assert stale.id not in str(again.json())


@pytest.mark.parametrize(
    "status, code, message",
    [
        (503, "unavailable", "no response from servers"),  # its nodes cannot reach each other
        (500, "unknown", "could not find any available nodes"),  # none registered (yet)
    ],
)
async def test_livekits_not_now_is_a_503_with_retry_after(
    livekit_server, monkeypatch, status, code, message
):
    """A multi-node LiveKit whose Redis is away says "not now" in these two ways (measured in
    tests/test_real_multinode.py): `serve --dispatch` passes it on as 503 LIVEKIT_UNAVAILABLE
    with Retry-After, which clients retry, not as a 502 that looks like the service's fault."""
    from livekit_plugins_avatarhub.service.dispatched import DispatchManager

    from service_harness import serve

    async def not_now(body: bytes, grants: object) -> object:
        return (code, message), status

    monkeypatch.setattr(livekit_server, "_AgentDispatchService_ListDispatch", not_now)
    flutter = join_request(livekit_server, "avatar-8", "room-redis")
    async with serve(DispatchManager(AvatarDispatcher())) as client:
        answer = await client.post("/v1/agents/demo/join-room", json=flutter, timeout=15)
    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"] == "5"
    error = answer.json()["error"]
    assert error["code"] == "LIVEKIT_UNAVAILABLE" and message in error["message"], error
    assert LK_SECRET not in answer.text


def test_one_agent_name_variable_names_the_workers_on_every_side(monkeypatch):
    """AVATARHUB_AGENT_NAME set on every machine: the worker registers under it, and both the
    agent's mode="dispatch" and `serve --dispatch` dispatch to it (the real-room tests run
    the same with processes)."""
    from livekit_plugins_avatarhub import AvatarSession
    from livekit_plugins_avatarhub.remote.dispatcher import AvatarDispatcher

    monkeypatch.setenv("AVATARHUB_AGENT_NAME", "fleet-a")
    keys = {"url": "ws://127.0.0.1:1", "api_key": "k", "api_secret": "s" * 32}
    assert worker_options().agent_name == "fleet-a"  # `worker start`
    assert AvatarDispatcher(**keys).agent_name == "fleet-a"  # `serve --dispatch`
    session = AvatarSession(avatar_id="demo", mode="dispatch")
    assert session._backend.agent_name == "fleet-a"  # the agent
    # an explicit name still wins, on each side
    assert worker_options(agent_name="other").agent_name == "other"
    assert AvatarDispatcher(**keys, agent_name="other").agent_name == "other"


def test_worker_command_checks_its_own_options():
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "livekit_plugins_avatarhub",
            "worker",
            "--max-avatars",
            "0",
            "start",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "--max-avatars must be at least 1" in result.stderr


def test_capacity_follows_the_machine():
    import os

    capacity = avatar_jobs.default_capacity()
    assert 1 <= capacity <= (os.cpu_count() or 1)
    options = worker_options(max_avatars=4)
    assert options.agent_name == "avatarhub-avatar"
    load = options.load_fnc
    fake = type("W", (), {"active_jobs": running("a", "b", "c")})()
    assert load(fake) == 0.75 < options.load_threshold  # room for a fourth
    fake.active_jobs = running("a", "b", "c", "d")
    assert load(fake) == 1.0 >= options.load_threshold  # full: LiveKit sends no more jobs


def running(*job_ids: str) -> list:
    """LiveKit's ``RunningJobInfo`` of a worker's active jobs, as far as load and admission
    read them."""
    from types import SimpleNamespace

    return [SimpleNamespace(job=SimpleNamespace(id=job_id)) for job_id in job_ids]


class Request:
    """What LiveKit's ``request_fnc`` is handed: the job, and its accept / reject answers."""

    def __init__(self, job_id: str) -> None:
        from types import SimpleNamespace

        self.job = SimpleNamespace(id=job_id, metadata=AvatarJob("demo").to_metadata())
        self.answer: str | None = None

    async def accept(self, **_: object) -> None:
        self.answer = "accepted"

    async def reject(self) -> None:
        self.answer = "rejected"


async def test_a_burst_of_jobs_never_puts_a_worker_above_its_capacity():
    """LiveKit marks a worker full only at its next load report: three requests before it
    must not give a 2-avatar worker three avatars. The third is refused (LiveKit offers it to
    the next worker), the load counts the promised ones, and a slot frees when a job ends."""
    options = worker_options(max_avatars=2)
    worker = type("W", (), {"active_jobs": []})()
    assert options.load_fnc(worker) == 0.0
    burst = [Request(f"AJ_{n}") for n in range(3)]
    for request in burst:
        await options.request_fnc(request)
    assert [r.answer for r in burst] == ["accepted", "accepted", "rejected"]
    assert options.load_fnc(worker) == 1.0, "promised slots count before the jobs run"
    worker.active_jobs = running("AJ_0", "AJ_1")  # both started
    late = Request("AJ_3")
    await options.request_fnc(late)
    assert late.answer == "rejected" and options.load_fnc(worker) == 1.0
    worker.active_jobs = running("AJ_1")  # one avatar left
    again = Request("AJ_4")
    await options.request_fnc(again)
    assert again.answer == "accepted"


async def test_a_worker_that_cannot_reach_livekit_says_where_once_and_retries(tmp_path):
    """`worker start` pointed at a LiveKit that does not answer (a port that hangs up at once)
    starts, says once which URL it cannot reach and why, and keeps trying with growing waits
    (LiveKit's own worker loop), instead of exiting, hanging silently or logging every try;
    the API secret is in none of it."""
    from livekit_real import free_port
    from real_processes import spawn

    tries: list[float] = []

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        now = time.monotonic()
        if not tries or now - tries[-1] > 0.5:  # one try may connect more than once
            tries.append(now)
        writer.close()

    port = free_port()
    listener = await asyncio.start_server(hang_up, "127.0.0.1", port)
    secret = "unreachable-secret-0123456789abcdef"
    worker = await spawn(
        "worker",
        tmp_path,
        *("-m", "livekit_plugins_avatarhub", "worker", "--http-port", "0", "start"),
        LIVEKIT_URL=f"ws://127.0.0.1:{port}",
        LIVEKIT_API_KEY="avatarhub-key",
        LIVEKIT_API_SECRET=secret,
        AVATARHUB_AGENT_NAME="avatars-unreachable",
    )
    try:
        await until(lambda: len(tries) >= 3, timeout=90, what="three connection attempts")
        assert worker.alive(), "the worker keeps running while LiveKit is away"
    finally:
        worker.proc.kill()
        await worker.proc.wait()
        listener.close()
    waits = [round(b - a, 1) for a, b in itertools.pairwise(tries)]
    assert waits == sorted(waits) and waits[-1] >= waits[0] + 1.5, f"a growing backoff: {waits}"
    lines = worker.text().splitlines()
    said = [line for line in lines if "cannot reach LiveKit" in line]
    assert len(said) == 1 and f"ws://127.0.0.1:{port}" in said[0], said  # where, once
    assert not [line for line in lines if "failed to connect to livekit" in line]
    assert secret not in worker.text()


async def test_worker_command_registers_and_drains_on_sigterm(livekit_server, tmp_path):
    """`worker start` as a user runs it: registers with LiveKit, and SIGTERM drains it."""
    import os
    import signal
    import sys

    log = (tmp_path / "worker.log").open("wb")  # a file, not a pipe nobody drains while waiting
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "livekit_plugins_avatarhub",
        "worker",
        "--agent-name",
        "avatars-eu",
        "--max-avatars",
        "3",
        "start",
        env={**os.environ, "LIVEKIT_URL": livekit_server.url.replace("http", "ws")},
        stdout=log,
        stderr=log,
    )
    try:
        await until(lambda: livekit_server.workers, timeout=60, what="the worker to register")
        registered = livekit_server.workers[0]
        assert registered.agent_name == "avatars-eu"
        await until(lambda: registered.loads, what="a load report")
        assert registered.loads[-1] == 0.0 and registered.status == 0  # WS_AVAILABLE
        started = asyncio.get_running_loop().time()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 60)
        took = asyncio.get_running_loop().time() - started
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
    assert code == 0, (tmp_path / "worker.log").read_text(errors="replace")[-2000:]
    assert took < 30
    assert not livekit_server.workers, "it left LiveKit's worker pool"
