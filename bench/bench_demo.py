"""Does the demo avatar keep up with real time on one core? Measured against the 25 FPS clock.

    python bench/bench_demo.py [--size 1280x720]

Pins itself to one CPU (where the OS allows), renders talking frames with a gesture, then
renders the bundled speech sample to an MP4 (drawing + H.264/AAC encoding), and prints each
as a multiple of real time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from livekit_plugins_avatarhub.rendering.demo import DemoRuntime, FrameState
from livekit_plugins_avatarhub.rendering.mp4 import SAMPLE_AUDIO, render


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--frames", type=int, default=250)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        os.environ["OMP_NUM_THREADS"] = "1"
    import cv2

    cv2.setNumThreads(1)

    runtime = DemoRuntime(output_size=(width, height))
    runtime.get_first_frame()
    start = time.perf_counter()
    for i in range(args.frames):
        runtime.render(
            FrameState(i, (i % 12) / 12, "wave" if i % 50 < 25 else None, (i % 50) / 50, True)
        )
    per_frame = (time.perf_counter() - start) / args.frames
    budget = 1 / runtime.settings.FPS
    print(
        f"demo drawing {width}x{height}: {per_frame * 1e3:.2f} ms/frame = "
        f"{budget / per_frame:.1f}x real time at {runtime.settings.FPS} FPS (one core)"
    )

    async def encode() -> tuple[float, float]:
        rt = await DemoRuntime.create(output_size=(width, height), realtime=False)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            result = await render(rt, SAMPLE_AUDIO, Path(tmp) / "out.mp4")
            return time.perf_counter() - t0, result.audio_seconds

    spent, seconds = asyncio.run(encode())
    print(
        f"render command, {seconds:.2f} s of speech to MP4: {spent:.2f} s = "
        f"{seconds / spent:.1f}x real time (drawing + H.264 + AAC, one core)"
    )


if __name__ == "__main__":
    main()
