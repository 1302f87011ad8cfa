"""The self-hosted avatar service: its HTTP API on 127.0.0.1, and its workers in a test room."""

from __future__ import annotations

import asyncio
import json
import logging
import socket

import httpx
import numpy as np
import pytest

from livekit import rtc

pytest.importorskip("aiohttp")


from fakes import FakeRoom
from service_harness import KEY, LK_KEY, LK_SECRET, Harness, room_token, sid_of


def join_body(room: str = "room-a", **extra) -> dict:
    return {
        "room_url": "wss://lk.example.com",
        "room_token": room_token(room),
        "participant_name": "Ava",
        **extra,
    }


async def test_auth_is_required(avatar_service):
    client, _, _ = avatar_service
    for headers in ({"authorization": ""}, {"authorization": "Bearer nope"}):
        r = await client.post("/v1/agents/demo/join-room", json=join_body(), headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "UNAUTHORIZED"
    r = await client.get("/v1/workers", headers={"authorization": "", "api-secret": KEY})
    assert r.status_code == 200
    r = await client.get("/health", headers={"authorization": ""})
    assert r.json()["status"] == "ok"


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/v1/agents/nope/join-room", join_body(), "agent_id"),
        ("/v1/agents/demo/join-room", {**join_body(), "room_url": "ftp://x"}, "room_url"),
        ("/v1/agents/demo/join-room", {"room_url": "wss://x"}, "room_token"),
        ("/v1/agents/demo/join-room", {**join_body(), "room_token": "not-a-jwt"}, "room grant"),
        (
            "/v1/agents/demo/join-room",
            {**join_body(), "participant_name": "x" * 300},
            "participant_name",
        ),
        ("/v1/agents/demo/join-room", [1, 2], "JSON object"),
        (
            "/v1/agents/demo/join-room",
            {**join_body(), "max_session_seconds": -5},
            "max_session_seconds",
        ),
        ("/v1/runtime-tokens/request", {"agent_id": "demo", "mode": "tpu"}, "mode"),
        (
            "/v1/runtime-tokens/request",
            {
                "agent_id": "demo",
                "livekit_url": "wss://x",
                "livekit_token": "t",
                "room_name": "r",
                "model": "essense",
            },
            "model",
        ),
    ],
)
async def test_requests_are_validated(avatar_service, path, body, words):
    client, harness, _ = avatar_service
    r = await client.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["status"] == "error" and words in r.json()["error"]["message"]
    assert not harness.rooms


async def test_join_is_idempotent_per_agent_and_room(avatar_service):
    client, harness, _ = avatar_service
    body = join_body()
    r = await client.post("/v1/agents/demo/join-room", json=body)
    assert r.status_code == 200
    assert r.json() == {
        "success": True,
        "participant_id": sid_of("avatar-1"),  # the avatar's LiveKit SID
        "participant_name": "Ava",
        "status": "connected",
        "created": True,
    }
    # a second join, with a freshly minted token for the same room, finds the same worker
    again = await client.post("/v1/agents/demo/join-room", json=join_body())
    assert again.status_code == 200 and again.json()["created"] is False
    assert len(harness.rooms) == 1
    url, token = harness.rooms[0].connected_with
    assert url == "wss://lk.example.com" and token == body["room_token"]


async def test_capacity_limit_answers_503_with_retry_after(avatar_service):
    client, _, _ = avatar_service
    for room in ("r1", "r2"):
        assert (
            await client.post("/v1/agents/demo/join-room", json=join_body(room))
        ).status_code == 200
    r = await client.post("/v1/agents/demo/join-room", json=join_body("r3"))
    assert r.status_code == 503 and r.headers["retry-after"] == "30"
    assert r.json()["error"]["code"] == "CAPACITY"


