"""``examples/cloud_style.py`` as a LiveKit worker whose agent speaks a sound file, not an LLM.

Run by the real-room tests as a user runs the example (``python tests/speaking_agent.py
start``). ``AVATARHUB_TEST_MODE`` picks the avatar:

* ``local``: the example as published (``from livekit.plugins import avatarhub as bithuman``);
* ``official``: the same source with only its import swapped back to the official plugin
  (``from livekit.plugins import bithuman``), in cloud mode at ``BITHUMAN_API_URL``;
* ``official-local``: the official plugin in local mode, on the demo avatar's runtime;
* ``participant`` / ``dispatch``: the example's pattern with ``mode=`` added.

The worker registers under ``AVATARHUB_TEST_AGENT_NAME`` (the test dispatches it explicitly).
Instead of an LLM the session says the bundled sample ``AVATARHUB_TEST_SAYS`` times, with
``AVATARHUB_TEST_PAUSE`` seconds of silence between, then plays a gesture with bitHuman's
documented cloud call (``perform_rpc(destination_identity=avatar.avatar_identity,
method="trigger_dynamics", ...)``) and prints what each step returned.

``AVATARHUB_TEST_SPEECH=bursts`` speaks tone bursts with sharp onsets instead of the sample,
printing when each leaves the agent (``bench/bench_glass_to_glass.py``).

``AVATARHUB_TEST_BREAK_RUNTIME=S`` breaks the avatar's runtime S seconds into the first reply
(every frame it renders raises from then on), as a crashing engine would; each
``avatar_state_changed`` the session emits is printed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
import time
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from livekit.agents import AgentSession, WorkerOptions, cli

from livekit import rtc

ROOT = Path(__file__).resolve().parents[1]
OURS = "from livekit.plugins import avatarhub as bithuman"
OFFICIAL = "from livekit.plugins import bithuman"
AVATARS: list[Any] = []  # the AvatarSessions the example created, in this job's process


@functools.lru_cache(maxsize=1)
def sample_pcm(rate: int) -> Any:
    """The bundled sample (what ``render demo`` speaks), decoded once."""
    import numpy as np

    render = sys.modules["livekit_plugins_avatarhub.rendering.mp4"]  # imported on the main thread
    return np.concatenate(list(render.decode_audio(render.SAMPLE_AUDIO, rate)))


async def speech(rate: int = 16000) -> AsyncIterator[rtc.AudioFrame]:
    """The sample in 20 ms frames at the pace of speech, as a streaming TTS sends them.

    Decoding is no part of the avatar's work, so it happens off the event loop. All of a reply
    at once would be a different test: livekit-agents 1.8 then estimates its speaking rate in
    one go, blocking this loop for 110-130 ms at each reply, which costs the avatar 3 frames
    (see the catch-up rule of ``RuntimeVideoGenerator._stream``)."""
    import livekit_plugins_avatarhub.rendering.mp4  # noqa: F401  (LiveKit plugins register on this thread)

    pcm = await asyncio.to_thread(sample_pcm, rate)
    step = rate // 50
    loop = asyncio.get_running_loop()
    due = loop.time()
    for start in range(0, pcm.size, step):
        part = pcm[start : start + step]
        yield rtc.AudioFrame(part.tobytes(), rate, 1, part.size)
        due += 0.02
        await asyncio.sleep(max(0.0, due - loop.time()))


BURSTS = 20  # tone bursts in the reply of AVATARHUB_TEST_SPEECH=bursts


def burst_pcm(rate: int = 16000) -> list[Any]:
    """The bursts of AVATARHUB_TEST_SPEECH=bursts, one int16 array each: 0.3 s of 300 Hz at
    half scale from its very first sample, then 0.4-0.8 s of silence (seeded, in 20 ms steps).
    The latency benchmark's bare publisher sends the same ones."""
    import numpy as np

    t = np.arange(int(0.3 * rate)) / rate
    tone = (np.sin(2 * np.pi * 300 * t) * 0.5 * 32767).astype(np.int16)
    gaps = np.random.default_rng(int(os.environ.get("AVATARHUB_TEST_SEED", "7")))
    step = rate // 50
    return [
        np.concatenate([tone, np.zeros(step * int(gaps.integers(20, 41)), np.int16)])
        for _ in range(BURSTS)
    ]


async def bursts(rate: int = 16000) -> AsyncIterator[rtc.AudioFrame]:
    """The bursts in 20 ms frames, paced as speech; prints the moment each burst's first
    frame leaves the agent's code, which is what the latency benchmark measures from."""
    step = rate // 50  # 20 ms frames, as a streaming TTS sends them
    loop = asyncio.get_running_loop()
    due = loop.time()
    for n, pcm in enumerate(burst_pcm(rate)):
        say(f"burst {n}")
        for start in range(0, pcm.size, step):
            part = pcm[start : start + step]
            yield rtc.AudioFrame(part.tobytes(), rate, 1, part.size)
            due += part.size / rate
            await asyncio.sleep(max(0.0, due - loop.time()))


