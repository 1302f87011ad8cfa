"""BGR → LiveKit frame conversion, ours against livekit-plugins-bithuman's, measured in one run.

    python bench/bench_frame_conversion.py [--width 1280 --height 720 --frames 300]

Prints the per-frame time of each (wall, and CPU of every thread: OpenCV may use several) and
their ratio. The official plugin builds each frame with
``np.ascontiguousarray(img[:, :, ::-1]).tobytes()`` (two full copies); ours converts once into
a reused buffer that LiveKit takes without copying.

It also weighs converting to I420 with OpenCV instead (LiveKit then skips its own RGB→I420
conversion): the CPU of both ways, and how far OpenCV's planes are from LiveKit's (PSNR) on the
demo avatar and on a textured frame.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from livekit import rtc
from livekit_plugins_avatarhub.rendering.generator import FrameConverter


def official(image: np.ndarray) -> rtc.VideoFrame:
    rgb = np.ascontiguousarray(image[:, :, ::-1])
    return rtc.VideoFrame(rgb.shape[1], rgb.shape[0], rtc.VideoBufferType.RGB24, rgb.tobytes())


def measure(fn, images: list[np.ndarray], repeats: int = 5) -> tuple[float, float]:
    """Median over repeats of the mean seconds per frame: (wall, CPU of every thread)."""
    runs, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        for image in images:
            fn(image)
        runs.append((time.perf_counter() - start) / len(images))
        cpu.append((time.process_time() - start_cpu) / len(images))
    return statistics.median(runs), statistics.median(cpu)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def i420_alternative(images: list[np.ndarray], width: int, height: int) -> None:
    """What a picture costs up to LiveKit's encoder input, ours (RGB24, which LiveKit turns
    into I420 in ``capture_frame``) against OpenCV's BGR->I420 (which LiveKit takes as is)."""
    import asyncio

    import cv2

    from livekit_plugins_avatarhub.rendering.demo import DemoRuntime, FrameState

    ours = FrameConverter(width, height, ring_size=6)
    ring = [bytearray(width * height * 3 // 2) for _ in range(6)]
    planes = [np.frombuffer(b, np.uint8).reshape(height * 3 // 2, width) for b in ring]
    turn = [0]

    async def captured() -> tuple[float, float]:
        source = rtc.VideoSource(width, height)

        def rgb24(image: np.ndarray) -> None:
            source.capture_frame(ours(image))

        def i420(image: np.ndarray) -> None:
            turn[0] = n = (turn[0] + 1) % len(ring)
            cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420, dst=planes[n])
            source.capture_frame(rtc.VideoFrame(width, height, rtc.VideoBufferType.I420, ring[n]))

        result = []
        for way in (rgb24, i420):
            result.append(measure(way, images)[1])
            await asyncio.sleep(0.2)  # LiveKit's side finishes what it was handed
        await source.aclose()
        return result[0], result[1]

    cpu_rgb24, cpu_i420 = asyncio.run(captured())
    print(
        f"captured (CPU) : ours + LiveKit's RGB24->I420 {cpu_rgb24 * 1e3:.3f} ms, "
        f"OpenCV BGR->I420 {cpu_i420 * 1e3:.3f} ms, saving {(cpu_rgb24 - cpu_i420) * 25:.1%} "
        "of a core at 25 FPS"
    )
    demo = DemoRuntime().render(FrameState(0, 0.6, None, 0.0, True))
    demo = cv2.resize(demo, (width, height))
    textured = cv2.GaussianBlur(images[0], (0, 0), 3)
    luma = width * height
    for name, image in (("demo avatar", demo), ("textured", textured)):
        theirs = np.frombuffer(ours(image).convert(rtc.VideoBufferType.I420).data, np.uint8)
        mine = cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420).reshape(-1)
        print(
            f"  PSNR against LiveKit's, {name:11s}: picture {psnr(theirs, mine):.1f} dB, "
            f"Y {psnr(theirs[:luma], mine[:luma]):.1f}, U and V "
            f"{psnr(theirs[luma:], mine[luma:]):.1f} (largest difference "
            f"{int(np.abs(theirs[luma:].astype(int) - mine[luma:]).max())})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--frames", type=int, default=100)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    # distinct frames, as a runtime produces: no cache-warm repeats of one image
    images = [
        rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
        for _ in range(min(args.frames, 16))
    ]
    images = (images * (args.frames // len(images) + 1))[: args.frames]
    ours = FrameConverter(args.width, args.height, ring_size=6)

    # correctness first: both give the same pixels
    a = np.frombuffer(official(images[0]).data, np.uint8)
    b = np.frombuffer(ours(images[0]).data, np.uint8)
    assert np.array_equal(a, b), "conversions disagree"

    t_official, cpu_official = measure(official, images)
    t_ours, cpu_ours = measure(ours, images)
    print(f"frame {args.width}x{args.height}, {args.frames} frames")
    print(f"official plugin : {t_official * 1e3:7.3f} ms/frame, CPU {cpu_official * 1e3:.3f} ms")
    print(f"avatarhub       : {t_ours * 1e3:7.3f} ms/frame, CPU {cpu_ours * 1e3:.3f} ms")
    print(
        f"ratio           : {t_ours / t_official:7.3f} (ours / official), "
        f"{t_official / t_ours:.1f}x faster"
    )
    budget = 1 / 25
    print(
        f"share of the 25 FPS frame budget: official {t_official / budget:.1%}, "
        f"ours {t_ours / budget:.1%}"
    )
    i420_alternative(images, args.width, args.height)


if __name__ == "__main__":
    main()
