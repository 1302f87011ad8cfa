"""The conversation survives the avatar, in a real room: the published example's agent speaks
the sample twice; its avatar's runtime crashes 2.5 s into the first reply. A real subscriber
must hear all of that reply (as much loud audio as in the second, rendered one), see the
avatar again for the second reply, and the agent must have been told once each way."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from livekit import api, rtc

from livekit_real import Subscriber, until
from real_processes import speaking_agent

pytestmark = [pytest.mark.livekit_real, pytest.mark.slow, pytest.mark.real_once]


def times(log: str, line: str) -> list[float]:
    return [float(row.split()[0]) for row in log.splitlines() if row.endswith(line)]


def longest_quiet(levels: list[tuple[float, float]], threshold: float = 0.02) -> float:
    """The longest stretch without loud audio, from the first loud piece to the last."""
    loud = [at for at, rms in levels if rms > threshold]
    return float(np.diff(loud).max()) if len(loud) > 1 else float("inf")


async def test_the_reply_goes_on_when_the_runtime_crashes(real_livekit, tmp_path):
    agent_name, room_name = "speaker-crash", "room-crash"
    lkapi = real_livekit.api()
    try:
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
            await lkapi.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(agent_name=agent_name, room=room_name)
            )
            avatar, _ = await sub.wait_track(rtc.TrackKind.KIND_VIDEO, timeout=90)
            await sub.wait_track(rtc.TrackKind.KIND_AUDIO, identity=avatar.identity)
            sub.record(avatar)
            await until(lambda: "said sample 1" in agent.text(), 60, "both replies")
            await asyncio.sleep(0.5)
            await sub.stop_recording()
            log = agent.text()
    finally:
        await lkapi.aclose()

    (broken,) = times(log, "runtime broken")
    starts = [times(log, f"speaking sample {n}")[0] for n in (0, 1)]
    ends = [times(log, f"said sample {n}")[0] for n in (0, 1)]
    assert starts[0] < broken < ends[0], "the runtime broke during the first reply"
    failed = [row for row in log.splitlines() if " avatar rendering -> recovering" in row]
    back = [row for row in log.splitlines() if " avatar recovering -> rendering" in row]
    assert len(failed) == 1 and "the engine crashed" in failed[0], "told once, with the reason"
    assert len(back) == 1 and float(back[0].split()[0]) < starts[1], "back before reply 2"

    def heard(n: int) -> list[tuple[float, float]]:
        return [(s.at, s.rms) for s in sub.audio if starts[n] < s.at < ends[n] + 0.5]

    loud = [sum(1 for _, rms in heard(n) if rms > 0.02) for n in (0, 1)]
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
