"""Glass-to-glass latency and lip sync, measured at a real subscriber in a real LiveKit room.

    python bench/bench_glass_to_glass.py [--runs 3 --modes floor,local,official-local,...]

A real LiveKit server on loopback (``scripts/install-livekit``). In each mode, speech made of
20 tone bursts with sharp onsets (0.3 s of tone, 0.4-0.8 s of silence, paced as a streaming
TTS sends it) leaves the agent, and a subscriber in the room records when each onset arrives
in the avatar's audio and when the demo avatar's mouth opens on the decoded video. Per run it
prints the distribution of

* (a) agent speech -> audio at the subscriber,
* (b) agent speech -> mouth open on the subscriber's frames,
* (c) the audio/video offset at the subscriber (mouth open - audio onset; > 0: video late).

It also prints the CPU of the publishing process (every thread of it and of its children,
LiveKit's native encoder threads included) while it speaks, in % of one core, where that
process is the agent's (``floor*``, ``local``, ``official-local``): the comparison of CPU per
avatar with encoding, and what each publish setting costs.

The modes, each a separate agent process dispatched by LiveKit, as a user runs one:

* ``floor``: a bare publisher of precomputed frames (mouth open from the onset's frame) and
  the bursts, through LiveKit's ``AVSynchronizer`` with this package's publish settings (H.264,
  one layer, 720p), paced at 25 frames a second as a runtime renders: what LiveKit's own path
  costs, whatever renders the avatar;
* ``floor-vp8``, ``floor-simulcast``, ``floor-540p``: the same with one setting changed;
* ``local``: ``examples/cloud_style.py`` on the demo avatar, rendered in the agent's job;
* ``official-local``: ``livekit-plugins-bithuman`` in local mode on the same demo runtime;
* ``participant``: ``mode="participant"``, rendered by ``serve``;
* ``dispatch``: ``mode="dispatch"``, rendered by a ``worker start`` process.

Every time is ``time.monotonic()``, one clock for every process on the machine. Audio is timed
when the subscriber's 10 ms piece arrives (LiveKit delivers it at playout pace), video when the
decoded frame arrives.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

MODES = (
    "floor",
    "floor-vp8",
    "floor-simulcast",
    "floor-540p",
    "local",
    "official-local",
    "participant",
    "dispatch",
)
#: the bare publisher's settings per mode: codec, simulcast, height
FLOORS = {
    "floor": ("h264", False, 720),
    "floor-vp8": ("vp8", False, 720),
    "floor-simulcast": ("h264", True, 720),
    "floor-540p": ("h264", False, 540),
}
LOUD = 0.05  # rms of a 10 ms piece at the subscriber (the tone is at 0.35)
OPEN, SHUT = 0.10, 0.03  # share of the mouth box painted as an open mouth


def rising(
    times: list[float], values: list[float], high: float, low: float, quiet: float
) -> list[float]:
    """Times at which ``values`` goes above ``high`` having stayed below ``low`` for ``quiet``
    seconds before (a speech onset, not a syllable inside a burst)."""
    out: list[float] = []
    below_since: float | None = None
    for at, value in zip(times, values, strict=True):
        if value > high:
            if below_since is not None and at - below_since >= quiet:
                out.append(at)
            below_since = None
        elif value < low:
            if below_since is None:
                below_since = at
        # in between: neither open nor shut, keeps the state
    return out


def match(sent: list[float], seen: list[float], window: float = 0.7) -> list[float | None]:
    """For each sent onset, the delay to the first seen onset after it (within ``window``)."""
    out: list[float | None] = []
    for t in sent:
        later = [s - t for s in seen if 0 <= s - t < window]
        out.append(min(later) if later else None)
    return out


# -- the floor: a bare publisher -----------------------------------------------------------


async def floor_child(url: str, token: str, mode: str) -> None:
    """Publish the bursts and precomputed frames through LiveKit's own AV path with ``mode``'s
    settings, printing the moment each onset is captured."""
    import cv2

    from livekit import rtc
    from livekit_plugins_avatarhub.rendering.demo import DemoRuntime, FrameState
    from livekit_plugins_avatarhub.rendering.publish import VideoPublishOptions

    codec, simulcast, height = FLOORS[mode]
    runtime = DemoRuntime()
    full_width, full_height = runtime.output_size
    width = round(full_width * height / full_height / 2) * 2

    def picture(mouth: float) -> rtc.VideoFrame:
        bgr = runtime.render(FrameState(0, mouth, None, 0.0, mouth > 0))
        if height != full_height:
            bgr = cv2.resize(bgr, (width, height), interpolation=cv2.INTER_AREA)
        rgba = np.dstack([bgr[..., ::-1], np.full(bgr.shape[:2], 255, np.uint8)])
        return rtc.VideoFrame(width, height, rtc.VideoBufferType.RGBA, rgba.tobytes())

    shut, opened = picture(0.0), picture(1.0)
    room = rtc.Room()
    await room.connect(url, token)
    audio = rtc.AudioSource(16000, 1, queue_size_ms=100)
    video = rtc.VideoSource(width, height)
    sync = rtc.AVSynchronizer(audio_source=audio, video_source=video, video_fps=25)
    await room.local_participant.publish_track(
        rtc.LocalAudioTrack.create_audio_track("audio", audio),
        rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE),
    )
    await room.local_participant.publish_track(
        rtc.LocalVideoTrack.create_video_track("video", video),
        VideoPublishOptions(codec=codec, simulcast=simulcast).track_options(25, width, height),
    )
    await asyncio.sleep(3.0)  # the subscriber finds both tracks
    from speaking_agent import burst_pcm

    rate, step = 16000, 640  # one 40 ms frame's audio per video frame
    loop = asyncio.get_running_loop()
    due = loop.time()
    print(f"{time.monotonic():.3f} speaking", flush=True)
    for n, burst in enumerate(burst_pcm(rate)):  # the bursts the agents speak
        print(f"{time.monotonic():.3f} burst {n}", flush=True)
        for start in range(0, burst.size, step):
            pcm = burst[start : start + step]
            await sync.push(opened if pcm.any() else shut)
            await sync.push(rtc.AudioFrame(pcm.tobytes(), rate, 1, pcm.size))
            # at the pace a runtime renders: LiveKit's queues stay as empty as they can be
            due += step / rate
            await asyncio.sleep(max(0.0, due - loop.time()))
    await audio.wait_for_playout()
    print(f"{time.monotonic():.3f} said sample 0", flush=True)
    await asyncio.sleep(2.0)
    await sync.aclose()
    await room.disconnect()


# -- one mode, one run -------------------------------------------------------------------


class TreeCpu:
    """CPU seconds of a process and all its children, sampled 4 times a second: the
    publishing process's threads (LiveKit's native encoder threads are threads of it) and the
    job processes an agent worker forks."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.samples: list[tuple[float, float]] = []
        self._seen: dict[int, float] = {}  # a child that ended keeps what it had used
        self._task = asyncio.create_task(self._run())

    def _total(self) -> float:
        import psutil

        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            self._seen[proc.pid] = times.user + times.system
        return sum(self._seen.values())

    async def _run(self) -> None:
        import psutil

        while True:
            try:
                self.samples.append((time.monotonic(), self._total()))
            except psutil.Error:
                return
            await asyncio.sleep(0.25)

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def share(self, since: float, until: float) -> float | None:
        """% of one core between two moments (the samples nearest inside them)."""
        inside = [(t, c) for t, c in self.samples if since <= t <= until]
        if len(inside) < 2 or inside[-1][0] - inside[0][0] < 1:
            return None
        (t0, c0), (t1, c1) = inside[0], inside[-1]
        return 100 * (c1 - c0) / (t1 - t0)


