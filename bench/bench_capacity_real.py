"""How many avatars fit in real rooms: one process, then the whole 2-core machine.

    python bench/bench_capacity_real.py [--runtime demo|zero] [--processes 1|2] [--max 8]

A real LiveKit server on loopback. Avatars (local mode, 1280x720 at 25 FPS, H.264 one layer:
the package's defaults) are added one at a time, each in its own room, each speaking 1 s
replies back to back, in ``--processes`` publishing processes (added to them in turn); each
room has a real viewer (in this process) that decodes the avatar's video. After each addition,
over ``--seconds``: the slowest viewer's received frame rate, the avatar-added latency (each
reply's first audio in -> the first frame carrying it out, p95 over every reply of the step)
and the worst render lag, and the publishing processes' CPU (every thread, LiveKit's encoders
included) and RSS. Capacity is the last count at which every viewer received >= 24 FPS and the
latency p95 stayed under 100 ms. The render lag is printed, not judged: it includes the wait
that keeps each picture with its sound (a picture waits while LiveKit's audio queue holds more
than a frame period). The first line (one avatar) is the baseline each later line is read
against.

The viewers decode, and the LiveKit server forwards, on the same two cores: their CPU is
printed too.
``--runtime zero`` renders nothing (two precomputed smooth pictures; random pictures would
measure the encoder's worst case, not a face).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

SIZE = (1280, 720)


# -- a publishing process: avatars in real rooms, driven over stdin ------------------------


async def publisher(runtime: str) -> None:
    """Reads ``add URL TOKEN`` and ``stats`` lines; answers each with one JSON line."""
    import numpy as np
    from bench_cpu_per_avatar import tone
    from livekit.agents import Agent, AgentSession

    from livekit import rtc
    from livekit_plugins_avatarhub import AvatarSession

    from zero_cost_runtime import ZeroCostRuntime

    speech = tone(1.0)
    avatars: list[AvatarSession] = []
    tasks: list[asyncio.Task[None]] = []
    seen: list[int] = []  # replies already reported, per avatar
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def smooth_runtime() -> ZeroCostRuntime:
        made = ZeroCostRuntime(*SIZE)
        ramp = np.linspace(40, 200, SIZE[0], dtype=np.uint8)
        face = np.repeat(np.repeat(ramp[None, :, None], SIZE[1], 0), 3, 2)
        talking = face.copy()
        talking[SIZE[1] // 2 : SIZE[1] // 2 + 80, SIZE[0] // 2 - 100 : SIZE[0] // 2 + 100] = 30
        made._images = [face, talking]
        return made

    while line := (await reader.readline()).decode().split():
        if line[0] == "add":
            room = rtc.Room()
            await room.connect(line[1], line[2])
            if runtime == "zero":
                avatar = AvatarSession(runtime=smooth_runtime())
            else:
                avatar = AvatarSession(avatar_id="demo", output_size=SIZE)
            session = AgentSession()
            await avatar.start(session, room=room)
            await session.start(agent=Agent(instructions="bench"))
            avatars.append(avatar)
            seen.append(0)

            async def speak(s: AgentSession = session) -> None:
                while True:
                    await s.say("speech", audio=speech(), add_to_chat_ctx=False).wait_for_playout()

            tasks.append(asyncio.create_task(speak()))
            print(json.dumps({"added": len(avatars)}), flush=True)
        elif line[0] == "stats":
            latencies, lag = [], 0.0
            for i, avatar in enumerate(avatars):
                stats = avatar.video_generator.stats if avatar.video_generator else None
                if stats is None:
                    continue
                latencies += stats.latencies_since(seen[i])
                seen[i] = stats.replies
                lag = max(lag, stats.lag)
            print(json.dumps({"latencies": latencies, "lag": lag}), flush=True)
    for task in tasks:
        task.cancel()
    for avatar in avatars:
        await avatar.aclose()


# -- the bench: server, viewers, steps ---------------------------------------------------


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runtime", choices=["demo", "zero"], default="demo")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--max", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--role", default="bench", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "publisher":
        await publisher(args.runtime)
        return

    import psutil
    from bench_capacity import fits, p95

    from livekit import rtc

    from livekit_real import ViewerVideoStream, clean_env, find_tool, running_server

    binary = find_tool("livekit-server")
    if binary is None:
        sys.exit("livekit-server is missing: run `bash scripts/install-livekit`")
    with running_server(binary, Path(tempfile.mkdtemp())) as server:
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--role",
                "publisher",
                "--runtime",
                args.runtime,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=clean_env(),
            )
            for _ in range(args.processes)
        ]
        watched = [psutil.Process(p.pid) for p in procs]
        me = psutil.Process()
        assert server.process is not None
        sfu = psutil.Process(server.process.pid)

        async def ask(proc: Any, line: str) -> dict[str, Any]:
            proc.stdin.write(line.encode() + b"\n")
            await proc.stdin.drain()
            while True:  # the SDK may print on stdout too: the answer is the JSON line
                out = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
                if not out:
                    raise RuntimeError("a publishing process exited")
                if out.startswith("{"):
                    return dict(json.loads(out))

        received: list[list[float]] = []  # per viewer: when each frame arrived
        viewers: list[rtc.Room] = []

        async def count(track: rtc.Track, into: list[float]) -> None:
            async for _ in ViewerVideoStream(track):
                into.append(time.monotonic())

        def cpu() -> tuple[float, float, float]:
            """CPU seconds of the publishing processes, of this one (the viewers) and of the
            LiveKit server."""
            used = sum(sum(p.cpu_times()[:2]) for p in watched)
            return used, sum(me.cpu_times()[:2]), sum(sfu.cpu_times()[:2])

        print(
            f"{args.runtime} runtime, {SIZE[0]}x{SIZE[1]} at 25 FPS in real rooms, "
            f"{args.processes} publishing process(es), {args.seconds:.0f} s per step"
        )
        base: tuple[float, float, float] | None = None  # fps, CPU %, RSS of one avatar
        capacity = 0
        tasks: list[asyncio.Task[None]] = []
        for n in range(1, args.max + 1):
            room = f"capacity-{n}"
            viewer = rtc.Room()
            frames: list[float] = []

            def subscribed(track: rtc.Track, *_: object, into: list[float] = frames) -> None:
                if track.kind == rtc.TrackKind.KIND_VIDEO:
                    tasks.append(asyncio.create_task(count(track, into)))

            viewer.on("track_subscribed", subscribed)
            await viewer.connect(server.url, server.token(f"viewer-{n}", room, publish=False))
            viewers.append(viewer)
            received.append(frames)
            proc = procs[(n - 1) % len(procs)]
            await ask(proc, f"add {server.url} {server.token(f'avatar-{n}', room, kind='agent')}")
            await asyncio.sleep(3.0)  # the newcomer's call ramps up
            for p in procs:
                await ask(p, "stats")  # forget the replies so far
            cpu_before, viewers_before, sfu_before = cpu()
            start = time.monotonic()
            await asyncio.sleep(args.seconds)
            elapsed = time.monotonic() - start
            cpu_after, viewers_after, sfu_after = cpu()
            answers = [await ask(p, "stats") for p in procs]
            latencies = [x for a in answers for x in a["latencies"]]
            latency = p95(latencies)
            lag = max(a["lag"] for a in answers)
            rates = [sum(1 for t in r if start <= t < start + elapsed) / elapsed for r in received]
            fps = min(rates)
            load = 100 * (cpu_after - cpu_before) / elapsed
            viewing = 100 * (viewers_after - viewers_before) / elapsed
            forwarding = 100 * (sfu_after - sfu_before) / elapsed
            rss = sum(p.memory_info().rss for p in watched) / 2**20
            if base is None:
                base = (fps, load, rss)
            ok = fits(fps, latency)
            if ok:
                capacity = n
            added = (
                f"+{(load - base[1]) / (n - 1):.1f} % CPU, +{(rss - base[2]) / (n - 1):.0f} MB"
                if n > 1
                else "baseline"
            )
            print(
                f"{n:2d} avatars: slowest viewer {fps:5.1f} FPS (median "
                f"{statistics.median(rates):4.1f}), latency p95 {latency * 1000:4.0f} ms "
                f"({len(latencies)} replies), lag {lag * 1000:4.0f} ms; publishers "
                f"{load:5.1f} % CPU, RSS {rss:5.0f} MB ({added} per added avatar); viewers "
                f"{viewing:5.1f} % CPU, LiveKit {forwarding:4.1f} %{'' if ok else '  <- over'}",
                flush=True,
            )
            if not ok:
                break
        print(f"capacity with {args.processes} process(es): {capacity} avatars")
        for task in tasks:
            task.cancel()
        for viewer in viewers:
            await viewer.disconnect()
        for proc in procs:
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except asyncio.TimeoutError:
                proc.kill()


if __name__ == "__main__":
    asyncio.run(main())
