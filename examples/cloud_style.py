"""A LiveKit agent written exactly as bitHuman's cloud docs show it.

The only difference from the cloud version is the import line: this renders the avatar in this
worker process, on bitHuman's local runtime, after fetching the model for ``avatar_id``.

    export LIVEKIT_URL=... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=...
    export BITHUMAN_API_SECRET=...  BITHUMAN_AVATAR_ID=A91XMB7113   # or BITHUMAN_AVATAR_ID=demo
    export OPENAI_API_KEY=...
    pip install "livekit-agents[openai]" livekit-plugins-avatarhub
    python examples/cloud_style.py dev
"""

from __future__ import annotations

import os
import sys

from livekit.agents import Agent, AgentSession, JobContext, WorkerOptions, cli

from livekit.plugins import avatarhub as bithuman  # cloud: from livekit.plugins import bithuman


def make_session() -> AgentSession:
    from livekit.plugins import openai

    return AgentSession(llm=openai.realtime.RealtimeModel(voice="ash"))


async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()

    session = make_session()
    bithuman_avatar = bithuman.AvatarSession(
        avatar_id=os.getenv("BITHUMAN_AVATAR_ID"),
        api_secret=os.getenv("BITHUMAN_API_SECRET"),
        model=os.getenv("BITHUMAN_MODEL", "expression"),
    )
    await bithuman_avatar.start(session, room=ctx.room)

    await session.start(
        agent=Agent(instructions="You are a friendly assistant. Keep answers short."),
        room=ctx.room,
    )


def check_environment() -> None:
    required = ["LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET", "BITHUMAN_AVATAR_ID"]
    if os.getenv("BITHUMAN_AVATAR_ID") != "demo":
        required.append("BITHUMAN_API_SECRET")
    missing = [name for name in required if not os.getenv(name)]
    if missing:
        sys.exit(
            f"set {', '.join(missing)} first (BITHUMAN_AVATAR_ID=demo needs no bitHuman account)"
        )


if __name__ == "__main__":
    check_environment()
    cli.run_app(WorkerOptions(entrypoint_fnc=entrypoint))
