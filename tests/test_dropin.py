"""Code written for someone else runs unchanged against this package.

The official ``livekit-plugins-bithuman`` in cloud mode is the client of our avatar service;
the join-room client is plain HTTP, as the Flutter app is; agent code written for bitHuman's
cloud swaps only its import.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging

import pytest

from livekit import rtc

pytest.importorskip("aiohttp")

from aiohttp import web

from livekit_plugins_avatarhub.service.manager import WorkerManager

from fakes import FakeRoom
from service_harness import KEY, LK_KEY, LK_SECRET, Harness, room_token, serve, sid_of

official = pytest.importorskip("livekit.plugins.bithuman")
CLOUD_MODE = "avatar_id" in inspect.signature(official.AvatarSession).parameters
AGENT = "agent-test"  # the agent's own identity in its room


class _RoomService:
    def __init__(self) -> None:
        self.removed: list[object] = []

    async def remove_participant(self, request: object) -> None:
        self.removed.append(request)


class _JobContext:
    """What the official plugin reads of LiveKit's job context in cloud mode."""

    local_participant_identity = AGENT

    def __init__(self) -> None:
        self.api = type("LiveKitAPI", (), {"room": _RoomService()})()

    def add_shutdown_callback(self, callback: object) -> None:
        return None


@contextlib.asynccontextmanager
async def official_plugin_context():
    """A job context and LiveKit's shared HTTP session, as a LiveKit worker provides them."""
    import aiohttp
    from livekit.agents import job
    from livekit.agents.utils import http_context

    async with aiohttp.ClientSession() as session:
        job_token = job._JobContextVar.set(_JobContext())  # type: ignore[arg-type]
        http_token = http_context._ContextVar.set(lambda: session)
        try:
            yield
        finally:
            http_context._ContextVar.reset(http_token)
            job._JobContextVar.reset(job_token)


def recorder(seen: list[tuple[str, str, str | None]]):
    """Notes each request's path, body type and ``model`` field (aiohttp keeps the body)."""
    from urllib.parse import parse_qs

    @web.middleware
    async def record(request: web.Request, handler):
        raw = (await request.read()).decode()
        if request.content_type == "application/json":
            model = json.loads(raw or "{}").get("model")
        else:
            model = (parse_qs(raw).get("model") or [None])[0]
        seen.append((request.path, request.content_type, model))
        return await handler(request)

    return record


def form_expected(model: str | None) -> bool:
    """Which shape the installed official plugin sends to a non-bitHuman host."""
    if not hasattr(official.AvatarSession, "_send_formdata_request"):
        return False
    if hasattr(official.AvatarSession, "_is_expression_model"):  # 1.8: every expression*
        return (model or "").startswith("expression")
    return model == "expression"  # before: only the first-generation name


async def wait_for_video_of(room: FakeRoom, identity: str, timeout: float = 10.0) -> None:
    async def poll() -> None:
        while True:
            participant = room.remote_participants.get(identity)
            if participant is not None and any(
                p.kind == rtc.TrackKind.KIND_VIDEO for p in participant.track_publications.values()
            ):
                return
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


@pytest.mark.skipif(not CLOUD_MODE, reason="this livekit-plugins-bithuman has no cloud mode")
@pytest.mark.parametrize("model", [None, "essence", "expression", "expression-2"])
async def test_official_plugin_launches_an_avatar_on_our_service(model, caplog):
    from livekit.agents import AgentSession

    harness = Harness()
    manager = WorkerManager(harness.worker, max_workers=2)
    seen: list[tuple[str, str, str | None]] = []
    opened: list[tuple[str, str | None]] = []
    plain_open = harness.open

    async def open_and_note(agent_id: str, model_: str | None):
        opened.append((agent_id, model_))
        return await plain_open(agent_id, model_)

    harness.open = open_and_note  # type: ignore[method-assign]
    caplog.set_level(logging.WARNING)
    async with serve(manager, recorder(seen)) as client, official_plugin_context():
        room = FakeRoom("room-x", sfu=harness.sfu)
        kwargs = {"model": model} if model else {}
        avatar = official.AvatarSession(
            avatar_id="demo",
            api_url=f"{client.base_url}/v1/runtime-tokens/request",
            api_secret=KEY,  # with our service, the service key
            **kwargs,
        )
        session = AgentSession()
        await avatar.start(
            session,
            room=room,
            livekit_url="wss://lk.example.com",
            livekit_api_key=LK_KEY,
            livekit_api_secret=LK_SECRET,
        )
        try:
            if hasattr(avatar, "wait_for_join"):  # livekit-agents 1.5.13+
                await avatar.wait_for_join(timeout=10)
            await wait_for_video_of(room, "bithuman-avatar-agent")
            # the avatar publishes on behalf of the agent, as bitHuman's cloud avatar does
            joined = room.remote_participants["bithuman-avatar-agent"]
            assert joined.attributes["lk.publish_on_behalf"] == AGENT
            info = manager.get("demo", "room-x")
            assert info is not None and info.status == "connected"
            assert info.participant_id == sid_of("bithuman-avatar-agent")
        finally:
            if hasattr(avatar, "aclose"):  # before 1.5 the plugin's session had no aclose()
                await avatar.aclose()
            await manager.aclose()
            await session.aclose()
    launch = [(kind, sent) for path, kind, sent in seen if path == "/v1/runtime-tokens/request"]
    assert len(launch) == 1
    kind, sent_model = launch[0]
    assert kind == (
        "application/x-www-form-urlencoded" if form_expected(model) else "application/json"
    ), "the plugin's own request shape reached the service"
    assert sent_model in (model, None)  # plugins before 1.8 do not name the model
    assert opened == [("demo", sent_model)], "the model asked for reached the loader"
    # the official plugin put its secret (our key) in the avatar's attributes; the token has no
    # grant to remove it, and the service says so rather than leaving it silently
    assert any("api_secret attribute" in r.getMessage() for r in caplog.records)


