"""Gestures ("dynamics") triggered by what the user says or types.

The avatar's gestures come from ``GET /v1/dynamics/{agent_id}``; words like "hello" or "funny"
map to them (whole words only), with cooldowns so the avatar does not fidget.

    export LIVEKIT_URL=... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=...
    export BITHUMAN_API_SECRET=...  BITHUMAN_AVATAR_ID=A31KJC8622   # or demo
    export OPENAI_API_KEY=...
    python examples/agent_with_dynamics.py dev
"""

from __future__ import annotations

import os
import sys

from livekit.agents import Agent, AgentSession, JobContext, WorkerOptions, cli

from livekit.plugins import avatarhub

# your own words on top of the defaults; actions the avatar lacks are ignored with a warning
EXTRA_KEYWORDS = {"good morning": "mini_wave_hello", "that's hilarious": "laugh_react"}


def make_session() -> AgentSession:
    from livekit.plugins import openai

    return AgentSession(llm=openai.realtime.RealtimeModel(voice="ash"))


async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
    avatar_id = os.environ["BITHUMAN_AVATAR_ID"]
    session = make_session()
    avatar = avatarhub.AvatarSession(
        avatar_id=avatar_id, api_secret=os.getenv("BITHUMAN_API_SECRET")
    )
    gestures = await avatarhub.GestureTrigger.from_dynamics(
        avatar, avatar_id, keywords=EXTRA_KEYWORDS, cooldown=5.0, global_cooldown=2.0
    )
    await avatar.start(session, room=ctx.room)
    gestures.attach(session)
    ctx.proc.userdata["gestures"] = gestures
    await session.start(agent=Agent(instructions="You are a cheerful assistant."), room=ctx.room)


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