async def test_ready_says_whether_a_join_would_work_and_why_not(
    avatar_service, monkeypatch, tmp_path
):
    client, _, _ = avatar_service
    r = await client.get("/ready", headers={"authorization": ""})  # probes carry no key
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ready"] is True and set(body["checks"]) == {
        "livekit",
        "cache",
        "runtime",
        "capacity",
    }
    assert body["checks"]["capacity"]["detail"] == "2 of 2 avatar slots free"
    # every slot busy: not ready, though alive
    for room in ("r1", "r2"):
        assert (await client.post("/v1/agents/demo/join-room", json=join_body(room))).is_success
    r = await client.get("/ready")
    assert r.status_code == 503 and r.json()["reason"] == "capacity: all 2 avatar slots are busy"
    assert (await client.get("/health")).status_code == 200
    await client.post("/v1/agents/demo/leave-room", json={"room_name": "r2"})
    assert (await client.get("/ready")).status_code == 200
    # a download could not land
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("BITHUMAN_CACHE_DIR", str(blocker / "cache"))
    r = await client.get("/ready")
    assert r.status_code == 503 and r.json()["reason"].startswith("cache: the model cache ")


async def test_ready_checks_the_services_livekit_credentials(avatar_service, monkeypatch):
    client, _, _ = avatar_service
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("LIVEKIT_URL", f"ws://127.0.0.1:{port}")  # nothing listens there
    monkeypatch.setenv("LIVEKIT_API_KEY", LK_KEY)
    monkeypatch.setenv("LIVEKIT_API_SECRET", LK_SECRET)
    r = await client.get("/ready")
    assert r.status_code == 503
    reason = r.json()["reason"]
    assert reason.startswith(f"livekit: LiveKit at ws://127.0.0.1:{port} is unreachable")
    assert LK_SECRET not in r.text


async def test_leave_room_stops_the_worker(avatar_service):
    client, harness, manager = avatar_service
    await client.post("/v1/agents/demo/join-room", json=join_body())
    r = await client.post("/v1/agents/demo/leave-room", json={"room_name": "room-a"})
    assert r.json() == {
        "success": True,
        "status": "disconnected",
        "participant_ids": [sid_of("avatar-1")],
    }
    assert not harness.rooms[0].isconnected()
    assert harness.runtimes[0]._closed
    assert manager.workers() == []
    r = await client.post("/v1/agents/demo/leave-room", json={"room_name": "room-a"})
    assert r.status_code == 404


async def test_room_closing_stops_the_worker(avatar_service):
    client, harness, manager = avatar_service
    await client.post("/v1/agents/demo/join-room", json=join_body())
    await harness.rooms[0].disconnect()
    await asyncio.sleep(0.1)
    assert manager.workers() == [] and harness.runtimes[0]._closed


async def test_failures_are_reported_not_hidden(avatar_service):
    client, _, _ = avatar_service
    r = await client.post("/v1/agents/B000000000/join-room", json=join_body())
    assert r.status_code == 422 and "NOT_FOUND" in r.json()["error"]["message"]
    workers = (await client.get("/v1/workers")).json()["data"]
    assert workers[0]["status"] == "failed" and "AvatarNotFoundError" in workers[0]["error"]


async def _workers_until(client, ready, tries: int = 200):
    for _ in range(tries):
        workers = (await client.get("/v1/workers")).json()["data"]
        if workers and ready(workers[0]):
            return workers[0]
        await asyncio.sleep(0.05)
    return workers[0]


def _broken(state):
    raise MemoryError("renderer out of memory")


async def test_a_worker_whose_runtime_crashes_is_listed_as_recovering_then_renders_again(
    avatar_service,
):
    client, harness, _ = avatar_service
    await client.post("/v1/agents/demo/join-room", json=join_body())
    first = harness.runtimes[0]
    first.render = _broken  # type: ignore[method-assign]
    harness.rooms[0].join("agent-1")
    worker = await _workers_until(client, lambda w: w["avatar_state"] == "recovering")
    assert worker["status"] == "connected" and worker["avatar_state"] == "recovering"
    assert "renderer out of memory" in worker["error"]
    worker = await _workers_until(client, lambda w: w["avatar_state"] == "rendering")
    assert worker["avatar_state"] == "rendering" and worker["error"] is None
    assert len(harness.runtimes) == 2 and harness.runtimes[1] is not first  # loaded again


