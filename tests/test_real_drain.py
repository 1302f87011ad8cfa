"""A rolling update of the avatar fleet, on a real LiveKit server: ``worker start`` stopped
with SIGTERM (what systemd, Docker and Kubernetes send) while its avatar speaks. LiveKit's
drain keeps the avatar it renders until its conversation ends, so the reply in progress is
heard through the avatar to the end, with no fallback; the worker takes no new job, the next
avatar goes to the other worker, and the drained one exits by itself once its room is done."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest

from livekit import rtc
from livekit_plugins_avatarhub.remote.dispatcher import AvatarDispatcher
from livekit_plugins_avatarhub.remote.protocol import AvatarJob

from livekit_real import Subscriber, until
from real_processes import avatar_worker, dispatched_avatar, speaking_agent, times

pytestmark = [pytest.mark.livekit_real, pytest.mark.slow, pytest.mark.real_once]


async def test_a_drained_worker_finishes_the_reply_and_takes_no_new_avatar(
    real_livekit, tmp_path, monkeypatch
):
    agent_name, workers = "speaker-drain", "avatars-drain"
    for name, value in real_livekit.env().items():
        monkeypatch.setenv(name, value)
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
            AVATARHUB_TEST_PAUSE="2",
        ) as agent,
        Subscriber(real_livekit, "room-drain-next", identity="next-user") as later,
    ):
        async with Subscriber(real_livekit, "room-drain") as sub:
            avatar = await dispatched_avatar(sub, agent_name)
            sub.record(avatar)
            await until(lambda: "speaking sample 0" in agent.text(), 60, "the first reply")
            await asyncio.sleep(2.5)
            draining = first if "is rendering in room room-drain" in first.text() else second
            other = second if draining is first else first
            stopped_at = time.monotonic()
            draining.proc.send_signal(signal.SIGTERM)
            await until(lambda: "draining worker" in draining.text(), 10, "LiveKit's drain")

            # a new avatar while it drains: LiveKit offers it to the other worker only
            dispatcher = AvatarDispatcher(agent_name=workers)
            try:
                _, created = await dispatcher.ensure(
                    "room-drain-next", AvatarJob("demo", listen_to="next-user")
                )
            finally:
                await dispatcher.aclose()
            assert created
            await later.wait_track(rtc.TrackKind.KIND_VIDEO, timeout=30)
            assert "is rendering in room room-drain-next" in other.text()
            assert "is rendering in room room-drain-next" not in draining.text()

            await until(lambda: "said sample 1" in agent.text(), 90, "both replies")
            await asyncio.sleep(0.5)
            await sub.stop_recording()
            log = agent.text()
            assert draining.alive(), "the drained worker keeps its avatar while the room lives"
        left_at = time.monotonic()  # the viewer left: LiveKit closes the room (agents only)
        await until(lambda: draining.proc.returncode is not None, 60, "the drained worker exits")
        exited_after = time.monotonic() - left_at
        assert draining.proc.returncode == 0, draining.text()[-3000:]
        assert other.alive()

    starts = [times(log, f"speaking sample {n}")[0] for n in (0, 1)]
    ends = [times(log, f"said sample {n}")[0] for n in (0, 1)]
    assert starts[0] < stopped_at < ends[0], "SIGTERM came during the first reply"
    assert "-> recovering" not in log, "the avatar never failed over: it rendered throughout"

    def heard(n: int) -> list[float]:
        return [s.rms for s in sub.audio if starts[n] < s.at < ends[n] + 0.5]

    loud = [sum(1 for rms in heard(n) if rms > 0.02) for n in (0, 1)]
    fps = sub.fps(stopped_at + 0.5, ends[0] - 0.5)
    mouth = [s.mouth for s in sub.video if stopped_at < s.at < ends[0]]
    print(
        f"drain: after SIGTERM the reply played at {fps:.1f} FPS, loud 10 ms pieces {loud}; "
        f"the drained worker exited {exited_after:.1f} s after its room's viewer left"
    )
    assert loud[1] > 300 and abs(loud[0] - loud[1]) < 0.05 * loud[1], loud
    assert fps >= 20, "the avatar renders the rest of the reply"
    assert mouth and max(mouth) > 0.15, "its mouth still moves after SIGTERM"
