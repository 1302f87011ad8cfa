"""Invite a self-hosted avatar into a LiveKit room over REST, as the Flutter client does.

Needs a LiveKit server (this repository's tests cannot run one) and the avatar service:

    export AVATARHUB_SERVICE_KEY=change-me BITHUMAN_API_SECRET=...
    python -m livekit_plugins_avatarhub serve --port 8089          # on the avatar host

    export LIVEKIT_URL=wss://... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=...
    export AVATARHUB_SERVICE_URL=http://avatar-host:8089 AVATARHUB_SERVICE_KEY=change-me
    python examples/join_room_client.py A91XMB7113 my-room [--listen-to user-identity]

``--listen-to`` makes the avatar lip-sync to that participant's microphone (no agent needed);
without it the avatar waits for an agent streaming speech with LiveKit's DataStream protocol.
Press Ctrl-C to make the avatar leave.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import httpx

from livekit import api


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("agent_id")
    parser.add_argument("room")
    parser.add_argument("--listen-to", help="identity whose microphone drives the avatar")
    parser.add_argument("--name", default="Avatar", help="the avatar's display name")
    args = parser.parse_args()

    required = [
        "LIVEKIT_URL",
        "LIVEKIT_API_KEY",
        "LIVEKIT_API_SECRET",
        "AVATARHUB_SERVICE_URL",
        "AVATARHUB_SERVICE_KEY",
    ]
    missing = [name for name in required if not os.getenv(name)]
    if missing:
        sys.exit(f"set {', '.join(missing)} first")

    identity = f"avatar-{args.agent_id.lower()}"
    token = (
        api.AccessToken(os.environ["LIVEKIT_API_KEY"], os.environ["LIVEKIT_API_SECRET"])
        .with_identity(identity)
        .with_name(args.name)
        .with_kind("agent")
        .with_grants(api.VideoGrants(room_join=True, room=args.room))
        .to_jwt()
    )
    service = os.environ["AVATARHUB_SERVICE_URL"].rstrip("/")
    headers = {"authorization": f"Bearer {os.environ['AVATARHUB_SERVICE_KEY']}"}
    body = {
        "room_url": os.environ["LIVEKIT_URL"],
        "room_token": token,
        "participant_name": args.name,
    }
    if args.listen_to:
        body["listen_to"] = args.listen_to
    answer = httpx.post(
        f"{service}/v1/agents/{args.agent_id}/join-room", json=body, headers=headers, timeout=120
    )
    if answer.status_code >= 400:
        sys.exit(
            f"join-room failed: HTTP {answer.status_code} "
            f"{answer.json().get('error', {}).get('message')}"
        )
    print(f"joined: {answer.json()}")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        left = httpx.post(
            f"{service}/v1/agents/{args.agent_id}/leave-room",
            json={"room_name": args.room},
            headers=headers,
            timeout=30,
        )
        print(f"left: {left.json()}")


if __name__ == "__main__":
    main()