async def test_a_worker_whose_runtime_cannot_come_back_speaks_on_as_audio_only(
    avatar_service, monkeypatch
):
    from livekit_plugins_avatarhub.rendering.failover import Failover

    monkeypatch.setattr(Failover, "delay", lambda self, attempt: 0.05)  # not 0.5, 1 and 2 s
    client, harness, _ = avatar_service
    opened = harness.open

    async def open_broken(agent_id, model):  # every runtime loaded again renders nothing
        avatar = await opened(agent_id, model)
        if len(harness.runtimes) > 1:
            avatar.runtime.render = _broken  # type: ignore[method-assign]
        return avatar

    harness.open = open_broken  # type: ignore[method-assign]
    await client.post("/v1/agents/demo/join-room", json=join_body())
    harness.runtimes[0].render = _broken  # type: ignore[method-assign]
    harness.rooms[0].join("agent-1")
    worker = await _workers_until(client, lambda w: w["avatar_state"] == "audio_only", 300)
    assert worker["status"] == "connected" and worker["avatar_state"] == "audio_only"
    assert "3 attempts failed" in worker["error"]
    assert len(harness.runtimes) == 4  # the first, then three attempts


async def test_launch_request_of_the_cloud_plugin(avatar_service):
    client, harness, _ = avatar_service
    body = {
        "mode": "cpu",
        "model": "essence",
        "agent_id": "demo",
        "livekit_url": "wss://lk",
        "livekit_token": room_token("room-z", "bithuman-avatar-agent"),
        "room_name": "room-z",
    }
    r = await client.post("/v1/runtime-tokens/request", json=body)
    assert r.status_code == 200 and r.json()["participant_id"] == sid_of("bithuman-avatar-agent")
    assert (await client.post("/v1/runtime-tokens/request", json=body)).json()["created"] is False


async def test_no_key_or_token_in_logs(avatar_service, caplog):
    caplog.set_level(logging.DEBUG)
    client, _, _ = avatar_service
    body = join_body()
    await client.post("/v1/agents/demo/join-room", json=body)
    await client.post("/v1/agents/B000000000/join-room", json=body)
    assert KEY not in caplog.text and body["room_token"] not in caplog.text


# --- the worker in a test room ------------------------------------------------------------


def tone(seconds: float) -> bytes:
    t = np.arange(int(seconds * 16000)) / 16000
    return (np.sin(2 * np.pi * 200 * t) * 16000).astype(np.int16).tobytes()


@pytest.fixture
async def worker():
    harness = Harness()
    w = harness.worker(agent_id="demo", room_url="wss://lk", token=room_token("r"))
    await w.start()
    room = harness.rooms[0]
    room.join("agent-1")  # the agent that streams its speech to the avatar
    yield w, room
    await w.stop()


async def test_worker_renders_streamed_audio_and_reports_playback(worker):
    w, room = worker
    for _ in range(100):
        if "lk.audio_stream" in room.byte_stream_handlers:
            break
        await asyncio.sleep(0.02)
    room.send_audio_stream("agent-1", tone(1.0))
    pub = await room.wait_published(rtc.TrackKind.KIND_VIDEO)
    assert pub.options.video_codec == rtc.VideoCodec.H264
    stream = rtc.VideoStream(pub.track)
    frames = 0

    async def count():
        nonlocal frames
        async for _ in stream:
            frames += 1

    task = asyncio.create_task(count())
    for _ in range(100):
        if any(m == "lk.playback_finished" for _, m, _ in room.rpc_calls):
            break
        await asyncio.sleep(0.05)
    task.cancel()
    await stream.aclose()
    finished = [json.loads(p) for d, m, p in room.rpc_calls if m == "lk.playback_finished"]
    assert finished and finished[0]["interrupted"] is False
    assert finished[0]["playback_position"] == pytest.approx(1.0, abs=0.05)
    assert all(d == "agent-1" for d, _, _ in room.rpc_calls)
    assert frames >= 20


