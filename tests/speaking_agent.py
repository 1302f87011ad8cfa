"""``examples/cloud_style.py`` as a LiveKit worker whose agent speaks a sound file, not an LLM.

Run by the real-room tests as a user runs the example (``python tests/speaking_agent.py
start``), with two changes only: the worker registers under ``AVATARHUB_TEST_AGENT_NAME`` (so
the test dispatches it explicitly, and no other room gets it), and the session, instead of an
LLM, says the bundled sample ``AVATARHUB_TEST_SAYS`` times with ``AVATARHUB_TEST_PAUSE``
seconds of silence between, then stays in the room.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from livekit.agents import AgentSession, WorkerOptions, cli

from livekit import rtc

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "livekit_plugins_avatarhub" / "assets" / "hello.wav"


async def speech(path: Path = SAMPLE) -> AsyncIterator[rtc.AudioFrame]:
    with wave.open(str(path)) as w:
        rate, channels = w.getframerate(), w.getnchannels()
        pcm = w.readframes(w.getnframes())
    step = rate // 50 * 2 * channels  # 20 ms
    for start in range(0, len(pcm), step):
        part = pcm[start : start + step]
        yield rtc.AudioFrame(part, rate, channels, len(part) // (2 * channels))


class SpeakingSession(AgentSession):  # type: ignore[misc]
    """An AgentSession without models that speaks the sample once it has started."""

    async def start(self, *args: Any, **kwargs: Any) -> Any:
        result = await super().start(*args, **kwargs)
        self._speaking = asyncio.create_task(self._speak())
        return result

    async def _speak(self) -> None:
        says = int(os.environ.get("AVATARHUB_TEST_SAYS", "2"))
        pause = float(os.environ.get("AVATARHUB_TEST_PAUSE", "3"))
        await asyncio.sleep(float(os.environ.get("AVATARHUB_TEST_DELAY", "2")))
        for n in range(says):
            handle = self.say(f"sample {n}", audio=speech(), allow_interruptions=False)
            await handle.wait_for_playout()
            print(f"said sample {n}", flush=True)
            await asyncio.sleep(pause)


def load_example(name: str = "cloud_style") -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make_session = SpeakingSession
    return module


async def entrypoint(ctx: Any) -> None:
    """The example's own entrypoint, loaded in the job's process (it cannot be pickled)."""
    await load_example().entrypoint(ctx)


if __name__ == "__main__":
    load_example().check_environment()
    sys.exit(
        cli.run_app(
            WorkerOptions(
                entrypoint_fnc=entrypoint,
                agent_name=os.environ["AVATARHUB_TEST_AGENT_NAME"],
                load_fnc=lambda *_: 0.0,  # a busy test machine still takes the job
                num_idle_processes=1,
                initialize_process_timeout=60,
            )
        )
    )
