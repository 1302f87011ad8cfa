"""How many avatars one process sustains at 1280x720, 25 FPS, all speaking at once.

    python bench/bench_capacity.py [--runtime demo|zero --max 12 --seconds 5]

Avatars are added one at a time, each with its own ``AgentSession`` and duck-typed room, all
speaking 1 s replies back to back. After each addition, over ``--seconds``: the published frame
rate of the slowest avatar (frames reaching LiveKit's ``VideoSource``), the avatar-added
latency (each reply's first audio in -> the first frame carrying it out, p95 over the step's
replies), the worst render lag (how far behind its frame clock an avatar's runtime is; it
includes the wait that keeps each picture with its sound, so it is printed, not judged), and
the process's RSS. Capacity is the last count at which every avatar kept >= 24 FPS and the
latency p95 stayed under 100 ms, as in ``bench_capacity_real.py`` (the same in real rooms,
with WebRTC encoding). The baseline, printed first, is one avatar: every later line is read
against it (FPS ratio, RSS added per avatar).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_cpu_per_avatar import tone  # noqa: E402


def p95(values: list[float]) -> float:
    """The 95th percentile of ``values`` (NaN for none)."""
    ordered = sorted(values)
    return ordered[int(0.95 * (len(ordered) - 1))] if ordered else float("nan")


def fits(fps: float, latency_p95: float) -> bool:
    """The capacity criterion of both capacity benches: every avatar (viewer) at >= 24 FPS
    and the avatar-added latency under 100 ms p95."""
    return fps >= 24 and latency_p95 < 0.1


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runtime", choices=["demo", "zero"], default="zero")
    parser.add_argument("--max", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()

    from livekit.agents import Agent, AgentSession

    from livekit import rtc
    from livekit_plugins_avatarhub import AvatarSession

    from fakes import FakeRoom
    from zero_cost_runtime import ZeroCostRuntime

    published: collections.Counter[int] = collections.Counter()
    original = rtc.VideoSource.capture_frame

    def capture(self: rtc.VideoSource, frame: rtc.VideoFrame, **kw: object) -> None:
        published[id(self)] += 1
        original(self, frame, **kw)  # type: ignore[arg-type]

    rtc.VideoSource.capture_frame = capture  # type: ignore[method-assign]
    speech = tone(1.0)  # 1 s replies: several playback latencies per avatar and step
    avatars: list[AvatarSession] = []
    talkers = []
    print(f"{args.runtime} runtime, 1280x720 at 25 FPS, {args.seconds:.0f} s per step")
    baseline = None
    capacity = 0
    for n in range(1, args.max + 1):
        if args.runtime == "zero":
            avatar = AvatarSession(runtime=ZeroCostRuntime(1280, 720))
        else:
            avatar = AvatarSession(avatar_id="demo", output_size=(1280, 720))
        session = AgentSession()
        await avatar.start(session, room=FakeRoom(f"room-{n}"))
        await session.start(agent=Agent(instructions="bench"))
        avatars.append(avatar)

        async def speak(s: AgentSession = session) -> None:
            while True:
                await s.say("speech", audio=speech(), add_to_chat_ctx=False).wait_for_playout()

        talkers.append(asyncio.create_task(speak()))
        await asyncio.sleep(1.5)  # let the newcomer settle
        seen = [a.video_generator.stats.replies if a.video_generator else 0 for a in avatars]
        before = dict(published)
        lag = 0.0
        cpu_before = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        start = time.monotonic()
        while time.monotonic() - start < args.seconds:
            await asyncio.sleep(0.2)
            for a in avatars:
                if a.video_generator is not None:
                    lag = max(lag, a.video_generator.stats.lag)
        elapsed = time.monotonic() - start
        load = 100 * (sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - cpu_before) / elapsed
        latencies = [
            x
            for a, n in zip(avatars, seen, strict=True)
            if a.video_generator is not None
            for x in a.video_generator.stats.latencies_since(n)
        ]
        latency = p95(latencies)
        sources = [a._backend._runner._video_source for a in avatars]  # type: ignore[attr-defined]
        fps = min((published[id(s)] - before.get(id(s), 0)) / elapsed for s in sources)
        rss = rss_mb()
        if baseline is None:
            baseline = (fps, rss)
        ok = fits(fps, latency)
        if ok:
            capacity = n
        per = (rss - baseline[1]) / (n - 1) if n > 1 else 0.0
        print(
            f"{n:2d} avatars: slowest {fps:5.1f} FPS ({fps / baseline[0]:.2f} of one avatar), "
            f"latency p95 {latency * 1000:4.0f} ms ({len(latencies)} replies), "
            f"lag {lag * 1000:5.0f} ms, CPU {load:5.1f} %, RSS {rss:6.0f} MB "
            f"(+{per:.0f} MB per added avatar)"
            f"{'' if ok else '  <- over'}"
        )
        if not ok:
            break
    print(f"capacity of one process: {capacity} avatars")
    for task in talkers:
        task.cancel()
    for avatar in avatars:
        await avatar.aclose()


if __name__ == "__main__":
    asyncio.run(main())
