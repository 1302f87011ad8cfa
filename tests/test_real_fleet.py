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

from real_processes import avatar_worker
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
