"""The render command: encoder settings (one run each), then ``render()`` end to end.

    python bench/bench_render.py [--size 1280x720] [--runs 5]

The demo avatar speaking the bundled sample is drawn once into memory (RGB frames, as the
session's video generator hands them out). Each variant then encodes those same frames to an
MP4 in memory; the first variant is the baseline (RGB frames converted by PyAV's swscale,
libx264 ``veryfast``, CRF 23). For each: encoding speed as a multiple of real time (on this
machine's cores, and pinned to one), file size, and PSNR and SSIM of the decoded video against
the drawn frames (luma), so a faster setting is only taken at unchanged quality.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import time
from collections.abc import Callable

import av
import cv2
import numpy as np


async def draw(width: int, height: int) -> tuple[list[np.ndarray], int]:
    from livekit.agents.voice.avatar import AudioSegmentEnd

    from livekit import rtc
    from livekit_plugins_avatarhub.rendering.demo import DemoRuntime
    from livekit_plugins_avatarhub.rendering.generator import RuntimeVideoGenerator
    from livekit_plugins_avatarhub.rendering.mp4 import SAMPLE_AUDIO, decode_audio

    runtime = await DemoRuntime.create(output_size=(width, height), realtime=False)
    generator = await RuntimeVideoGenerator.create(runtime)
    for block in decode_audio(SAMPLE_AUDIO, 16000):
        for start in range(0, block.size, 320):
            part = block[start : start + 320]
            await generator.push_audio(rtc.AudioFrame(part.tobytes(), 16000, 1, part.size))
    await generator.push_audio(AudioSegmentEnd())
    frames = []
    async for item in generator:
        if isinstance(item, AudioSegmentEnd):
            break
        if isinstance(item, rtc.VideoFrame):
            frames.append(np.frombuffer(item.data, np.uint8).reshape(height, width, 3).copy())
    runtime.cleanup()
    return frames, generator.video_fps


def encode(
    frames: list[np.ndarray], fps: int, *, i420: bool, preset: str, threads: int, crf: int = 23
) -> bytes:
    buffer = io.BytesIO()
    height, width = frames[0].shape[:2]
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset}
        if threads:
            stream.codec_context.thread_count = threads
        for index, rgb in enumerate(frames):
            if i420:
                yuv = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420)
                frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
            else:
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def _ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Mean SSIM of two planes (Wang et al. 2004: 11x11 Gaussian, sigma 1.5)."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(a: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(a, (11, 11), 1.5)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    top = (2 * mx * my + c1) * (2 * cov + c2)
    return float((top / ((mx * mx + my * my + c1) * (vx + vy + c2))).mean())


def quality(data: bytes, frames: list[np.ndarray]) -> tuple[float, float]:
    """PSNR (dB, every frame) and SSIM (every 4th frame) of the decoded luma against the drawn
    frames, from one decoding pass."""
    errors, scores = [], []
    with av.open(io.BytesIO(data)) as container:
        for index, (decoded, source) in enumerate(
            zip(container.decode(video=0), frames, strict=False)
        ):
            h = source.shape[0]
            y = decoded.to_ndarray(format="yuv420p")[:h].astype(np.float64)
            ref = cv2.cvtColor(source, cv2.COLOR_RGB2YUV_I420)[:h].astype(np.float64)
            errors.append(np.mean((y - ref) ** 2))
            if index % 4 == 0:
                scores.append(_ssim(y, ref))
    mse = float(np.mean(errors))
    return (99.0 if mse == 0 else 10 * np.log10(255**2 / mse)), float(np.mean(scores))


def end_to_end(runs: int) -> None:
    """``render()`` of the bundled sample, whole: drawing, conversion, H.264, AAC, the file.

    Baseline: the same call with the encoder fed in turns (draw, then encode, then draw), as
    before the pipeline; runs interleaved so both see the same machine."""
    import statistics
    import tempfile
    from pathlib import Path

    from livekit_plugins_avatarhub.rendering import mp4 as render_module
    from livekit_plugins_avatarhub.rendering.demo import DemoRuntime

    async def once(depth: int, preset: str, crf: int) -> tuple[float, int]:
        render_module.PIPELINE_DEPTH = depth
        runtime = await DemoRuntime.create(output_size=(1280, 720), realtime=False)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.mp4"
            start = time.perf_counter()
            result = await render_module.render(
                runtime, render_module.SAMPLE_AUDIO, out, preset=preset, crf=crf
            )
            spent = time.perf_counter() - start
            return result.audio_seconds / spent, out.stat().st_size

    configs = [
        ("in turns, veryfast 23 (baseline)", 0, "veryfast", 23),
        ("pipelined, veryfast 23", 3, "veryfast", 23),
        ("pipelined, superfast 26 (default)", 3, "superfast", 26),
        ("pipelined, ultrafast 29", 3, "ultrafast", 29),
    ]
    speeds: dict[str, list[float]] = {label: [] for label, *_ in configs}
    sizes: dict[str, int] = {}
    for _ in range(runs):
        for label, depth, preset, crf in configs:
            speed, size = asyncio.run(once(depth, preset, crf))
            speeds[label].append(speed)
            sizes[label] = size
    base = statistics.median(speeds[configs[0][0]])
    print(f"render() end to end, 1280x720, {runs} runs each, interleaved:")
    for label, *_ in configs:
        values = speeds[label]
        mid = statistics.median(values)
        print(
            f"  {label:34s} {mid:4.1f}x real time ({min(values):.1f}-{max(values):.1f}), "
            f"{sizes[label] / 1024:5.0f} KB, {mid / base:.2f} of the baseline"
        )


def timed(fn: Callable[[], bytes]) -> tuple[bytes, float]:
    start = time.perf_counter()
    data = fn()
    return data, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--runs", type=int, default=5, help="end-to-end runs per setting")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    frames, fps = asyncio.run(draw(width, height))
    seconds = len(frames) / fps
    variants = [
        ("baseline: rgb24 via swscale, veryfast 23", False, "veryfast", 23),
        ("i420 from OpenCV, veryfast 23", True, "veryfast", 23),
        ("i420 from OpenCV, superfast 26 (default)", True, "superfast", 26),
        ("i420 from OpenCV, superfast 27", True, "superfast", 27),
        ("i420 from OpenCV, ultrafast 29", True, "ultrafast", 29),
    ]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{len(frames)} frames ({seconds:.2f} s) at {width}x{height}; {cores} cores")
    base = None
    for label, i420, preset, crf in variants:
        data, spent = timed(
            lambda i=i420, p=preset, c=crf: encode(frames, fps, i420=i, preset=p, threads=0, crf=c)
        )
        _, spent_one = timed(
            lambda i=i420, p=preset, c=crf: encode(frames, fps, i420=i, preset=p, threads=1, crf=c)
        )
        psnr, ssim = quality(data, frames)
        if base is None:
            base = (spent, len(data), psnr, ssim)
        print(
            f"{label:40s} {seconds / spent:5.1f}x real time ({seconds / spent_one:4.1f}x on one "
            f"thread), {len(data) / 1024:6.0f} KB ({len(data) / base[1]:.2f} of baseline), "
            f"PSNR {psnr:.2f} dB ({psnr - base[2]:+.2f}), SSIM {ssim:.5f} "
            f"({ssim - base[3]:+.5f})"
        )
    end_to_end(args.runs)


if __name__ == "__main__":
    main()
