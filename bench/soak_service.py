"""Join/leave cycles against ``serve``: does its memory come back?

    python bench/soak_service.py [--cycles 500 --every 100 --livekit dead|URL]

Starts ``python -m livekit_plugins_avatarhub serve`` (the demo avatar, one worker) and sends
the Flutter join-room request ``--cycles`` times. With ``--livekit dead`` (the default) every
join names a LiveKit URL nobody listens on, so each one loads the avatar, fails to connect and
answers 502; with a real server's URL (``ws://127.0.0.1:7880`` with ``LIVEKIT_API_KEY`` /
``LIVEKIT_API_SECRET`` set) each join connects and is then left. Every ``--every`` cycles it
prints the service's RSS, open fds and threads (after ``--settle`` seconds); the baseline is
the first line, after a warm-up of ``--every`` cycles, and each later line gives the change
against it.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

import httpx
import psutil

KEY = "soak-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def token(room: str, key: str, secret: str) -> str:
    from livekit import api

    grants = api.VideoGrants(room_join=True, room=room, can_update_own_metadata=True)
    return api.AccessToken(key, secret).with_identity("avatar").with_grants(grants).to_jwt()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=500)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--livekit", default="dead")
    parser.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="seconds to wait before each measurement (LiveKit's native teardown of a left "
        "room finishes a few seconds after the leave answers)",
    )
    args = parser.parse_args()
    dead = args.livekit == "dead"
    url = f"ws://127.0.0.1:{free_port()}" if dead else args.livekit
    key = os.environ.get("LIVEKIT_API_KEY", "devkey")
    secret = os.environ.get("LIVEKIT_API_SECRET", "secret-secret-secret-secret-0000")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEKIT_")}
    env["AVATARHUB_SERVICE_KEY"] = KEY
    service = subprocess.Popen(
        [sys.executable, "-m", "livekit_plugins_avatarhub", "serve", "--port", str(port)],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    proc = psutil.Process(service.pid)
    base = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=base, headers={"authorization": f"Bearer {KEY}"}, timeout=60)
    try:
        for _ in range(300):
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        baseline = None
        answers: dict[int, int] = {}
        started = time.monotonic()
        for cycle in range(1, args.cycles + args.every + 1):
            room = f"soak-{cycle}"
            r = client.post(
                "/v1/agents/demo/join-room",
                json={"room_url": url, "room_token": token(room, key, secret), "listen_to": "u"},
            )
            answers[r.status_code] = answers.get(r.status_code, 0) + 1
            if r.status_code == 200:
                client.post("/v1/agents/demo/leave-room", json={"room_name": room})
            if cycle % args.every == 0:
                time.sleep(args.settle)
                rss = proc.memory_info().rss / 2**20
                fds, threads = proc.num_fds(), proc.num_threads()
                if baseline is None:
                    baseline = (rss, fds, threads)
                    print(
                        f"after {cycle} warm-up cycles: RSS {rss:.0f} MB, {fds} fds, "
                        f"{threads} threads (baseline)"
                    )
                else:
                    print(
                        f"after {cycle - args.every:4d} more: RSS {rss:.0f} MB "
                        f"({rss / baseline[0]:.2f}x), {fds} fds ({fds - baseline[1]:+d}), "
                        f"{threads} threads ({threads - baseline[2]:+d})",
                        flush=True,
                    )
        took = time.monotonic() - started - args.settle * (args.cycles // args.every + 1)
        print(f"answers: {answers}; {took / (args.cycles + args.every) * 1000:.0f} ms per cycle")
    finally:
        client.close()
        service.terminate()
        service.wait(20)


if __name__ == "__main__":
    main()
