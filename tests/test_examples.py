"""Each example runs on the demo avatar, without a LiveKit server or an LLM."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from livekit.agents import AgentSession

from livekit import rtc

from fakes import FakeJobContext, sine_frames

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


class OfflineSession(AgentSession):
    """An AgentSession with no models that runs without joining a real room."""

    async def start(self, agent, *, room=None, **kwargs):  # type: ignore[override]
        return await super().start(agent=agent)


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sessions: list[AgentSession] = []

    def make_session() -> AgentSession:
        sessions.append(OfflineSession())
        return sessions[-1]

    module.make_session = make_session
    return module, sessions


async def speak_and_watch(ctx: FakeJobContext, session: AgentSession) -> None:
    handle = session.say("hello there", audio=sine_frames(0.5))
    pub = await ctx.room.wait_published(rtc.TrackKind.KIND_VIDEO)
    stream = rtc.VideoStream(pub.track)
    frames = 0

    async def count():
        nonlocal frames
        async for _ in stream:
            frames += 1

    task = asyncio.create_task(count())
    await asyncio.wait_for(handle.wait_for_playout(), 10)
    await asyncio.sleep(0.3)
    task.cancel()
    await stream.aclose()
    assert frames >= 10


async def shutdown(ctx: FakeJobContext, session: AgentSession) -> None:
    """What LiveKit does when a job ends: run the shutdown callbacks (avatar.aclose)."""
    await session.aclose()
    for callback in ctx.shutdown_callbacks:
        await callback()


@pytest.fixture(autouse=True)
def demo_env(monkeypatch):
    monkeypatch.setenv("BITHUMAN_AVATAR_ID", "demo")


@pytest.fixture
def job(monkeypatch):
    """Make FakeJobContext the current job, where AvatarSession looks for it."""
    import livekit.agents

    from livekit_plugins_avatarhub import _compat

    def use(ctx: FakeJobContext) -> FakeJobContext:
        def current(*args, **kwargs):
            return ctx

        monkeypatch.setattr(
            sys.modules[_compat.AvatarSessionBase.__module__],
            "get_job_context",
            current,
            raising=False,
        )
        monkeypatch.setattr(livekit.agents, "get_job_context", current)
        return ctx

    return use


async def test_cloud_style_example():
    module, sessions = load("cloud_style")
    ctx = FakeJobContext()
    await module.entrypoint(ctx)
    assert ctx.connected
    await speak_and_watch(ctx, sessions[0])
    await sessions[0].aclose()


async def test_self_hosted_example_reuses_the_prewarmed_runtime(job):
    module, sessions = load("self_hosted")
    ctx = job(FakeJobContext())
    module.prewarm(ctx.proc)
    await module.entrypoint(ctx)
    runtime = ctx.proc.userdata["runtime"]
    await speak_and_watch(ctx, sessions[0])
    await shutdown(ctx, sessions[0])
    assert ctx.shutdown_callbacks, "the avatar registered its cleanup with the job"
    # the next job in the same process gets the same runtime, still alive
    second = job(FakeJobContext(proc=ctx.proc))
    await module.entrypoint(second)
    assert second.proc.userdata["runtime"] is runtime
    await speak_and_watch(second, sessions[1])
    await shutdown(second, sessions[1])


async def test_agent_with_dynamics_example_gestures_on_keywords():
    from livekit.agents.voice.events import UserInputTranscribedEvent

    module, sessions = load("agent_with_dynamics")
    ctx = FakeJobContext()
    await module.entrypoint(ctx)
    gestures = ctx.proc.userdata["gestures"]
    assert "wave" in gestures.actions
    sessions[0].emit(
        "user_input_transcribed", UserInputTranscribedEvent(transcript="Hello!", is_final=True)
    )
    await asyncio.sleep(0.1)
    runtime = gestures._target.runtime  # the example's AvatarSession, rendering the demo
    assert runtime._action is not None and runtime._action[0] == "wave"
    await speak_and_watch(ctx, sessions[0])
    await sessions[0].aclose()


@pytest.mark.parametrize("name", ["cloud_style", "self_hosted", "agent_with_dynamics"])
def test_examples_name_the_missing_variables(name):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIVEKIT_", "BITHUMAN_"))}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), "dev"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "LIVEKIT_URL" in result.stderr and "BITHUMAN_" in result.stderr
    assert "Traceback" not in result.stderr
