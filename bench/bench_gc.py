"""How long Python's full collection holds ``serve``'s event loop while avatars are live:
with the start-up objects frozen out of the collector (what ``serve`` does) and without.

    python bench/bench_gc.py [--url ws://127.0.0.1:7880 --live 2 --runs 5]

Needs a LiveKit server (``livekit-server --dev --bind 127.0.0.1``: keys devkey / secret, or set
LIVEKIT_API_KEY / LIVEKIT_API_SECRET). Runs ``serve`` in this process, hosts and leaves 20
demo avatars, keeps ``--live`` of them in their rooms, then times ``gc.collect()`` ``--runs``
times frozen, and again after ``gc.unfreeze()`` (the baseline, in the same process).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import socket
import statistics
import time

import httpx

from livekit import api


def token(room: str) -> str:
    key = os.environ.get("LIVEKIT_API_KEY", "devkey")
    secret = os.environ.get("LIVEKIT_API_SECRET", "secret")
    grants = api.VideoGrants(room_join=True, room=room, can_update_own_metadata=True)
    return api.AccessToken(key, secret).with_identity("avatar").with_grants(grants).to_jwt()


def timed_collections(runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - started) * 1000)
    return times


async def main(url: str, live: int, runs: int) -> None:
    from livekit_plugins_avatarhub.service.app import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    service = asyncio.create_task(
        serve(host="127.0.0.1", port=port, key="bench", api_secret=None, max_workers=live + 1)
    )
    client = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", headers={"authorization": "Bearer bench"}, timeout=60
    )
    for _ in range(300):
        try:
            if (await client.get("/health")).status_code == 200:
                break
        except httpx.TransportError:
            await asyncio.sleep(0.1)

    async def join(room: str) -> None:
        body = {"room_url": url, "room_token": token(room), "listen_to": "u"}
        r = await client.post("/v1/agents/demo/join-room", json=body)
        r.raise_for_status()

    for i in range(20):
        await join(f"gc-{i}")
        await client.post("/v1/agents/demo/leave-room", json={"room_name": f"gc-{i}"})
    for i in range(live):
        await join(f"gc-live-{i}")
    await asyncio.sleep(2)
    frozen = timed_collections(runs)
    count = gc.get_freeze_count()
    gc.unfreeze()
    walked = len(gc.get_objects())
    unfrozen = timed_collections(runs)
    print(
        f"{live} live avatars; full collection, ms (median, range of {runs}):\n"
        f"  frozen at start ({count} objects out of sight): {statistics.median(frozen):.1f} "
        f"({min(frozen):.1f}-{max(frozen):.1f})\n"
        f"  not frozen ({walked} objects walked):          {statistics.median(unfrozen):.1f} "
        f"({min(unfrozen):.1f}-{max(unfrozen):.1f})"
    )
    await client.aclose()
    service.cancel()
    await asyncio.gather(service, return_exceptions=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default=os.environ.get("LIVEKIT_URL", "ws://127.0.0.1:7880"))
    parser.add_argument("--live", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.url, args.live, args.runs))
