"""Local mode in a real room: a real dispatch starts the cloud-style example on a LiveKit
worker, and a real subscriber decodes the avatar it publishes."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

import pytest

from livekit import api, rtc

from livekit_real import Subscriber, clean_env, until

pytestmark = [pytest.mark.livekit_real, pytest.mark.slow]

HERE = Path(__file__).resolve().parent


async def start_worker(server, tmp_path, agent_name: str, **env: str):
    """``python tests/speaking_agent.py start``; returns once LiveKit has registered it."""
    log_path = tmp_path / f"{agent_name}.log"
    log = log_path.open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HERE / "speaking_agent.py"),
        "start",
        env=clean_env(
            **server.env(),
            AVATARHUB_TEST_AGENT_NAME=agent_name,
            BITHUMAN_AVATAR_ID="demo",
            **env,
        ),
        stdout=log,
        stderr=log,
    )
    log.close()

    def registered() -> bool:
        if proc.returncode is not None:
            raise AssertionError(f"the worker exited:\n{log_path.read_text()[-3000:]}")
        return "registered worker" in log_path.read_text(errors="replace")

    await until(registered, 90, "the worker to register with LiveKit")
    return proc, log_path


async def stop(proc) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


async def test_the_cloud_style_example_speaks_through_the_demo_avatar_in_a_real_room(
    real_livekit, tmp_path
):
    agent_name, room_name = "cloud-style-test", "local-mode"
    worker, log_path = await start_worker(
        real_livekit, tmp_path, agent_name, AVATARHUB_TEST_SAYS="2", AVATARHUB_TEST_PAUSE="3"
    )
    lkapi = real_livekit.api()
    try:
        async with Subscriber(real_livekit, room_name) as sub:
            await lkapi.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(agent_name=agent_name, room=room_name)
            )
            agent, _ = await sub.wait_track(rtc.TrackKind.KIND_VIDEO, timeout=90)
            await sub.wait_track(rtc.TrackKind.KIND_AUDIO, identity=agent.identity)
            assert agent.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
            sub.record(agent)
            started = time.monotonic()
            await until(lambda: time.monotonic() - started > 16, 30, "16 s of the avatar")
            log = log_path.read_text(errors="replace")
            assert log.count("said sample") >= 1, log[-3000:]
    finally:
        await lkapi.aclose()
        await stop(worker)

    frames = [s for s in sub.video if s.at > started + 1]
    assert {(s.width, s.height) for s in frames} == {(1280, 720)}, "the published size"
    rates = [sub.fps(t, t + 10) for t in (started + 1, started + 4)]
    assert min(rates) >= 24, f"frames per second over 10 s windows: {rates}"
    assert sub.loud_audio(), "the avatar's audio arrived with the speech in it"
    speaking, silent = sub.mouth_while(loud=True), sub.mouth_while(loud=False)
    assert len(speaking) > 25 and len(silent) > 25, (len(speaking), len(silent))
    assert statistics.mean(speaking) > 0.05 > statistics.mean(silent) * 2, (
        statistics.mean(speaking),
        statistics.mean(silent),
    )
