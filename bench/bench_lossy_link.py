"""What a viewer behind a bad link sees: its audio, its video's frame rate, size and freezes,
and how soon both recover once the link clears.

    python bench/bench_lossy_link.py [--simulcast] [--rate 1mbit] [--loss 5]   # as root

A real LiveKit server, a local-mode avatar speaking 1 s replies back to back (1280x720 at 25
FPS; H.264 in one layer, the default, or with ``--simulcast`` three layers; ``--picture
texture``, the default, pans over a textured picture, ``demo`` is the demo face, whose stream is
too small to feel a 1 Mbit/s link), and a viewer
in its own network namespace, joined to this one by a veth pair whose two ends are the only
addresses the server listens on besides loopback. The link is clean for ``--clean`` seconds,
then both directions are limited to ``--rate`` (``tc`` tbf) and lose ``--loss`` % of their
packets (an ``nft`` rule), for ``--bad`` seconds, then clean again for ``--after`` seconds.

Printed per phase: the viewer's frames per second, the picture sizes it got, its longest
freeze (the longest gap between two frames), the share of the avatar's speech it heard (10 ms
pieces above the silence level, against the clean phase), the publishing process's CPU (its
encoder included), and once the link clears, how long
until a whole second had >= 24 frames at the full size again.

This kernel has no ``sch_netem`` (``tc qdisc ... netem``: "Specified qdisc kind is unknown"),
so a fixed delay cannot be added here; the rate limit's queue (400 ms at most) adds its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

NS, HOST_END, VIEWER_END = "avatarhub-lossy", "avhlossy0", "avhlossy1"
HOST_IP, VIEWER_IP = "10.213.7.1", "10.213.7.2"  # this bench's own veth pair, nothing else
TABLE = "avatarhub_lossy"


def run(*argv: str, check: bool = True) -> None:
    subprocess.run(argv, check=check, capture_output=True)


@contextlib.contextmanager
def namespace() -> Iterator[None]:
    """The viewer's network namespace and the veth pair to it; gone on the way out."""
    run("ip", "netns", "del", NS, check=False)
    run("ip", "link", "del", HOST_END, check=False)
    run("ip", "netns", "add", NS)
    try:
        run("ip", "link", "add", HOST_END, "type", "veth", "peer", "name", VIEWER_END)
        run("ip", "link", "set", VIEWER_END, "netns", NS)
        run("ip", "addr", "add", f"{HOST_IP}/30", "dev", HOST_END)
        run("ip", "link", "set", HOST_END, "up")
        inside = ("ip", "netns", "exec", NS)
        run(*inside, "ip", "addr", "add", f"{VIEWER_IP}/30", "dev", VIEWER_END)
        run(*inside, "ip", "link", "set", VIEWER_END, "up")
        run(*inside, "ip", "link", "set", "lo", "up")
        yield
    finally:
        impair(False, "", 0)
        run("ip", "link", "del", HOST_END, check=False)
        run("ip", "netns", "del", NS, check=False)


def impair(on: bool, rate: str, loss: float) -> None:
    """Both directions of the link limited to ``rate`` and losing ``loss`` % of packets."""
    for prefix, dev in (((), HOST_END), (("ip", "netns", "exec", NS), VIEWER_END)):
        run(*prefix, "nft", "delete", "table", "inet", TABLE, check=False)
        run(*prefix, "tc", "qdisc", "del", "dev", dev, "root", check=False)
        if not on:
            continue
        tbf = ("tbf", "rate", rate, "burst", "32kbit", "latency", "400ms")
        run(*prefix, "tc", "qdisc", "add", "dev", dev, "root", *tbf)
        run(*prefix, "nft", "add", "table", "inet", TABLE)
        chain = "{ type filter hook output priority 0; }"
        run(*prefix, "nft", "add", "chain", "inet", TABLE, "out", chain)
        drop = ("numgen", "random", "mod", "100", "<", str(int(loss)), "drop")
        run(*prefix, "nft", "add", "rule", "inet", TABLE, "out", "oifname", dev, *drop)


