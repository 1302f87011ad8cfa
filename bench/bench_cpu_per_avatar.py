"""CPU the plugin itself spends per avatar: ours against livekit-plugins-bithuman, same run.

    python bench/bench_cpu_per_avatar.py [--seconds 10 --runs 3 --size 1280x720]

Each configuration runs in a fresh process: a real ``AgentSession`` speaks continuously (4 s
replies, back to back) into the duck-typed room through

* ``none``: a plain audio sink played in real time, no avatar (the floor);
* ``ours``: ``AvatarSession(runtime=...)`` of this package;
* ``official``: ``livekit.plugins.bithuman.AvatarSession(runtime=...)`` in local mode;
* ``floor``: LiveKit's own ``AvatarRunner`` fed by the least a video generator can do (one
  prebuilt RGB frame, the session's audio cut into frames): what any avatar built on LiveKit's
  runner pays, whatever its plugin does;

both avatars driven by the same zero-cost runtime (precomputed frames, paced at 25 FPS). The
process's CPU time (user + system, every thread, LiveKit's native ones included) over the
measured window is reported as % of one core; each avatar's cost is that minus ``none``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))


def tone(seconds: float, rate: int = 16000):
    import numpy as np

    from livekit import rtc

    t = np.arange(int(seconds * rate)) / rate
    pcm = (np.sin(2 * np.pi * 220 * t) * 0.5 * 32767).astype(np.int16)
    n = rate // 50
    frames = [
        rtc.AudioFrame(pcm[i : i + n].tobytes(), rate, 1, len(pcm[i : i + n]))
        for i in range(0, pcm.size, n)
    ]

    async def gen():
        for frame in frames:
            yield frame

    return gen


def floor_generator(width: int, height: int):
    """A video generator with no work of its own: the same RGB frame every period, and the
    audio it was given, one frame's worth at a time."""
    from livekit.agents.voice.avatar import AudioSegmentEnd, VideoGenerator

    from livekit import rtc

    class Floor(VideoGenerator):
        def __init__(self) -> None:
            self._frame = rtc.VideoFrame(
                width, height, rtc.VideoBufferType.RGB24, bytearray(width * height * 3)
            )
            self._audio = bytearray()
            self._ended = False

        async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
            if isinstance(frame, AudioSegmentEnd):
                self._ended = True
            else:
                self._audio += frame.data.cast("b")

        def clear_buffer(self) -> None:
            self._audio.clear()

        def __aiter__(self):  # type: ignore[no-untyped-def]
            return self._frames()

        async def _frames(self):  # type: ignore[no-untyped-def]
            loop = asyncio.get_running_loop()
            due, chunk = loop.time(), 16000 // 25 * 2
            while True:
                yield self._frame
                if len(self._audio) >= chunk:
                    data = bytes(self._audio[:chunk])
                    del self._audio[:chunk]
                    yield rtc.AudioFrame(data, 16000, 1, chunk // 2)
                elif self._ended:
                    if self._audio:
                        data = bytes(self._audio)
                        self._audio.clear()
                        yield rtc.AudioFrame(data, 16000, 1, len(data) // 2)
                    self._ended = False
                    yield AudioSegmentEnd()
                due += 0.04
                await asyncio.sleep(max(0.0, due - loop.time()))

    return Floor()


async def child(kind: str, seconds: float, width: int, height: int) -> dict[str, float]:
    from livekit.agents import Agent, AgentSession
    from livekit.agents.voice.avatar import AudioSegmentEnd, QueueAudioOutput

    from fakes import FakeRoom
    from zero_cost_runtime import ZeroCostRuntime

    room = FakeRoom()
    session = AgentSession()
    consumer = None
    if kind == "ours":
        from livekit_plugins_avatarhub import AvatarSession

        avatar = AvatarSession(runtime=ZeroCostRuntime(width, height))
        await avatar.start(session, room=room)
    elif kind == "floor":
        from livekit.agents.voice.avatar import AvatarOptions, AvatarRunner

        output = QueueAudioOutput(sample_rate=16000)
        session.output.audio = output
        runner = AvatarRunner(
            room,  # type: ignore[arg-type]
            audio_recv=output,
            video_gen=floor_generator(width, height),
            options=AvatarOptions(
                video_width=width,
                video_height=height,
                video_fps=25,
                audio_sample_rate=16000,
                audio_channels=1,
            ),
        )
        await runner.start()
    elif kind == "official":
        from livekit.plugins import bithuman

        avatar = bithuman.AvatarSession(
            model_path="unused.imx", runtime=ZeroCostRuntime(width, height), api_secret="x"
        )
        await avatar.start(session, room=room)
    else:
        sink = QueueAudioOutput(sample_rate=16000)

        async def play() -> None:  # real-time playout, nothing else
            played = 0.0
            async for frame in sink:
                if isinstance(frame, AudioSegmentEnd):
                    sink.notify_playback_finished(played, interrupted=False)
                    played = 0.0
                    continue
                played += frame.duration
                await asyncio.sleep(frame.duration)

        consumer = asyncio.create_task(play())
        session.output.audio = sink
    await session.start(agent=Agent(instructions="bench"))
    speech = tone(4.0)

    async def speak() -> None:
        while True:
            handle = session.say("speech", audio=speech(), add_to_chat_ctx=False)
            await handle.wait_for_playout()

    talker = asyncio.create_task(speak())
    await asyncio.sleep(3.0)  # warm-up: first replies, caches, threads
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    await asyncio.sleep(seconds)
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    talker.cancel()
    if consumer is not None:
        consumer.cancel()
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {"cpu": cpu, "wall": t1 - t0}


def run_child(kind: str, seconds: float, size: str) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--seconds", str(seconds), "--size", size],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 120,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return 100.0 * result["cpu"] / result["wall"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--child", choices=["none", "floor", "ours", "official"])
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    if args.child:
        print(json.dumps(asyncio.run(child(args.child, args.seconds, width, height))))
        return
    kinds = ("none", "floor", "ours", "official")
    shares: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.runs):  # interleaved, so drift on the machine hits all three alike
        for kind in kinds:
            shares[kind].append(run_child(kind, args.seconds, args.size))
    print(f"{args.size} at 25 FPS, continuous speech, {args.runs} runs of {args.seconds:.0f} s")
    med = {k: statistics.median(v) for k, v in shares.items()}
    for kind in kinds:
        values = ", ".join(f"{v:.1f}" for v in shares[kind])
        print(f"{kind:>9}: {med[kind]:5.1f} % of a core (runs: {values})")
    ours, official = med["ours"] - med["none"], med["official"] - med["none"]
    floor = med["floor"] - med["none"]
    print(f"plugin cost per avatar: ours {ours:.1f} %, livekit-plugins-bithuman {official:.1f} %")
    if official > 0:
        print(f"ratio (ours / official): {ours / official:.2f}")
    print(
        f"LiveKit's avatar runner alone (floor): {floor:.1f} %; above it: ours "
        f"{ours - floor:.1f} %, livekit-plugins-bithuman {official - floor:.1f} %"
        + (f" (ratio {(ours - floor) / (official - floor):.2f})" if official > floor else "")
    )


if __name__ == "__main__":
    main()
