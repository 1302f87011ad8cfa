"""A self-hosted avatar: a model file, fetched before jobs arrive, and a runtime per process.

``prewarm`` runs once per worker process before any job: it makes sure the model file is on
disk (``BITHUMAN_MODEL_PATH``, or downloads ``BITHUMAN_AVATAR_ID`` into the cache). The first
job in the process builds the runtime (``AsyncBithuman.create`` is a coroutine, so it needs the
job's event loop) and keeps it in ``proc.userdata``; every later job reuses it through
``AvatarSession(runtime=...)``, skipping the ~20 s model load.

    export LIVEKIT_URL=... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=...
    export BITHUMAN_API_SECRET=...  BITHUMAN_MODEL_PATH=/models/avatar.imx
    export OPENAI_API_KEY=...
    python examples/self_hosted.py dev
"""

from __future__ import annotations

import os
import sys

from livekit.agents import Agent, AgentSession, JobContext, JobProcess, WorkerOptions, cli

from livekit.plugins import avatarhub


def prewarm(proc: JobProcess) -> None:
    model_path = os.getenv("BITHUMAN_MODEL_PATH")
    if not model_path:
        avatar_id = os.environ["BITHUMAN_AVATAR_ID"]
        # downloads once for all processes (file lock); later calls hit the cache
        model_path = "demo" if avatar_id == "demo" else str(avatarhub.prefetch(avatar_id)[0])
    proc.userdata["model_path"] = model_path


def make_session() -> AgentSession:
    from livekit.plugins import openai

    return AgentSession(llm=openai.realtime.RealtimeModel(voice="ash"))


async def runtime_for(proc: JobProcess) -> avatarhub.AvatarRuntime:
    runtime = proc.userdata.get("runtime")
    if runtime is None:
        model_path = proc.userdata["model_path"]
        if model_path == "demo":
            runtime = await avatarhub.create_runtime("demo")
        else:
            runtime = await avatarhub.create_runtime(model_path=model_path)
        proc.userdata["runtime"] = runtime
    return runtime


async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
    session = make_session()
    avatar = avatarhub.AvatarSession(
        model_path=None
        if ctx.proc.userdata["model_path"] == "demo"
        else ctx.proc.userdata["model_path"],
        runtime=await runtime_for(ctx.proc),
        api_secret=os.getenv("BITHUMAN_API_SECRET"),
    )
    await avatar.start(session, room=ctx.room)
    await session.start(agent=Agent(instructions="You are a helpful assistant."), room=ctx.room)


def check_environment() -> None:
    missing = [
        n for n in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET") if not os.getenv(n)
    ]
    if not os.getenv("BITHUMAN_MODEL_PATH") and not os.getenv("BITHUMAN_AVATAR_ID"):
        missing.append("BITHUMAN_MODEL_PATH (or BITHUMAN_AVATAR_ID)")
    if os.getenv("BITHUMAN_AVATAR_ID") != "demo" and not os.getenv("BITHUMAN_API_SECRET"):
        missing.append("BITHUMAN_API_SECRET")
    if missing:
        sys.exit(f"set {', '.join(missing)} first")


if __name__ == "__main__":
    check_environment()
    cli.run_app(WorkerOptions(entrypoint_fnc=entrypoint, prewarm_fnc=prewarm))