def server_config(port: int, tcp: int, udp: int, key: str, secret: str) -> dict[str, Any]:
    return {
        "port": port,
        "bind_addresses": ["127.0.0.1", HOST_IP],
        "keys": {key: secret},
        "rtc": {
            "node_ip": HOST_IP,  # the address both sides reach
            "tcp_port": tcp,
            "udp_port": udp,
            "use_external_ip": False,
            "ips": {"includes": [f"{HOST_IP}/32"]},
            "stun_servers": [f"{HOST_IP}:9"],
        },
        "room": {"auto_create": True, "empty_timeout": 30},
        "logging": {"level": "warn", "json": True},
    }


def panning_texture(frames: int = 50) -> list[Any]:
    """``frames`` 1280x720 BGR pictures panning in a circle over a smooth texture (blurred
    noise with a little grain): every picture moves, as a face and its background do."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(3)
    coarse = rng.integers(0, 255, (90, 160, 3), dtype=np.uint8)
    big = cv2.resize(coarse, (2560, 1440), interpolation=cv2.INTER_CUBIC)
    big = np.clip(big + rng.normal(0, 4, big.shape), 0, 255).astype(np.uint8)
    out = []
    for i in range(frames):
        angle = 2 * np.pi * i / frames
        x, y = int(640 + 200 * np.cos(angle)), int(360 + 120 * np.sin(angle))
        out.append(np.ascontiguousarray(big[y : y + 720, x : x + 1280]))
    return out


# -- the viewer, inside the namespace --------------------------------------------------------


async def viewer(url: str, token: str, seconds: float, out: Path) -> None:
    """Into ``out``, one JSON line per video frame (``v``: time, width, height) and per 10 ms
    of audio (``a``: time, level), for ``seconds``; kept in memory until the end, so that no
    write (to a pipe that could fill, say) ever holds up the viewer."""
    import numpy as np

    from livekit import rtc

    from livekit_real import ViewerVideoStream

    room = rtc.Room()
    rows: list[list[Any]] = []

    async def video(track: rtc.Track) -> None:
        async for event in ViewerVideoStream(track):
            frame = event.frame
            rows.append(["v", time.monotonic(), frame.width, frame.height])

    async def audio(track: rtc.Track) -> None:
        stream = rtc.AudioStream(track, sample_rate=48000, num_channels=1, frame_size_ms=10)
        async for event in stream:
            pcm = np.frombuffer(event.frame.data, np.int16).astype(np.float32)
            level = float(np.sqrt(np.mean(pcm * pcm)) / 32768) if pcm.size else 0.0
            rows.append(["a", time.monotonic(), level])

    tasks: list[asyncio.Task[None]] = []

    def subscribed(track: rtc.Track, *_: object) -> None:
        tasks.append(
            asyncio.create_task(
                video(track) if track.kind == rtc.TrackKind.KIND_VIDEO else audio(track)
            )
        )

    room.on("track_subscribed", subscribed)
    await room.connect(url, token)
    await asyncio.sleep(seconds)
    for task in tasks:
        task.cancel()
    await room.disconnect()
    text = "".join(json.dumps(row) + "\n" for row in rows)
    await asyncio.to_thread(out.write_text, text)


# -- the bench ---------------------------------------------------------------------------------


async def sent_layers(room: Any) -> dict[str, tuple[int, int, str, str]]:
    """The avatar's video as its publisher encoded it, per layer (rid): frames encoded, frames
    sent, the size, and why WebRTC held the layer back (``quality_limitation_reason``)."""
    from livekit.rtc._proto import stats_pb2

    from livekit import rtc

    out: dict[str, tuple[int, int, str, str]] = {}
    for publication in room.local_participant.track_publications.values():
        track = publication.track
        if track is None or publication.kind != rtc.TrackKind.KIND_VIDEO:
            continue
        for stat in await track.get_stats():
            if stat.WhichOneof("stats") != "outbound_rtp":
                continue
            layer = stat.outbound_rtp.outbound
            size = f"{layer.frame_width}x{layer.frame_height}" if layer.frame_width else "-"
            reason = stats_pb2.QualityLimitationReason.Name(layer.quality_limitation_reason)
            limited = reason.removeprefix("LIMITATION_").lower()
            out[layer.rid or "single"] = (layer.frames_encoded, layer.frames_sent, size, limited)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--simulcast", action="store_true")
    # the demo's flat cartoon face needs < 150 kbit/s at 720p and "noise" (two random pictures
    # in turns) overwhelms the encoder even on a clean link; "texture" pans over a smooth
    # textured picture, closer to a photographic avatar's stream
    parser.add_argument("--picture", choices=["texture", "demo", "noise"], default="texture")
    parser.add_argument("--rate", default="1mbit")
    parser.add_argument("--loss", type=float, default=5.0)
    parser.add_argument("--clean", type=float, default=10.0)
    parser.add_argument("--bad", type=float, default=20.0)
    parser.add_argument("--after", type=float, default=15.0)
    parser.add_argument("--role", default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "viewer":
        await viewer(args.url, args.token, args.seconds, Path(args.out))
        return

    from bench_cpu_per_avatar import tone
    from livekit.agents import Agent, AgentSession

    from livekit import api, rtc
    from livekit_plugins_avatarhub import AvatarSession, VideoPublishOptions

    from livekit_real import clean_env, find_tool, free_port

    binary = find_tool("livekit-server")
    if binary is None:
        sys.exit("livekit-server is missing: run `bash scripts/install-livekit`")
    key, secret = "lossy-key", "lossy-secret-lossy-secret-lossy-secret"

    def token(identity: str, **grants: Any) -> str:
        made = api.AccessToken(key, secret).with_identity(identity)
        return made.with_grants(api.VideoGrants(room_join=True, room="lossy", **grants)).to_jwt()

    workdir = Path(tempfile.mkdtemp())
    port = free_port()
    config = server_config(port, free_port(), free_port(socket.SOCK_DGRAM), key, secret)
    (workdir / "livekit.yaml").write_text(json.dumps(config))
    url = f"ws://{HOST_IP}:{port}"
    with namespace():
        server = subprocess.Popen(
            [binary, "--config", str(workdir / "livekit.yaml")],
            stdout=(workdir / "livekit.log").open("wb"),
            stderr=subprocess.STDOUT,
            env=clean_env(),
        )
        try:
            await asyncio.sleep(2)  # the server answers within a second on loopback
            room = rtc.Room()
            await room.connect(url, token("avatar-agent"))
            options = VideoPublishOptions(simulcast=args.simulcast)
            if args.picture in ("noise", "texture"):
                from zero_cost_runtime import ZeroCostRuntime

                runtime = ZeroCostRuntime(1280, 720)
                if args.picture == "texture":
                    runtime._images = panning_texture()
                avatar = AvatarSession(runtime=runtime, video_options=options)
            else:
                avatar = AvatarSession(
                    avatar_id="demo", output_size=(1280, 720), video_options=options
                )
            session = AgentSession()
            await avatar.start(session, room=room)
            await session.start(agent=Agent(instructions="bench"))
            speech = tone(1.0)

            async def speak() -> None:
                while True:
                    await session.say(
                        "speech", audio=speech(), add_to_chat_ctx=False
                    ).wait_for_playout()

            speaking = asyncio.create_task(speak())
            total = args.clean + args.bad + args.after
            watcher = await asyncio.create_subprocess_exec(
                "ip",
                "netns",
                "exec",
                NS,
                sys.executable,
                __file__,
                "--role",
                "viewer",
                "--url",
                url,
                "--token",
                token("viewer", can_publish=False),
                "--seconds",
                str(total + 8),
                "--out",
                str(workdir / "viewer.jsonl"),
                env=clean_env(),
            )
            import psutil

            def cpu() -> float:  # this process: the avatar, its encoder and its publishing
                return sum(psutil.Process().cpu_times()[:2])

            await asyncio.sleep(3)  # the viewer joins and the call ramps up
            t0, c0, l0 = time.monotonic(), cpu(), await sent_layers(room)
            await asyncio.sleep(args.clean)
            impair(True, args.rate, args.loss)
            t1, c1, l1 = time.monotonic(), cpu(), await sent_layers(room)
            await asyncio.sleep(args.bad)
            impair(False, "", 0)
            t2, c2, l2 = time.monotonic(), cpu(), await sent_layers(room)
            await asyncio.sleep(args.after)
            t3, c3, l3 = time.monotonic(), cpu(), await sent_layers(room)
            args.layers = [(l0, l1), (l1, l2), (l2, l3)]
            await watcher.wait()
            args.cpu = [
                100 * (b - a) / (tb - ta)
                for a, b, ta, tb in ((c0, c1, t0, t1), (c1, c2, t1, t2), (c2, c3, t2, t3))
            ]
            speaking.cancel()
            await avatar.aclose()
            await session.aclose()
            await room.disconnect()
        finally:
            server.terminate()
            server.wait(10)
    lines = (workdir / "viewer.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.startswith("[")]
    report(rows, (t0, t1, t2, t3), args)


def report(rows: list[list[Any]], marks: tuple[float, float, float, float], args: Any) -> None:
    t0, t1, t2, t3 = marks
    video = [(r[1], r[2], r[3]) for r in rows if r[0] == "v"]
    audio = [(r[1], r[2]) for r in rows if r[0] == "a"]
    layers = "simulcast" if args.simulcast else "one layer"
    print(
        f"{args.picture} pictures, H.264 {layers}; bad link: {args.rate}, {args.loss:g} % loss "
        "each way (no added delay)"
    )
    heard_clean = None
    phases = (("clean", t0, t1), ("bad", t1, t2), ("cleared", t2, t3))
    for (name, start, end), load, (before, after) in zip(
        phases, args.cpu, args.layers, strict=True
    ):
        frames = [v for v in video if start <= v[0] < end]
        times = [start] + [v[0] for v in frames] + [end]
        freeze = max(b - a for a, b in itertools.pairwise(times))
        sizes = sorted({f"{w}x{h}" for _, w, h in frames})
        pieces = [level for at, level in audio if start <= at < end]
        heard = sum(1 for level in pieces if level > 0.02) / max(1.0, end - start)
        heard_clean = heard_clean or heard
        print(
            f"{name:8s}: {len(frames) / (end - start):5.1f} FPS, sizes {sizes}, longest freeze "
            f"{freeze:4.2f} s, speech heard {heard / heard_clean:4.2f} of the clean phase's; "
            f"publisher {load:.0f} % CPU"
        )
        for rid, (encoded, sent, size, limited) in sorted(after.items()):
            first = before.get(rid, (0, 0, "", ""))
            print(
                f"          sent as {rid:6s} {size:>9s}: encoded "
                f"{(encoded - first[0]) / (end - start):4.1f} FPS, sent "
                f"{(sent - first[1]) / (end - start):4.1f} FPS, held back by: {limited}"
            )
    back = None
    second = t2
    while second + 1 <= t3:
        full = [v for v in video if second <= v[0] < second + 1 and (v[1], v[2]) == (1280, 720)]
        if len(full) >= 24:
            back = second + 1 - t2
            break
        second += 0.1
    print(f"after the link cleared: a full second of >= 24 FPS at 1280x720 after {back} s")


if __name__ == "__main__":
    asyncio.run(main())
