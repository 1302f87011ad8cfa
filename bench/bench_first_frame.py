"""Time from ``AvatarSession.start()`` to the first video frame handed to LiveKit.

    python bench/bench_first_frame.py [--runs 5]

Three ways to start, each ``--runs`` times in this process, at 1280x720:

* ``demo``: ``avatar_id="demo"`` (builds the demo runtime);
* ``prewarmed``: ``runtime=`` made before the job (as in a LiveKit ``prewarm``);
* ``warm cache``: ``avatar_id=<code>`` whose model is already in the cache and fresh (no
  request), loaded through the runtime double (bitHuman's runtime cannot run here, so this
  measures the package's own path: resolve, lease, load, first frame).

The baseline is one frame period (40 ms): each median is also printed in frame periods.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

CODE = "A91XMB7113"


async def first_frame(make_avatar) -> float:
    from livekit.agents import AgentSession

    from livekit import rtc

    from fakes import FakeRoom

    seen = asyncio.get_running_loop().create_future()
    original = rtc.VideoSource.capture_frame

    def capture(self, frame, **kw):
        if not seen.done():
            seen.set_result(time.perf_counter())
        return original(self, frame, **kw)

    rtc.VideoSource.capture_frame = capture
    try:
        avatar = make_avatar()
        session = AgentSession()
        started = time.perf_counter()
        await avatar.start(session, room=FakeRoom())
        at = await asyncio.wait_for(seen, 10)
        await avatar.aclose()
        await session.aclose()
        return (at - started) * 1000
    finally:
        rtc.VideoSource.capture_frame = original


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    from livekit_plugins_avatarhub import AvatarSession, _compat
    from livekit_plugins_avatarhub.rendering.demo import DemoRuntime

    from fakes import FakeBithuman, write_fake_model

    cache = tempfile.mkdtemp()
    os.environ["BITHUMAN_CACHE_DIR"] = cache
    agent_dir = Path(cache) / "agents" / CODE
    agent_dir.mkdir(parents=True)
    write_fake_model(agent_dir / f"{CODE}.imx", frame_size=(1280, 720))
    _compat.bithuman_runtime_class = lambda: FakeBithuman  # the runtime double

    prewarmed = await DemoRuntime.create(output_size=(1280, 720))
    cases = {
        "demo": lambda: AvatarSession(avatar_id="demo", output_size=(1280, 720)),
        "prewarmed runtime=": lambda: AvatarSession(runtime=prewarmed),
        "warm cache": lambda: AvatarSession(
            avatar_id=CODE, api_secret="sk-bench", output_size=(1280, 720)
        ),
    }
    print(f"time to first published frame, 1280x720, median of {args.runs} (frame period 40 ms)")
    for name, make in cases.items():
        times = [await first_frame(make) for _ in range(args.runs)]
        med = statistics.median(times)
        print(
            f"{name:>20}: {med:6.1f} ms = {med / 40:4.1f} frame periods "
            f"(min {min(times):.1f}, max {max(times):.1f})"
        )
    prewarmed.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
