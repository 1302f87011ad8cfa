"""``serve`` gives back what each avatar took: 200 join/leave cycles in real rooms.

The Flutter join-room flow against a real LiveKit server, an agent code downloaded from
bitHuman's REST protocol (``tests/bithuman_server.py``) and rendered by the runtime double, so
that each join leases the cached model as a real one does. After a warm-up of 100 cycles the
service's RSS, open fds and threads stay within 5 % of what they were (a count of one more
is allowed for fds and threads, which are a handful), no worker is left listed, and the model
is leased while an avatar renders and free once none does.

About 3 minutes; deselected unless ``AVATARHUB_SOAK=on`` (``tox -e soak``), outside CI.
``bench/soak_service.py`` prints the same readings for the demo avatar or a dead LiveKit URL.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path

import pytest

from livekit import rtc

from bithuman_server import SECRET
from livekit_real import Subscriber
from real_processes import HERE, avatar_service, join_room

pytestmark = [pytest.mark.livekit_real, pytest.mark.slow, pytest.mark.soak]

CODE = "A91XMB7113"
WARM_UP, CYCLES, EVERY = 100, 200, 50
SETTLE = 10.0  # LiveKit's native teardown of a left room ends a few seconds after the leave


def reading(pid: int) -> tuple[float, int, int]:
    """RSS in MB, open fds, threads of process ``pid`` (Linux's /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def leased(model: Path) -> bool:
    """Whether some process holds a lease (a shared flock) on the cached ``model``."""
    fd = os.open(model, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


async def test_join_leave_cycles_leave_nothing_behind(real_livekit, tmp_path, bithuman_api):
    cache = Path(os.environ["BITHUMAN_CACHE_DIR"])  # this test's own (conftest's clean_env)
    agent = bithuman_api.add_agent(CODE)
    env = {"BITHUMAN_API_BASE": bithuman_api.api_base, "BITHUMAN_API_SECRET": SECRET}
    launcher = (str(HERE / "serve_with_double.py"),)
    async with avatar_service(real_livekit, tmp_path, command=launcher, **env) as (serve, client):
        pid = serve.proc.pid

        async def cycle(n: int, watch: Subscriber | None = None) -> None:
            room = f"soak-{n}"
            joined = await join_room(client, real_livekit, room, "avatar", agent=CODE)
            assert joined.status_code == 200, f"join {n}: {joined.text}"
            if watch is not None:  # once: a real subscriber decodes the avatar's video
                avatar, _ = await watch.wait_track(rtc.TrackKind.KIND_VIDEO, timeout=30)
                (model,) = cache.rglob("*.imx")
                assert model.read_bytes() == agent.files[agent.model], "the agent's model"
                assert leased(model), "the model is leased while the avatar renders"
            left = await client.post(f"/v1/agents/{CODE}/leave-room", json={"room_name": room})
            assert left.status_code == 200, f"leave {n}: {left.text}"

        async with Subscriber(real_livekit, "soak-0") as watch:
            await cycle(0, watch)
        readings: list[tuple[int, tuple[float, int, int]]] = []
        for n in range(1, WARM_UP + CYCLES + 1):
            await cycle(n)
            if n >= WARM_UP and n % EVERY == 0:
                await asyncio.sleep(SETTLE)
                readings.append((n, reading(pid)))
        workers = (await client.get("/v1/workers")).json()["data"]
        serve.alive()

    (model,) = cache.rglob("*.imx")
    assert not leased(model), "every lease was released"
    assert workers == [], f"workers still listed: {workers}"
    (_, base), *later = readings
    report = ", ".join(f"{n}: {r[0]:.0f} MB {r[1]} fds {r[2]} threads" for n, r in readings)
    print(f"serve after each cycle count: {report}")
    for _, (rss, fds, threads) in later:
        assert rss <= base[0] * 1.05, f"RSS grew after the warm-up ({report})"
        assert fds <= max(base[1] * 1.05, base[1] + 1), f"fds grew ({report})"
        assert threads <= max(base[2] * 1.05, base[2] + 1), f"threads grew ({report})"
