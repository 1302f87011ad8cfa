"""Avatar-added latency: agent audio entering the avatar's sink → that audio published.

    python bench/bench_latency.py [--replies 20 --runs 3 --avatar demo|zero]

A real ``AgentSession`` says half-second replies (a loud tone from the first sample, so the
start of each reply is unambiguous; replies arrive faster than real time, as from a TTS)
through ``AvatarSession`` into the duck-typed room, with a random pause between replies so
every phase of the frame clock is hit. For each reply: the time its first loud sample entered
the avatar's audio sink, and the time a frame carrying that sample reached LiveKit's
``AudioSource.capture_frame`` (what the room receives). Prints the distribution of each run
(p50, p95, max and a histogram), not one number. The baseline is the frame period (40 ms at
25 FPS): a frame-paced renderer adds between 0 and one period, depending on the phase.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

LOUD = 3000


def reply_audio(rate: int = 16000):
    from livekit import rtc

    t = np.arange(rate // 2) / rate
    pcm = (np.sin(2 * np.pi * 220 * t) * 0.5 * 32767).astype(np.int16)
    pcm[0] = 20000  # the marker: the reply's first sample is loud
    n = rate // 100

    async def gen():
        for i in range(0, pcm.size, n):
            part = pcm[i : i + n]
            yield rtc.AudioFrame(part.tobytes(), rate, 1, part.size)

    return gen


async def one_run(replies: int, avatar_kind: str) -> list[float]:
    from livekit.agents import Agent, AgentSession

    from livekit import rtc
    from livekit_plugins_avatarhub import AvatarSession

    from fakes import FakeRoom

    entered: list[float] = []
    published: list[float] = []
    waiting = [False]

    original_capture = rtc.AudioSource.capture_frame

    async def capture(self: rtc.AudioSource, frame: rtc.AudioFrame) -> None:
        if waiting[0] and np.abs(np.frombuffer(frame.data, np.int16)).max() > LOUD:
            published.append(time.perf_counter())
            waiting[0] = False
        await original_capture(self, frame)

    rtc.AudioSource.capture_frame = capture  # type: ignore[method-assign]
    try:
        if avatar_kind == "zero":
            from zero_cost_runtime import ZeroCostRuntime

            avatar = AvatarSession(runtime=ZeroCostRuntime(1280, 720))
        else:
            avatar = AvatarSession(avatar_id="demo", output_size=(1280, 720))
        session = AgentSession()
        room = FakeRoom()
        await avatar.start(session, room=room)
        await session.start(agent=Agent(instructions="bench"))
        sink = avatar._audio_sink
        original_sink_capture = sink.capture_frame

        async def sink_capture(frame: rtc.AudioFrame) -> None:
            if not waiting[0] and np.abs(np.frombuffer(frame.data, np.int16)).max() > LOUD:
                if len(entered) == len(published):
                    entered.append(time.perf_counter())
                    waiting[0] = True
            await original_sink_capture(frame)

        sink.capture_frame = sink_capture  # type: ignore[method-assign]
        audio = reply_audio()
        await asyncio.sleep(1.0)
        for _ in range(replies):
            handle = session.say("reply", audio=audio(), add_to_chat_ctx=False)
            await handle.wait_for_playout()
            await asyncio.sleep(0.3 + random.random() * 0.2)
        await avatar.aclose()
        await session.aclose()
    finally:
        rtc.AudioSource.capture_frame = original_capture  # type: ignore[method-assign]
    return [(p - e) * 1000 for e, p in zip(entered, published, strict=False)]


def describe(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p50 = statistics.median(ordered)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    bins = [0] * 8
    for value in ordered:
        bins[min(7, int(value // 20))] += 1
    histogram = " ".join(f"{i * 20}-{i * 20 + 20}:{n}" for i, n in enumerate(bins) if n)
    return f"p50 {p50:5.1f} ms  p95 {p95:5.1f} ms  max {ordered[-1]:5.1f} ms  [{histogram}]"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replies", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--avatar", choices=["demo", "zero"], default="demo")
    args = parser.parse_args()
    print(f"{args.avatar} avatar, 1280x720, {args.replies} replies per run; frame period 40 ms")
    for run in range(args.runs):
        latencies = asyncio.run(one_run(args.replies, args.avatar))
        print(f"run {run + 1}: n={len(latencies)}  {describe(latencies)}")


if __name__ == "__main__":
    main()