async def test_photo_launches_get_a_clear_refusal(avatar_service):
    client, harness, _ = avatar_service
    base = {"livekit_url": "wss://x", "livekit_token": room_token("r"), "room_name": "r"}
    answers = [
        await client.post(
            "/v1/runtime-tokens/request", json={**base, "image": "https://x/face.jpg"}
        ),
        await client.post(
            "/v1/runtime-tokens/request",
            data={**base, "avatar_image_url": "https://x/face.jpg", "model": "expression"},
        ),
        await client.post(
            "/v1/runtime-tokens/request",
            data={**base, "model": "expression"},
            files={"avatar_image": ("avatar.jpg", b"\xff\xd8" + b"\0" * 200_000, "image/jpeg")},
        ),
    ]
    for r in answers:
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert (
            error["code"] == "CLOUD_ONLY" and "livekit.plugins import bithuman" in error["message"]
        )
    assert not harness.rooms  # nothing was started


async def test_form_launch_with_async_mode_answers_before_the_worker_connects(avatar_service):
    client, harness, manager = avatar_service
    harness.sfu.connect_delay = 0.5
    r = await client.post(
        "/v1/runtime-tokens/request?async=true",
        data={
            "avatar_id": "demo",
            "livekit_url": "wss://x",
            "livekit_token": room_token("room-async"),
            "room_name": "room-async",
            "model": "expression",
            "async_mode": "true",
        },
    )
    assert r.status_code == 202 and r.json()["status"] == "connecting"
    assert manager.get("demo", "room-async").status == "connecting"
    for _ in range(100):
        if manager.get("demo", "room-async").status == "connected":
            break
        await asyncio.sleep(0.02)
    assert manager.get("demo", "room-async").status == "connected"
    bad = await client.post(
        "/v1/runtime-tokens/request", data={"avatar_id": "demo", "async_mode": "maybe"}
    )
    assert bad.status_code == 400 and "async_mode" in bad.json()["error"]["message"]


# --- the Flutter join-room flow: plain HTTP -------------------------------------------------


def flutter_join(room: str, name: str = "BitHuman Agent", **token_options) -> dict:
    return {
        "room_url": "wss://lk.example.com",
        "room_token": room_token(room, "avatar-flutter", **token_options),
        "participant_name": name,
    }


async def test_flutter_finds_the_avatar_by_its_display_name(avatar_service):
    client, harness, _ = avatar_service
    user_room = FakeRoom("room-f", sfu=harness.sfu)  # the Flutter app, already in the room
    r = await client.post("/v1/agents/demo/join-room", json=flutter_join("room-f"))
    assert r.status_code == 200
    body = r.json()
    assert body["participant_id"].startswith("PA_") and body["status"] == "connected"
    avatar = next(p for p in user_room.remote_participants.values() if p.name == "BitHuman Agent")
    assert avatar.sid == body["participant_id"]
    assert "warnings" not in body
    again = await client.post("/v1/agents/demo/join-room", json=flutter_join("room-f"))
    assert again.status_code == 200 and again.json()["created"] is False


async def test_a_name_that_cannot_be_set_is_reported(avatar_service):
    client, _, _ = avatar_service
    r = await client.post(
        "/v1/agents/demo/join-room",
        json=flutter_join("room-g", can_update_own_metadata=False),
    )
    assert r.status_code == 200
    assert any("display name" in w for w in r.json()["warnings"])
    listed = (await client.get("/v1/workers")).json()["data"][0]
    assert any("display name" in w for w in listed["warnings"])