async def test_worker_answers_trigger_dynamics_and_clear_buffer(worker):
    w, room = worker
    answer = json.loads(
        await room.local_participant.invoke(
            "trigger_dynamics",
            json.dumps({"action": "wave", "identity": "agent-1", "timestamp": 1}),
        )
    )
    # bitHuman's documented answer shape
    assert answer == {
        "status": "success",
        "action": "wave",
        "animation_triggered": True,
        "service": "avatarhub",
    }
    assert w.runtime._action is not None and w.runtime._action[0] == "wave"
    bad = json.loads(await room.local_participant.invoke("trigger_dynamics", "not json"))
    assert bad["status"] == "error" and bad["animation_triggered"] is False
    assert "action" in bad["message"]
    for _ in range(100):
        if "lk.clear_buffer" in room.local_participant.rpc_methods:
            break
        await asyncio.sleep(0.02)
    await w.runtime.push_audio(tone(2.0), 16000, last_chunk=False)
    assert await room.local_participant.invoke("lk.clear_buffer", "") == "ok"
    await asyncio.sleep(0.1)
    assert not w.runtime._queue  # the runtime dropped the reply


# --- AvatarSession(mode="participant") against the service ----------------------------------


@pytest.fixture
def livekit_env(monkeypatch):
    monkeypatch.setenv("LIVEKIT_URL", "wss://lk.example.com")
    monkeypatch.setenv("LIVEKIT_API_KEY", LK_KEY)
    monkeypatch.setenv("LIVEKIT_API_SECRET", LK_SECRET)


async def test_participant_mode_runs_the_avatar_in_the_service(avatar_service, livekit_env):
    from livekit.agents import AgentSession

    from livekit_plugins_avatarhub import AvatarSession
    from livekit_plugins_avatarhub.remote.tokens import token_claims

    client, harness, manager = avatar_service
    avatar = AvatarSession(
        avatar_id="demo",
        mode="participant",
        service_url=str(client.base_url),
        service_key=KEY,
        api_secret="bithuman-secret-never-shared",
    )
    room = FakeRoom("room-p")
    session = AgentSession()
    await avatar.start(session, room=room)
    try:
        assert manager.get("demo", "room-p").status == "connected"
        url, token = harness.rooms[0].connected_with
        claims = token_claims(token)
        assert url == "wss://lk.example.com"
        assert claims["sub"] == avatar.avatar_identity == "bithuman-avatar-agent"
        assert claims["video"]["room"] == "room-p" and claims["kind"] == "agent"
        assert claims["attributes"] == {"lk.publish_on_behalf": "agent-test"}
        assert "bithuman-secret-never-shared" not in json.dumps(claims)
        from livekit.agents.voice.avatar import DataStreamAudioOutput

        from livekit_plugins_avatarhub.backends.relay import AvatarRelay

        sink = session.output.audio
        while sink is not None and not isinstance(sink, AvatarRelay):
            sink = getattr(sink, "next_in_chain", None)
        assert isinstance(sink, AvatarRelay) and isinstance(sink._remote, DataStreamAudioOutput), (
            "speech goes to the avatar participant"
        )
    finally:
        await avatar.aclose()
        await session.aclose()
    assert manager.workers() == []  # aclose told the service to leave


