"""The conversation survives the avatar, in a real room. The published example's agent speaks
the sample twice, and the avatar fails 2.5 s into the first reply: its runtime crashes (local
mode), or its worker is killed with SIGKILL (``mode="dispatch"``, a second worker standing by).
A real subscriber must hear all of that reply (as much loud audio as in the second, rendered
one) without a gap over a second, see the avatar again for the second reply, and the agent must
have been told once each way."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from typing import Any

import numpy as np
import pytest

from livekit import rtc

from livekit_real import Subscriber, until
from real_processes import (
    SERVICE_KEY,
    avatar_service,
    avatar_worker,
    dispatched_avatar,
    speaking_agent,
    times,
)

pytestmark = [pytest.mark.livekit_real, pytest.mark.slow, pytest.mark.real_once]


def replies(log: str) -> tuple[list[float], list[float]]:
    """When the agent began and finished each of its two replies, by its own log."""
    starts = [times(log, f"speaking sample {n}")[0] for n in (0, 1)]
    ends = [times(log, f"said sample {n}")[0] for n in (0, 1)]
    return starts, ends


async def agents_own_audio(sub: Subscriber, avatar: rtc.RemoteParticipant) -> rtc.RemoteParticipant:
    """The agent's own participant, once ``sub`` receives the plain audio it falls back to."""
    identity = next(
        p.identity
        for p in sub.room.remote_participants.values()
        if p.identity != avatar.identity and p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
    )
    plain, _ = await sub.wait_track(rtc.TrackKind.KIND_AUDIO, identity=identity, timeout=10)
    return plain


def quiet_of(heard: Any) -> list[float]:
    return [round(longest_quiet(heard(n)), 2) for n in (0, 1)]


def longest_quiet(levels: list[tuple[float, float]], threshold: float = 0.02) -> float:
    """The longest stretch without loud audio, from the first loud piece to the last."""
    loud = [at for at, rms in levels if rms > threshold]
    return float(np.diff(loud).max()) if len(loud) > 1 else float("inf")


async def test_the_reply_goes_on_when_the_runtime_crashes(real_livekit, tmp_path):
    agent_name, room_name = "speaker-crash", "room-crash"
    async with (
        speaking_agent(
            real_livekit,
            tmp_path,
            agent_name,
            AVATARHUB_TEST_MODE="local",
            AVATARHUB_TEST_BREAK_RUNTIME="2.5",
            AVATARHUB_TEST_PAUSE="2",
        ) as agent,
        Subscriber(real_livekit, room_name) as sub,
    ):
        avatar = await dispatched_avatar(sub, agent_name)
        sub.record(avatar)
        await until(lambda: "said sample 1" in agent.text(), 60, "both replies")
        await asyncio.sleep(0.5)
        await sub.stop_recording()
        log = agent.text()

    (broken,) = times(log, "runtime broken")
    starts, ends = replies(log)
    assert starts[0] < broken < ends[0], "the runtime broke during the first reply"
    failed = [row for row in log.splitlines() if " avatar rendering -> recovering" in row]
    back = [row for row in log.splitlines() if " avatar recovering -> rendering" in row]
    assert len(failed) == 1 and "the engine crashed" in failed[0], "told once, with the reason"
    assert len(back) == 1 and float(back[0].split()[0]) < starts[1], "back before reply 2"

    def heard(n: int) -> list[tuple[float, float]]:
        return [(s.at, s.rms) for s in sub.audio if starts[n] < s.at < ends[n] + 0.5]

    loud = [sum(1 for _, rms in heard(n) if rms > 0.02) for n in (0, 1)]
    print(f"runtime crash: loud 10 ms pieces {loud}, longest quiet {quiet_of(heard)} s")
    # the crashed reply was heard whole: as much loud audio as the one the avatar rendered
    assert loud[1] > 300, loud  # over 3 s of the sample's speech, in 10 ms pieces
    assert abs(loud[0] - loud[1]) < 0.05 * loud[1], f"loud 10 ms pieces per reply: {loud}"
    # and without a gap a listener would notice: at most 1 s longer than the sample's own
    quiet = [longest_quiet(heard(n)) for n in (0, 1)]
    assert quiet[0] < quiet[1] + 1.0, f"longest quiet stretch per reply: {quiet}"
    # the avatar renders again: full frame rate and a moving mouth in the second reply
    assert sub.fps(starts[1] + 0.5, ends[1] - 0.5) >= 20
    mouth = [s.mouth for s in sub.video if starts[1] < s.at < ends[1]]
    assert max(mouth) > 0.15, "the mouth moves again"