def reply_audio() -> AsyncIterator[rtc.AudioFrame]:
    return bursts() if os.environ.get("AVATARHUB_TEST_SPEECH") == "bursts" else speech()


async def break_runtime(avatar: Any) -> None:
    await asyncio.sleep(float(os.environ["AVATARHUB_TEST_BREAK_RUNTIME"]))
    runtime = avatar.runtime

    def broken(*_: Any) -> Any:
        raise RuntimeError("the engine crashed")

    runtime.render = broken
    say("runtime broken")


def say(line: str) -> None:
    print(f"{time.monotonic():.3f} {line}", flush=True)


class SpeakingSession(AgentSession):  # type: ignore[misc]
    """An AgentSession without models that speaks the sample once it has started."""

    async def start(self, *args: Any, **kwargs: Any) -> Any:
        result = await super().start(*args, **kwargs)
        self._speaking = asyncio.create_task(self._speak())
        return result

    async def _speak(self) -> None:
        from livekit.agents import get_job_context

        says = int(os.environ.get("AVATARHUB_TEST_SAYS", "2"))
        pause = float(os.environ.get("AVATARHUB_TEST_PAUSE", "3"))
        avatar = AVATARS[-1]
        mode = os.environ.get("AVATARHUB_TEST_MODE", "local")
        if mode not in ("local", "official-local"):  # a participant of its own
            if hasattr(avatar, "wait_for_join"):  # the official plugin's from livekit-agents 1.5.13
                await avatar.wait_for_join(timeout=60)
                say("avatar joined")
            else:
                say("avatar has no wait_for_join")
        if hasattr(avatar, "avatar_state"):
            avatar.on(
                "avatar_state_changed",
                lambda e: say(f"avatar {e.old_state} -> {e.new_state}: {e.reason}"),
            )
        await asyncio.sleep(float(os.environ.get("AVATARHUB_TEST_DELAY", "2")))
        for n in range(says):
            say(f"speaking sample {n}")
            handle = self.say(f"sample {n}", audio=reply_audio(), allow_interruptions=False)
            if n == 0 and os.environ.get("AVATARHUB_TEST_BREAK_RUNTIME"):
                self._breaking = asyncio.create_task(break_runtime(avatar))
            await handle.wait_for_playout()
            say(f"said sample {n}")
            await asyncio.sleep(pause)
        room = get_job_context().room
        try:  # bitHuman's documented cloud call, written against avatar.avatar_identity
            answer = await room.local_participant.perform_rpc(
                destination_identity=avatar.avatar_identity,
                method="trigger_dynamics",
                payload=json.dumps({"action": "wave"}),
            )
            say(f"rpc answer {answer}")
        except Exception as err:
            say(f"rpc error {type(err).__name__}: {err}")
        await asyncio.sleep(1)
        handle = self.say("interrupted", audio=speech(), allow_interruptions=True)
        await asyncio.sleep(2)
        say("interrupting")
        handle.interrupt()
        await handle.wait_for_playout()
        say("interrupted")


def load_example(plugin_import: str) -> Any:
    """examples/cloud_style.py with ``plugin_import`` as its import line, noting its avatars."""
    source = (ROOT / "examples" / "cloud_style.py").read_text()
    assert OURS in source
    module = types.ModuleType("cloud_style")
    module.__file__ = str(ROOT / "examples" / "cloud_style.py")
    exec(compile(source.replace(OURS, plugin_import), module.__file__, "exec"), module.__dict__)
    module.make_session = SpeakingSession
    plugin = module.bithuman

    class Noted(plugin.AvatarSession):  # type: ignore[misc,name-defined]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.update(json.loads(os.environ.get("AVATARHUB_TEST_AVATAR_KWARGS", "{}")))
            if os.environ.get("AVATARHUB_TEST_MODE") == "official-local":
                # the official plugin in local mode on the demo avatar's runtime
                from livekit_plugins_avatarhub.rendering.demo import DemoRuntime

                kwargs = {
                    "model_path": "demo.imx",
                    "api_secret": "unused",
                    "runtime": DemoRuntime(),
                }
            super().__init__(*args, **kwargs)
            AVATARS.append(self)

    module.bithuman = types.SimpleNamespace(AvatarSession=Noted)
    return module


def example() -> Any:
    mode = os.environ.get("AVATARHUB_TEST_MODE", "local")
    return load_example(OFFICIAL if mode.startswith("official") else OURS)


async def entrypoint(ctx: Any) -> None:
    """The example's own entrypoint, loaded in the job's process (it cannot be pickled)."""
    await example().entrypoint(ctx)


if __name__ == "__main__":
    example().check_environment()
    sys.exit(
        cli.run_app(
            WorkerOptions(
                entrypoint_fnc=entrypoint,
                agent_name=os.environ["AVATARHUB_TEST_AGENT_NAME"],
                load_fnc=lambda *_: 0.0,  # a busy test machine still takes the job
                num_idle_processes=1,
                initialize_process_timeout=60,
                port=0,  # several workers on one machine
            )
        )
    )
