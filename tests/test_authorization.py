"""Who may drive a remote avatar: the participant it serves, the identities its operator
allows, and (when it serves no one in particular) agent participants; everyone else gets an
RPC error. (In a real room with a second agent and an intruder: test_real_authorization.py.)"""

from __future__ import annotations

import json

import pytest

from livekit import rtc
from livekit_plugins_avatarhub.exceptions import ConfigurationError
from livekit_plugins_avatarhub.remote.protocol import RPC_NOT_ALLOWED, AvatarJob, gesture_callers
from livekit_plugins_avatarhub.remote.server_api import same_server

from service_harness import Harness, room_token

STANDARD = rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD
WAVE = json.dumps({"action": "wave"})


async def started(token: str, **kwargs):
    harness = Harness()
    worker = harness.worker(agent_id="demo", room_url="wss://lk", token=token, **kwargs)
    await worker.start()
    room = harness.rooms[0]
    for identity, kind in (("agent-a", None), ("agent-b", None), ("app-user", STANDARD)):
        room.join(identity, **({"kind": kind} if kind is not None else {}))
    return worker, room


async def answer(room, caller: str):
    try:
        return json.loads(await room.local_participant.invoke("trigger_dynamics", WAVE, caller))
    except rtc.RpcError as err:
        return err


async def test_the_served_agent_and_allowed_identities_drive_it_no_one_else(monkeypatch, caplog):
    monkeypatch.setenv("AVATARHUB_ALLOW_GESTURES_FROM", "ops-console, qa")
    token = room_token("r", **{"lk.publish_on_behalf": "agent-a"})
    worker, room = await started(token, allow_gestures_from=["stage-manager"])
    try:
        assert worker.serves == "agent-a"
        assert worker.allowed == {"ops-console", "qa", "stage-manager"}
        for caller in ("agent-a", "ops-console", "qa", "stage-manager"):
            assert (await answer(room, caller))["status"] == "success", caller
        for caller in ("agent-b", "app-user", "app-user"):
            refused = await answer(room, caller)
            assert isinstance(refused, rtc.RpcError) and refused.code == RPC_NOT_ALLOWED
        logged = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert len(logged) == 2 and "'app-user'" in logged[1]  # once per caller
    finally:
        await worker.stop()


async def test_serving_no_one_in_particular_agents_may_drive_it_users_may_not():
    worker, room = await started(room_token("r"))
    try:
        assert worker.serves is None
        assert (await answer(room, "agent-b"))["status"] == "success"
        refused = await answer(room, "app-user")
        assert isinstance(refused, rtc.RpcError) and refused.code == RPC_NOT_ALLOWED
        assert isinstance(await answer(room, "not-in-the-room"), rtc.RpcError)
    finally:
        await worker.stop()


async def test_the_microphone_it_follows_is_the_participant_it_serves():
    worker, room = await started(room_token("r"), listen_to="app-user")
    try:
        assert worker.serves == "app-user"
        assert (await answer(room, "app-user"))["status"] == "success"
        assert isinstance(await answer(room, "agent-b"), rtc.RpcError)
    finally:
        await worker.stop()


def test_the_job_carries_the_operators_list():
    job = AvatarJob.parse(json.dumps({"agent_id": "demo", "allow_gestures_from": ["ops", "qa"]}))
    assert job.allow_gestures_from == ("ops", "qa")
    assert AvatarJob.parse(job.to_metadata()) == job
    assert "allow_gestures_from" not in AvatarJob(agent_id="demo").to_metadata()
    for bad in ("ops", [""], ["x" * 300], [1], ["a"] * 33):
        with pytest.raises(ConfigurationError, match="allow_gestures_from"):
            AvatarJob.parse(json.dumps({"agent_id": "demo", "allow_gestures_from": bad}))


def test_gesture_callers_merge_the_option_and_the_environment(monkeypatch):
    monkeypatch.setenv("AVATARHUB_ALLOW_GESTURES_FROM", " a ,, b")
    assert gesture_callers(["c", " "]) == {"a", "b", "c"}
    monkeypatch.delenv("AVATARHUB_ALLOW_GESTURES_FROM")
    assert gesture_callers() == frozenset()


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("wss://lk.example.com", "https://LK.example.com:443/", True),
        ("ws://127.0.0.1:7880", "http://127.0.0.1:7880", True),
        ("wss://lk.example.com", "wss://lk.example.com.evil.test", False),
        ("ws://127.0.0.1:7880", "ws://127.0.0.1:7881", False),
        ("wss://lk.example.com", "wss://lk.example.com:notaport", False),
    ],
)
def test_same_server(a, b, same):
    assert same_server(a, b) is same


async def test_the_services_livekit_key_never_signs_for_a_room_url_a_client_named(monkeypatch):
    """A leaked secret is removed server side only on LIVEKIT_URL's server: for a room
    elsewhere the service's key signs nothing (the client learns why in the warnings)."""
    from livekit import api

    made: list[str] = []
    real = api.LiveKitAPI

    def recording(url, *args, **kwargs):
        made.append(url)
        return real(url, *args, **kwargs)

    monkeypatch.setattr(api, "LiveKitAPI", recording)
    monkeypatch.setenv("LIVEKIT_URL", "wss://lk.example.com")
    monkeypatch.setenv("LIVEKIT_API_KEY", "key")
    monkeypatch.setenv("LIVEKIT_API_SECRET", "a-secret-for-the-service-own-server")
    token = room_token("r", can_update_own_metadata=False, api_secret="sk-leaked")
    harness = Harness()
    worker = harness.worker(agent_id="demo", room_url="wss://attacker.example", token=token)
    await worker.start()
    try:
        assert made == []
        assert any("api_secret" in w for w in worker.warnings), worker.warnings
    finally:
        await worker.stop()