async def test_concurrent_duplicate_joins_share_the_real_outcome(avatar_service):
    client, harness, manager = avatar_service
    harness.sfu.connect_delay = 0.3
    harness.sfu.connect_error = ConnectionError("LiveKit refused the token")
    answers = await asyncio.gather(
        *(client.post("/v1/agents/demo/join-room", json=flutter_join("room-d")) for _ in range(20))
    )
    assert len(harness.rooms) == 1, "one worker for one (agent, room)"
    assert {r.status_code for r in answers} == {502}, "nobody was told 'connected'"
    assert all("LiveKit refused the token" in r.json()["error"]["message"] for r in answers)
    harness.sfu.connect_error = None
    answers = await asyncio.gather(
        *(client.post("/v1/agents/demo/join-room", json=flutter_join("room-e")) for _ in range(20))
    )
    assert {r.status_code for r in answers} == {200}
    assert sum(r.json()["created"] for r in answers) == 1
    assert len({r.json()["participant_id"] for r in answers}) == 1


async def test_avatar_leaves_after_inactivity_and_rides_out_reconnects():
    harness = Harness()
    plain = harness.worker

    def quick_to_idle(**kwargs):
        return plain(idle_timeout=0.4, **kwargs)

    manager = WorkerManager(quick_to_idle, max_workers=2)
    async with serve(manager) as client:
        user_room = FakeRoom("room-i", sfu=harness.sfu)
        await client.post("/v1/agents/demo/join-room", json=flutter_join("room-i"))
        worker_room = harness.rooms[0]
        worker_room.drop_connection()
        listed = (await client.get("/v1/workers")).json()["data"]
        assert listed[0]["status"] == "reconnecting"
        worker_room.restore_connection()
        assert (await client.get("/v1/workers")).json()["data"][0]["status"] == "connected"
        await asyncio.sleep(1.0)  # someone is in the room: the avatar stays
        assert manager.get("demo", "room-i").status == "connected"
        await user_room.disconnect()  # everyone left, and no audio comes
        for _ in range(100):
            if manager.get("demo", "room-i") is None:
                break
            await asyncio.sleep(0.05)
        assert manager.get("demo", "room-i") is None and not worker_room.isconnected()


# --- cloud code's own calls --------------------------------------------------------------


async def test_gestures_reach_the_avatar_in_participant_mode(avatar_service, monkeypatch):
    from livekit.agents import AgentSession

    from livekit_plugins_avatarhub import AvatarSession, GestureTrigger

    monkeypatch.setenv("LIVEKIT_URL", "wss://lk.example.com")
    monkeypatch.setenv("LIVEKIT_API_KEY", LK_KEY)
    monkeypatch.setenv("LIVEKIT_API_SECRET", LK_SECRET)
    client, harness, _ = avatar_service
    room = FakeRoom("room-t", sfu=harness.sfu)
    avatar = AvatarSession(
        avatar_id="demo", mode="participant", service_url=str(client.base_url), service_key=KEY
    )
    session = AgentSession()
    await avatar.start(session, room=room)
    try:
        await wait_for_video_of(room, avatar.avatar_identity)
        runtime = harness.runtimes[0]
        await avatar.trigger("wave")
        assert runtime._action is not None and runtime._action[0] == "wave"
        trigger = GestureTrigger(avatar, ["nod"], keywords={"yes": "nod"})
        assert await trigger.handle_text("Yes, exactly.") == "nod"
        assert runtime._action[0] == "nod"
        # what cloud code writes: the RPC to the avatar participant, with bitHuman's answer
        answer = await room.local_participant.perform_rpc(
            destination_identity=avatar.avatar_identity,
            method="trigger_dynamics",
            payload=json.dumps({"action": "smile"}),
        )
        assert json.loads(answer) == {
            "status": "success",
            "action": "smile",
            "animation_triggered": True,
            "service": "avatarhub",
        }
        from bithuman import AudioChunk, VideoControl

        from livekit_plugins_avatarhub import ConfigurationError

        with pytest.raises(ConfigurationError, match="only actions"):
            await avatar.push(VideoControl(audio=AudioChunk(data=b"\0\0" * 640, sample_rate=16000)))
    finally:
        await avatar.aclose()
        await session.aclose()


async def test_gestures_reach_the_runtime_in_local_mode():
    from livekit.agents import AgentSession

    from livekit_plugins_avatarhub import AvatarSession

    avatar = AvatarSession(avatar_id="demo", output_size=(160, 120))
    session = AgentSession()
    await avatar.start(session, room=FakeRoom())
    try:
        await avatar.trigger("wink")
        assert avatar.runtime._action[0] == "wink"
    finally:
        await avatar.aclose()
        await session.aclose()