async def test_participant_mode_configuration_errors(monkeypatch):
    from livekit.agents import AgentSession

    from livekit_plugins_avatarhub import AvatarSession, ConfigurationError
    from livekit_plugins_avatarhub.exceptions import APIConnectionError

    with pytest.raises(ConfigurationError, match="AVATARHUB_SERVICE_URL"):
        AvatarSession(avatar_id="demo", mode="participant")
    with pytest.raises(ConfigurationError, match="not model_path"):
        AvatarSession(
            model_path="/x.imx",
            mode="participant",
            service_url="http://127.0.0.1:9",
            api_secret="s",
        )
    with pytest.raises(ConfigurationError, match="mode must be"):
        AvatarSession(avatar_id="demo", mode="cloud")  # type: ignore[arg-type]
    avatar = AvatarSession(avatar_id="demo", mode="participant", service_url="http://127.0.0.1:9")
    with pytest.raises(
        ConfigurationError, match="LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET"
    ):
        await avatar.start(AgentSession(), room=FakeRoom())
    monkeypatch.setenv("LIVEKIT_URL", "wss://lk")
    monkeypatch.setenv("LIVEKIT_API_KEY", LK_KEY)
    monkeypatch.setenv("LIVEKIT_API_SECRET", LK_SECRET)
    avatar = AvatarSession(
        avatar_id="demo",
        mode="participant",
        service_url="http://127.0.0.1:9",
        conn_options=__import__("livekit.agents").agents.APIConnectOptions(
            max_retry=0, retry_interval=0.01
        ),
    )
    with pytest.raises(APIConnectionError, match="unreachable"):
        await avatar.start(AgentSession(), room=FakeRoom())