async def measure(server: Any, tmp: Path, mode: str, run: int) -> dict[str, Any]:
    from livekit import rtc

    from livekit_real import Subscriber, until
    from real_processes import avatar_backend, dispatched_avatar, speaking_agent, times
    from speaking_agent import BURSTS

    room = f"g2g-{mode}-{run}"
    cpu: TreeCpu | None = None
    async with Subscriber(server, room) as sub:
        if mode in FLOORS:
            token = server.token("floor", room)
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--child-floor",
                server.url,
                token,
                mode,
                stdout=asyncio.subprocess.PIPE,
            )
            cpu = TreeCpu(proc.pid)
            avatar, _ = await sub.wait_track(rtc.TrackKind.KIND_VIDEO, identity="floor")
            await sub.wait_track(rtc.TrackKind.KIND_AUDIO, identity="floor")
            sub.record(avatar)
            out, _ = await asyncio.wait_for(proc.communicate(), 120)
            log = out.decode()
        else:
            name = f"g2g-{mode}-{run}"
            async with (
                avatar_backend(mode, server, tmp) as env,
                speaking_agent(
                    server,
                    tmp,
                    name,
                    AVATARHUB_TEST_MODE=mode,
                    AVATARHUB_TEST_SPEECH="bursts",
                    AVATARHUB_TEST_SAYS="1",
                    **env,
                ) as agent,
            ):
                if mode in ("local", "official-local"):  # the agent publishes the avatar
                    cpu = TreeCpu(agent.proc.pid)
                avatar = await dispatched_avatar(sub, name)
                sub.record(avatar)
                await until(lambda: "said sample 0" in agent.text(), 120, "the bursts said")
                await asyncio.sleep(0.5)
                log = agent.text()
        await sub.stop_recording()
    sent = [times(log, f" burst {n}")[0] for n in range(BURSTS)]
    share = None
    if cpu is not None:
        await cpu.stop()
        share = cpu.share(sent[0], times(log, "said sample 0")[0])
    heard = rising([s.at for s in sub.audio], [s.rms for s in sub.audio], LOUD, LOUD / 4, 0.2)
    seen = rising([s.at for s in sub.video], [s.mouth for s in sub.video], OPEN, SHUT, 0.15)
    audio_delay = match(sent, heard)
    video_delay = match(sent, seen)
    offset = [
        v - a if a is not None and v is not None else None
        for a, v in zip(audio_delay, video_delay, strict=True)
    ]
    return {"audio": audio_delay, "video": video_delay, "offset": offset, "cpu": share}


