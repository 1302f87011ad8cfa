"""A browser sees the avatar: Debian's Chromium with LiveKit's JavaScript SDK (``livekit-client``,
pinned in ``tests/web/package-lock.json``) subscribes on a page the test serves and plays it.

The avatar is the Flutter join-room flow's (``serve``, lip-syncing a participant's microphone),
published with the default settings (H.264, one layer). What the browser reports in
``getStats()`` is the proof: frames decoded at the published size and rate, audio arriving.
"""

from __future__ import annotations

import asyncio
import functools
import http.server
import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from livekit import rtc

from livekit_real import ADAPTS_RESOLUTION, REQUIRED, Subscriber
from real_processes import avatar_service, join_room
from test_real_join_room import lk_join, speech_ogg  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.livekit_real, pytest.mark.slow, pytest.mark.real_once]

WEB = Path(__file__).resolve().parent / "web"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--autoplay-policy=no-user-gesture-required",
    "--disable-audio-output",
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
]


def missing(what: str) -> None:
    if REQUIRED:
        pytest.fail(what)
    pytest.skip(what)


@pytest.fixture(scope="module")
def web_page():
    """tests/web on a free 127.0.0.1 port (livekit-client from its node_modules)."""
    if not (WEB / "node_modules" / "livekit-client" / "dist").is_dir():
        missing("livekit-client is not installed: run `npm ci --prefix tests/web`")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(WEB))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/viewer.html"
    server.shutdown()
    server.server_close()


@pytest.fixture
async def browser():
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(chromium):
        missing("Debian's chromium is not installed: run `bash scripts/install-tools`")
    playwright = pytest.importorskip("playwright.async_api")
    async with playwright.async_playwright() as p:
        launched = await p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            yield launched
        finally:
            await launched.close()


async def stats(page) -> dict[str, dict]:
    return {s["kind"]: s for s in await page.evaluate("window.avatarhubStats()")}


async def test_chromium_decodes_the_avatar_at_its_size_and_rate_and_hears_it(
    real_livekit,
    tmp_path,
    web_page,
    browser,
    speech_ogg,  # noqa: F811
):
    room, name = "browser-room", "BitHuman Agent"
    async with avatar_service(real_livekit, tmp_path) as (_, client):
        answer = await join_room(client, real_livekit, room, "avatar-browser")
        assert answer.status_code == 200, answer.text
        async with Subscriber(real_livekit, room) as sub:  # the avatar is up and publishing
            await sub.wait_track(rtc.TrackKind.KIND_VIDEO, name=name, timeout=60)
        page = await browser.new_page()
        token = real_livekit.token("browser-viewer", room, publish=False)
        await page.goto(f"{web_page}?url={real_livekit.url}&token={token}&name={name}")
        await page.wait_for_function("window.avatarhub.tracks.length >= 2", timeout=30_000)
        codecs = await page.evaluate("window.avatarhubCodecs()")
        assert "video/H264" in codecs, codecs
        microphone = lk_join(real_livekit, room, "app-user", speech_ogg)  # the avatar speaks
        try:
            await asyncio.sleep(3)  # past the call's ramp-up (bandwidth estimate, encoder)
            samples = []  # once a second for 12 s
            for _ in range(13):
                samples.append(await stats(page))
                await asyncio.sleep(1)
            first, last = samples[0], samples[-1]
        finally:
            microphone.kill()
            microphone.communicate()
        state = await page.evaluate("window.avatarhub")
        assert state["state"] == "connected" and not state["errors"], state
    video, audio = last["video"], last["audio"]
    print(
        json.dumps(
            {
                k: video.get(k)
                for k in (
                    "codec",
                    "decoderImplementation",
                    "frameWidth",
                    "frameHeight",
                    "framesPerSecond",
                    "framesReceived",
                    "framesDecoded",
                    "freezeCount",
                )
            }
        )
    )
    assert video["codec"] == "video/H264"
    if ADAPTS_RESOLUTION:  # libwebrtc may lower a loaded encoder's size, keeping the shape
        width, height = video["frameWidth"], video["frameHeight"]
        assert width <= 1280 and abs(width / height - 16 / 9) < 0.1, (width, height)
    else:
        assert (video["frameWidth"], video["frameHeight"]) == (1280, 720)
    # the best 5 s: Chromium, the server, the avatar and the microphone share two cores here,
    # and one stall of the machine (Chromium's freezeCount) would sink any single window
    fps = max(
        (b["video"]["framesDecoded"] - a["video"]["framesDecoded"])
        / ((b["video"]["at"] - a["video"]["at"]) / 1000)
        for a, b in zip(samples, samples[5:], strict=False)
    )
    assert fps >= 24, f"{fps:.1f} frames decoded per second at best over 5 s"
    assert audio["totalSamplesReceived"] > first["audio"]["totalSamplesReceived"]
    assert audio["totalAudioEnergy"] > first["audio"]["totalAudioEnergy"], "speech, not silence"