async def back_in_room(
    sub: Subscriber, identity: str, old_sid: str, timeout: float
) -> rtc.RemoteParticipant:
    """The participant ``identity`` again (a new one), once its video is subscribed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        participant = sub.room.remote_participants.get(identity)
        if participant is not None and participant.sid != old_sid:
            for publication in participant.track_publications.values():
                if publication.kind == rtc.TrackKind.KIND_VIDEO and publication.track is not None:
                    return participant
        await asyncio.sleep(0.05)
    raise AssertionError(f"{identity} did not come back within {timeout} s")


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process under it at once, as a machine that dies."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


async def test_the_reply_goes_on_when_the_avatar_worker_dies(real_livekit, tmp_path):
    """mode="dispatch" with two avatar workers: the one rendering is killed (SIGKILL, with
    its job processes) 2.5 s into the first reply. The rest of the reply is heard from the
    agent itself within a second, the avatar is dispatched again, lands on the other worker,
    and renders the second reply."""
    agent_name, room_name, workers = "speaker-kill", "room-kill", "avatars-kill"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with (
        avatar_worker(real_livekit, tmp_path / "a", workers) as first,
        avatar_worker(real_livekit, tmp_path / "b", workers) as second,
        speaking_agent(
            real_livekit,
            tmp_path,
            agent_name,
            AVATARHUB_TEST_MODE="dispatch",
            AVATARHUB_TEST_AVATAR_KWARGS=json.dumps({"mode": "dispatch"}),
            AVATARHUB_AGENT_NAME=workers,
            AVATARHUB_TEST_PAUSE="4",
        ) as agent,
        Subscriber(real_livekit, room_name) as sub,
    ):
        avatar = await dispatched_avatar(sub, agent_name)
        sub.record(avatar)
        # the stream of the dead avatar's track may go on carrying its successor's audio
        dead = {p.sid for p in avatar.track_publications.values()}
        await until(lambda: "speaking sample 0" in agent.text(), 60, "the first reply")
        await asyncio.sleep(2.5)
        rendering = first if "is rendering in room" in first.text() else second
        other = second if rendering is first else first
        killed_at = time.monotonic()
        kill_tree(rendering.proc.pid)
        sub.record(await agents_own_audio(sub, avatar))
        returned = await back_in_room(sub, avatar.identity, avatar.sid, 60)
        returned_at = time.monotonic()
        print(
            f"worker killed: the avatar back on the other worker {returned_at - killed_at:.2f} s later"
        )
        # the published bound (docs/scaling.md): 1.32-1.33 s in 3 runs
        assert returned_at - killed_at < 5, "the avatar is back within 5 s"
        sub.record(returned)
        await until(lambda: "said sample 1" in agent.text(), 90, "both replies")
        await asyncio.sleep(0.5)
        await sub.stop_recording()
        log = agent.text()
        assert "is rendering in room" in other.text(), "the avatar went to the other worker"

    starts, ends = replies(log)
    assert starts[0] < killed_at < ends[0], "the worker died during the first reply"
    failed = [row for row in log.splitlines() if " avatar rendering -> recovering" in row]
    back = [row for row in log.splitlines() if " avatar recovering -> rendering" in row]
    assert len(failed) == 1 and "stopped arriving" in failed[0], failed
    assert float(failed[0].split()[0]) - killed_at < 1.0, "noticed within a second"
    assert len(back) == 1, "the avatar is back"

    def heard(n: int) -> list[tuple[float, float]]:
        return [
            (s.at, s.rms)
            for s in sub.audio
            if starts[n] < s.at < ends[n] + 0.5 and not (s.track in dead and s.at > returned_at)
        ]

    loud = [sum(1 for _, rms in heard(n) if rms > 0.02) for n in (0, 1)]
    noticed = float(failed[0].split()[0]) - killed_at
    print(f"worker killed: noticed after {noticed:.2f} s, loud 10 ms pieces {loud}, ", end="")
    print(f"longest quiet {quiet_of(heard)} s")
    assert loud[1] > 300, loud
    # nothing of the reply lost; a little heard twice is allowed (the avatar's position is
    # estimated from its clock), a listener notices no gap over a second
    assert 0.95 * loud[1] < loud[0] < 1.15 * loud[1], f"loud 10 ms pieces per reply: {loud}"
    quiet = [longest_quiet(heard(n)) for n in (0, 1)]
    assert quiet[0] < quiet[1] + 1.0, f"longest quiet stretch per reply: {quiet}"
    mouth = [s.mouth for s in sub.video if starts[1] < s.at < ends[1]]
    assert mouth and max(mouth) > 0.15, "the avatar renders the second reply"


async def test_the_reply_goes_on_when_the_avatar_service_dies(real_livekit, tmp_path):
    """mode="participant": ``serve``, which renders the avatar, is killed (SIGKILL) 2.5 s into
    the first reply and stays dead. The rest of the reply is heard from the agent itself within
    a second; asked for again, the avatar cannot come back, so the agent says so once and speaks
    the second reply as plain audio, as loud and as whole as the first."""
    agent_name, room_name = "speaker-serve-kill", "room-serve-kill"
    async with avatar_service(real_livekit, tmp_path) as (service, client):
        async with (
            speaking_agent(
                real_livekit,
                tmp_path,
                agent_name,
                AVATARHUB_TEST_MODE="participant",
                AVATARHUB_TEST_AVATAR_KWARGS=json.dumps({"mode": "participant"}),
                AVATARHUB_SERVICE_URL=str(client.base_url),
                AVATARHUB_SERVICE_KEY=SERVICE_KEY,
                AVATARHUB_TEST_PAUSE="2",
            ) as agent,
            Subscriber(real_livekit, room_name) as sub,
        ):
            avatar = await dispatched_avatar(sub, agent_name)
            sub.record(avatar)
            await until(lambda: "speaking sample 0" in agent.text(), 60, "the first reply")
            await asyncio.sleep(2.5)
            killed_at = time.monotonic()
            kill_tree(service.proc.pid)
            await service.proc.wait()
            sub.record(await agents_own_audio(sub, avatar))
            await until(lambda: "said sample 1" in agent.text(), 90, "both replies")
            await asyncio.sleep(0.5)
            await sub.stop_recording()
            log = agent.text()

    starts, ends = replies(log)
    assert starts[0] < killed_at < ends[0], "the service died during the first reply"
    changes = [row for row in log.splitlines() if " avatar " in row and " -> " in row]
    failed = [row for row in changes if " avatar rendering -> recovering" in row]
    assert len(failed) == 1, changes
    noticed = float(failed[0].split()[0]) - killed_at
    assert noticed < 1.0, f"noticed {noticed:.2f} s after the kill"
    assert [row.split(" -> ")[1].split(":")[0] for row in changes] == ["recovering", "audio_only"]

    def heard(n: int) -> list[tuple[float, float]]:
        return [(s.at, s.rms) for s in sub.audio if starts[n] < s.at < ends[n] + 0.5]

    loud = [sum(1 for _, rms in heard(n) if rms > 0.02) for n in (0, 1)]
    print(f"service killed: noticed after {noticed:.2f} s, loud 10 ms pieces {loud}, ", end="")
    print(f"longest quiet {quiet_of(heard)} s; {changes}")
    assert loud[1] > 300, loud
    assert 0.95 * loud[1] < loud[0] < 1.15 * loud[1], f"loud 10 ms pieces per reply: {loud}"
    quiet = [longest_quiet(heard(n)) for n in (0, 1)]
    assert quiet[0] < quiet[1] + 1.0, f"longest quiet stretch per reply: {quiet}"
