"""What leaving a LiveKit room costs in native memory: with tracks still published, or with
them unpublished first (what the avatar does since it was measured here).

    python bench/bench_room_teardown.py [--url ws://127.0.0.1:7880 --cycles 60 --runs 3]

Needs a LiveKit server (``livekit-server --dev --bind 127.0.0.1``: keys devkey / secret, or set
LIVEKIT_API_KEY / LIVEKIT_API_SECRET). Each cycle joins a new room, publishes a 48 kHz audio
track and a 1280x720 video track (LiveKit's own sources, nothing of this package), and leaves.
The baseline is a cycle that publishes nothing. Prints RSS kept per cycle, after a warm-up and
a settle, for each way, in each run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import subprocess
import sys

import psutil

from livekit import api, rtc


def token(room: str) -> str:
    key = os.environ.get("LIVEKIT_API_KEY", "devkey")
    secret = os.environ.get("LIVEKIT_API_SECRET", "secret")
    grants = api.VideoGrants(room_join=True, room=room)
    return api.AccessToken(key, secret).with_identity("bench").with_grants(grants).to_jwt()


async def cycle(url: str, room_name: str, way: str) -> None:
    room = rtc.Room()
    await room.connect(url, token(room_name))
    if way != "nothing published":
        audio, video = rtc.AudioSource(48000, 1), rtc.VideoSource(1280, 720)
        me = room.local_participant
        await me.publish_track(rtc.LocalAudioTrack.create_audio_track("a", audio))
        await me.publish_track(rtc.LocalVideoTrack.create_video_track("v", video))
        if way == "unpublished first":
            for sid in list(me.track_publications):
                await me.unpublish_track(sid)
        await audio.aclose()
        await video.aclose()
    await room.disconnect()


async def kept_per_cycle(url: str, way: str, cycles: int, tag: str) -> float:
    process = psutil.Process()
    for i in range(10):
        await cycle(url, f"warm-{tag}-{i}", way)
    await asyncio.sleep(5)
    gc.collect()
    before = process.memory_info().rss
    for i in range(cycles):
        await cycle(url, f"{tag}-{i}", way)
    await asyncio.sleep(8)
    gc.collect()
    return (process.memory_info().rss - before) / cycles / 1024


WAYS = ("nothing published", "left published", "unpublished first")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default=os.environ.get("LIVEKIT_URL", "ws://127.0.0.1:7880"))
    parser.add_argument("--cycles", type=int, default=60)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--way", choices=WAYS, help=argparse.SUPPRESS)  # one way, this process
    args = parser.parse_args()
    if args.way:
        print(asyncio.run(kept_per_cycle(args.url, args.way, args.cycles, f"{os.getpid()}")))
        return
    for run in range(1, args.runs + 1):
        figures = []
        for way in WAYS:  # each in a fresh process: what one way keeps does not mix with another
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--url",
                    args.url,
                    "--cycles",
                    str(args.cycles),
                    "--way",
                    way,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            figures.append(f"{way}: {float(done.stdout.split()[-1]):.0f} KB")
        print(f"run {run}: " + ", ".join(figures) + " kept per room", flush=True)


if __name__ == "__main__":
    main()