def test_serve_command_runs_and_stops_cleanly(tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AVATARHUB_SERVICE_KEY": KEY}
    refused = subprocess.run(
        [sys.executable, "-m", "livekit_plugins_avatarhub", "serve"],
        env={k: v for k, v in env.items() if k != "AVATARHUB_SERVICE_KEY"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0 and "AVATARHUB_SERVICE_KEY" in refused.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "livekit_plugins_avatarhub", "serve", "--port", str(port)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert r.json() == {"status": "ok", "workers": 0, "max_workers": 4}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/agents/demo/join-room", json={})
        assert r.status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


async def test_worker_lip_syncs_to_a_participants_microphone():
    """The Flutter join-room flow: no agent, the avatar follows a named participant's microphone."""
    from fakes import FakeRemoteParticipant

    harness = Harness()
    w = harness.worker(
        agent_id="demo", room_url="wss://lk", token=room_token("r"), listen_to="user-7"
    )
    await w.start()
    room = harness.rooms[0]
    try:
        # listen to what the avatar publishes before the user starts talking
        pub = await room.wait_published(rtc.TrackKind.KIND_AUDIO)
        stream = rtc.AudioStream(pub.track, sample_rate=16000, num_channels=1)
        heard = []

        async def listen():
            async for event in stream:
                heard.append(np.frombuffer(event.frame.data, np.int16).copy())

        task = asyncio.create_task(listen())
        source = rtc.AudioSource(16000, 1)
        track = rtc.LocalAudioTrack.create_audio_track("mic", source)
        user = FakeRemoteParticipant("user-7", rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD)
        room.remote_participants["user-7"] = user
        room.emit("track_subscribed", track, None, user)
        pcm = np.frombuffer(tone(1.0), np.int16)
        for start in range(0, pcm.size, 160):
            part = pcm[start : start + 160]
            await source.capture_frame(rtc.AudioFrame(part.tobytes(), 16000, 1, part.size))
        silence = np.zeros(160, np.int16)
        for _ in range(100):  # one second of silence ends the segment
            await source.capture_frame(rtc.AudioFrame(silence.tobytes(), 16000, 1, 160))
        await asyncio.sleep(1.0)
        task.cancel()
        await stream.aclose()
        await source.aclose()
        loud = sum(int((np.abs(h) > 3000).sum()) for h in heard)
        assert loud > 8000, "the avatar played the user's speech back in sync with its lips"
    finally:
        await w.stop()


async def test_a_failed_join_frees_its_avatar_at_once_not_at_the_next_gc():
    """A join whose room never connects leaves nothing behind for the garbage collector: the
    avatar it loaded (frame buffers of megabytes) is gone when the answer is."""
    import gc
    import weakref

    from livekit_plugins_avatarhub.remote.participant import AvatarWorker
    from livekit_plugins_avatarhub.rendering.demo import DemoRuntime
    from livekit_plugins_avatarhub.rendering.loader import OpenedAvatar
    from livekit_plugins_avatarhub.service.manager import WorkerManager

    loaded: list[weakref.ref] = []

    async def opener(agent_id, model):
        runtime = await DemoRuntime.create(output_size=(160, 120))
        loaded.append(weakref.ref(runtime))
        return OpenedAvatar(runtime)

    class Unreachable(FakeRoom):
        async def connect(self, *args, **kwargs):
            raise ConnectionError("engine: signal failure: connection refused")

    manager = WorkerManager(
        lambda **kw: AvatarWorker(opener=opener, room_factory=Unreachable, **kw), max_workers=1
    )
    gc.collect()
    gc.disable()
    try:
        rooms = [f"r{i}" for i in range(5)]
        for room in rooms:
            with pytest.raises(ConnectionError):
                await manager.join(
                    agent_id="demo",
                    room=room,
                    participant_id="p",
                    room_url="wss://lk",
                    token=room_token(room),
                )
        await asyncio.sleep(0.05)  # callbacks of the last start run
        alive = [ref() is not None for ref in loaded]
        # the newest may still be held by its own error on the way out; the others are gone
        # (before the fix every one stayed alive until a full collection)
        assert len(loaded) == 5 and sum(alive) <= 1 and not any(alive[:-1]), alive
    finally:
        gc.enable()
    assert [w.status for w in manager.workers()] == ["failed"] * 5  # still reported


async def test_a_left_avatar_is_freed_at_once_not_at_the_next_gc():
    """Avatars that joined, rendered and left do not pile up, with the collector's own runs off:
    the service collects once per left avatar, so the reference cycles that remain (LiveKit's
    runner and the avatar's failover hold each other) do not keep their runtimes and frames
    until the next full collection."""
    import gc
    import weakref

    from livekit_plugins_avatarhub.service.app import default_manager
    from livekit_plugins_avatarhub.service.manager import WorkerManager
    from livekit_plugins_avatarhub.service.memory import collect_left_avatar

    assert default_manager(api_secret=None, max_workers=1)._on_avatar_gone is collect_left_avatar

    harness = Harness()
    workers: list[weakref.ref] = []

    def worker(**kwargs):
        made = harness.worker(**kwargs)
        workers.append(weakref.ref(made))
        return made

    manager = WorkerManager(worker, max_workers=1, on_avatar_gone=collect_left_avatar)
    gc.collect()
    gc.disable()
    try:
        runtimes: list[weakref.ref] = []
        for n in range(3):
            info, _ = await manager.join(
                agent_id="demo",
                room=f"r{n}",
                participant_id="p",
                room_url="wss://lk",
                token=room_token(f"r{n}"),
            )
            assert info.status == "connected"
            del info
            harness.rooms[-1].join("agent-1")  # the agent it renders for
            await harness.rooms[-1].wait_published(rtc.TrackKind.KIND_VIDEO)
            await asyncio.sleep(0.3)  # a few frames rendered
            runtimes.append(weakref.ref(harness.runtimes.pop()))
            await manager.leave("demo", f"r{n}")
            harness.rooms.clear()
        await asyncio.sleep(0.05)
        alive = [(w() is not None, r() is not None) for w, r in zip(workers, runtimes, strict=True)]
        # the newest stays held until the next avatar leaves (by nothing the collector can
        # see: no Python object refers to it); before the fix every one stayed alive
        assert len(alive) == 3 and alive[:-1] == [(False, False)] * 2, alive
    finally:
        gc.enable()
    assert manager.workers() == []


async def test_an_avatar_unpublishes_its_tracks_before_it_leaves(worker):
    """LiveKit's native side keeps ~0.8 MB per room left with tracks still published
    (bench/soak_service.py); the avatar takes its tracks down first."""
    w, room = worker
    await room.wait_published(rtc.TrackKind.KIND_VIDEO)
    published = list(room.local_participant.track_publications)
    assert published
    await w.stop()
    assert sorted(room.local_participant.unpublished) == sorted(published)
    assert room.left_with == []


async def test_an_avatar_left_while_publishing_takes_that_track_down_too():
    """A leave while a track is being published (a join and leave in quick succession): the
    server publishes it all the same, and the SDK never lists it. The avatar waits for it and
    unpublishes it; a room left with it published keeps LiveKit's native audio source (one
    thread each) and about 0.8 MB for good."""
    harness = Harness()
    w = harness.worker(agent_id="demo", room_url="wss://lk", token=room_token("r"))
    await w.start()
    me = harness.rooms[0].local_participant
    me.publish_delay = 0.3
    harness.rooms[0].join("agent-1")  # the runner publishes once its agent is there
    for _ in range(200):
        if me.publishing:
            break
        await asyncio.sleep(0.01)
    assert me.publishing, "a publish is in flight"
    await w.stop()
    await asyncio.sleep(0.5)  # the publish has landed on the server by now
    assert me.unpublished and me.on_server == set(), "nothing left published"


async def test_participant_mode_speaks_on_when_the_avatar_leaves(avatar_service, livekit_env):
    """The avatar participant goes mid-session and cannot be launched again: the agent's next
    reply is published by the agent itself, whole, and the session says what happened."""
    from livekit.agents import Agent, AgentSession

    from livekit_plugins_avatarhub import AvatarNotFoundError, AvatarSession

    from fakes import sine_frames

    client, harness, manager = avatar_service
    avatar = AvatarSession(
        avatar_id="demo", mode="participant", service_url=str(client.base_url), service_key=KEY
    )
    events = []
    avatar.on("avatar_state_changed", events.append)
    room = FakeRoom("room-p", sfu=harness.sfu)
    room.join("user-1", rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD)  # someone to hear it
    session = AgentSession()
    await avatar.start(session, room=room)
    await session.start(agent=Agent(instructions="test"))
    try:
        assert avatar.avatar_state == "rendering"

        async def refuse(agent_id, model):
            raise AvatarNotFoundError("agent demo: HTTP 404 (NOT_FOUND)", status_code=404)

        harness.open = refuse  # type: ignore[method-assign]
        await client.post("/v1/agents/demo/leave-room", json={"room_name": "room-p"})
        for _ in range(200):
            if avatar.avatar_state == "audio_only":
                break
            await asyncio.sleep(0.02)
        assert [e.new_state for e in events] == ["recovering", "audio_only"]
        assert "left the room" in events[0].reason and "asking" in events[1].reason
        handle = session.say("still here", audio=sine_frames(1.0))
        publication = await room.wait_published(rtc.TrackKind.KIND_AUDIO)
        stream = rtc.AudioStream(publication.track, sample_rate=16000, num_channels=1)
        heard = 0

        async def listen():
            nonlocal heard
            async for event in stream:
                samples = np.frombuffer(event.frame.data, np.int16)
                if samples.size and np.abs(samples).max() > 3000:
                    heard += event.frame.samples_per_channel

        reader = asyncio.create_task(listen())
        await asyncio.wait_for(handle.wait_for_playout(), 10)
        await asyncio.sleep(0.3)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await stream.aclose()
        assert not handle.interrupted
        assert heard >= 0.9 * 16000, "the reply was published by the agent"
    finally:
        await avatar.aclose()
        await session.aclose()


async def test_the_session_limit_holds_in_the_service_too(avatar_service, monkeypatch):
    """A request's limit, within the operator's (AVATARHUB_MAX_SESSION_SECONDS): the worker
    leaves at the smaller one."""
    client, harness, manager = avatar_service
    monkeypatch.setenv("AVATARHUB_MAX_SESSION_SECONDS", "0.5")
    r = await client.post(
        "/v1/agents/demo/join-room", json={**join_body(), "max_session_seconds": 3600}
    )
    assert r.status_code == 200
    assert manager.get("demo", "room-a").worker.max_session_seconds == 0.5

    def gone() -> bool:
        info = manager.get("demo", "room-a")
        return info is None or info.status == "stopped"

    for _ in range(100):
        if gone():
            break
        await asyncio.sleep(0.05)
    assert gone() and harness.rooms[0].left_with is not None  # it left the room


async def test_participant_mode_keeps_its_session_limit(avatar_service, livekit_env):
    from livekit.agents import Agent, AgentSession

    from livekit_plugins_avatarhub import AvatarSession

    client, harness, manager = avatar_service
    avatar = AvatarSession(
        avatar_id="demo",
        mode="participant",
        service_url=str(client.base_url),
        service_key=KEY,
        max_session_seconds=1.0,
    )
    events = []
    avatar.on("avatar_state_changed", events.append)
    room = FakeRoom("room-p", sfu=harness.sfu)
    room.join("user-1", rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD)
    session = AgentSession()
    await avatar.start(session, room=room)
    await session.start(agent=Agent(instructions="test"))
    try:
        # the service got the limit with a backstop, for an agent that is gone by then
        assert manager.get("demo", "room-p").worker.max_session_seconds == 6.0
        for _ in range(100):
            if avatar.avatar_state == "audio_only" and not manager.workers():
                break
            await asyncio.sleep(0.05)
        assert [e.new_state for e in events] == ["audio_only"]
        assert events[0].reason == "the session limit of 1 s was reached"
        assert manager.workers() == [] or manager.workers()[0].status == "stopped"
    finally:
        await avatar.aclose()
        await session.aclose()


async def test_rendered_seconds_are_counted_per_avatar_and_in_the_metrics(avatar_service):
    """What bitHuman bills (the runtime's rendering time) is visible per avatar and in all."""
    client, harness, _ = avatar_service
    await client.post("/v1/agents/demo/join-room", json=join_body())
    harness.rooms[0].join("agent-1")
    await asyncio.sleep(1.5)
    (worker,) = (await client.get("/v1/workers")).json()["data"]
    assert 0.8 < worker["rendered_seconds"] < 2.0
    text = (await client.get("/metrics")).text
    (line,) = [row for row in text.splitlines() if row.startswith("avatarhub_rendered_seconds")]
    assert float(line.split()[-1]) >= worker["rendered_seconds"]


def sample(text: str, name: str) -> float:
    """One sample's value in Prometheus text."""
    (line,) = [row for row in text.splitlines() if row.split(" ")[0] == name]
    return float(line.split()[-1])


async def test_each_reply_s_playback_latency_and_the_first_frame_are_in_the_metrics(
    avatar_service,
):
    """What a dashboard watches: per reply the time from the agent's speech in to the frame
    carrying it out, per avatar its time to first frame and lip sync at the publisher; a
    worker's numbers stay in the totals after it leaves."""
    client, harness, _ = avatar_service
    await client.post("/v1/agents/demo/join-room", json=join_body())
    room = harness.rooms[0]
    room.join("agent-1")
    for _ in range(100):
        if "lk.audio_stream" in room.byte_stream_handlers:
            break
        await asyncio.sleep(0.02)
    for reply in (1, 2):
        room.send_audio_stream("agent-1", tone(0.6))
        for _ in range(100):
            if sum(m == "lk.playback_finished" for _, m, _ in room.rpc_calls) == reply:
                break
            await asyncio.sleep(0.05)
    (worker,) = (await client.get("/v1/workers")).json()["data"]
    frames = worker["frames"]
    assert frames["published"] > 25 and frames["dropped"] == 0
    assert 0 < frames["first_frame_ms"] < 5000
    # the demo renders at 25 fps: a reply goes out with the next frame or the one after
    assert 0 < frames["playback_latency_ms"] < 200
    assert abs(frames["av_offset_ms"]) < 200
    text = (await client.get("/metrics")).text
    assert sample(text, "avatarhub_playback_latency_seconds_count") == 2
    assert 0 < sample(text, "avatarhub_playback_latency_seconds_sum") < 0.4
    assert sample(text, "avatarhub_first_frame_seconds_count") == 1
    assert sample(text, "avatarhub_frames_published_total") >= frames["published"]
    assert abs(sample(text, "avatarhub_av_offset_seconds")) < 0.2
    await client.post("/v1/agents/demo/leave-room", json={"room_name": "room-a"})
    text = (await client.get("/metrics")).text
    assert sample(text, "avatarhub_frames_published_total") >= frames["published"]
    assert sample(text, "avatarhub_playback_latency_seconds_count") == 2