def p95(values: list[float]) -> float:
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, round(0.95 * (len(ranked) - 1)))]


def describe(values: list[float | None], signed: bool = False) -> str:
    got = sorted(1000 * v for v in values if v is not None)
    missed = len(values) - len(got)
    if not got:
        return f"nothing matched ({missed} missed)"
    text = (
        f"p50 {statistics.median(got):6.1f}  p95 {p95(got):6.1f}  "
        f"min {got[0]:6.1f}  max {got[-1]:6.1f} ms"
    )
    if signed:  # how far out of sync, either way: the lip-sync goal is on this
        text += f"  |p95| {p95([abs(v) for v in got]):5.1f}"
    return text + (f"  ({missed} of {len(values)} unmatched)" if missed else "")


async def main_async(args: argparse.Namespace) -> None:
    from livekit_real import find_tool, running_server

    binary = find_tool("livekit-server")
    if binary is None:
        sys.exit("livekit-server is not installed: run `bash scripts/install-livekit`")
    modes = args.modes.split(",")
    for mode in modes:
        if mode not in MODES:
            sys.exit(f"unknown mode {mode!r}: pick from {', '.join(MODES)}")
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp, running_server(binary, Path(tmp)) as server:
        for run in range(args.runs):
            for mode in modes:  # interleaved, so a slow moment of the machine hits every mode
                work = Path(tmp) / f"{mode}-{run}"
                work.mkdir()
                result = await measure(server, work, mode, run)
                results[mode].append(result)
                print(f"run {run + 1} {mode:15s} (b) {describe(result['video'])}", flush=True)
                if result["cpu"] is not None:
                    print(f"run {run + 1} {mode:15s} cpu {result['cpu']:.1f} %", flush=True)
    print()
    for key, title in (
        ("audio", "(a) agent speech -> audio at the subscriber"),
        ("video", "(b) agent speech -> mouth open at the subscriber"),
        ("offset", "(c) audio/video offset at the subscriber (> 0: video late)"),
    ):
        print(title)
        for mode in modes:
            for run, result in enumerate(results[mode]):
                print(f"  {mode:15s} run {run + 1}: {describe(result[key], key == 'offset')}")
    print("CPU of the publishing process while it speaks, % of one core (per run; median)")
    floor = [r["cpu"] for r in results.get("floor", []) if r["cpu"] is not None]
    for mode in modes:
        shares = [r["cpu"] for r in results[mode] if r["cpu"] is not None]
        if not shares:
            continue
        line = f"  {mode:15s} " + " ".join(f"{v:5.1f}" for v in shares)
        line += f"   median {statistics.median(shares):5.1f}"
        if floor and mode != "floor":
            line += f"   {statistics.median(shares) / statistics.median(floor):.2f}x the floor"
        print(line)
    ours = [r["cpu"] for r in results.get("local", []) if r["cpu"] is not None]
    theirs = [r["cpu"] for r in results.get("official-local", []) if r["cpu"] is not None]
    if ours and theirs:  # same runs, interleaved
        ratios = [a / b for a, b in zip(ours, theirs, strict=False)]
        print(
            "  local / official-local per run: "
            + " ".join(f"{r:.2f}" for r in ratios)
            + f"   median {statistics.median(ratios):.2f}"
        )
    if args.json:  # after the runs, nothing else waits on this loop
        Path(args.json).write_text(json.dumps(results))  # noqa: ASYNC240


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--json", help="also write every delay to this file")
    parser.add_argument(
        "--child-floor", nargs=3, metavar=("URL", "TOKEN", "MODE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child_floor:
        asyncio.run(floor_child(*args.child_floor))
        return
    os.environ.setdefault("AVATARHUB_LOG_LEVEL", "warning")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
