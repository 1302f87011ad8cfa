"""``preview`` as a developer uses it: one command, a real LiveKit server it starts itself,
and Debian's Chromium on the page, its fake microphone fed from the bundled speech.

What the browser shows is the proof: video decoded at ≥ 24 FPS, the demo avatar's mouth open
on the frames it received while the microphone (or the sample button) speaks and closed when
it is silent, a gesture button answered by the avatar's RPC, and nothing left running after
Ctrl-C or after a failure.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
from test_real_browser import CHROMIUM_FLAGS

from livekit_plugins_avatarhub.rendering.mp4 import SAMPLE_AUDIO

from livekit_real import (
    ADAPTS_RESOLUTION,
    REQUIRED,
    clean_env,
    demo_mouth_box,
    find_tool,
    mouth_openness,
)

pytestmark = [pytest.mark.livekit_real, pytest.mark.slow, pytest.mark.real_once]

WEB = Path(__file__).resolve().parent / "web"
LIVEKIT_CLIENT = WEB / "node_modules" / "livekit-client"
FAKE_MICROPHONE = [
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    f"--use-file-for-fake-audio-capture={SAMPLE_AUDIO}",  # Chromium loops it
]
#: a frame's mouth counts as open above this share of its box (closed demo mouth: 0)
OPEN = 0.05


def missing(what: str) -> None:
    if REQUIRED:
        pytest.fail(what)
    pytest.skip(what)


def tools() -> tuple[str, str]:
    server = find_tool("livekit-server")
    chromium = find_tool("chromium") or "/usr/bin/chromium"
    if server is None:
        missing("livekit-server is not installed: run `bash scripts/install-livekit`")
    if not os.path.exists(chromium):
        missing("Debian's chromium is not installed: run `bash scripts/install-tools`")
    if not (LIVEKIT_CLIENT / "dist").is_dir():
        missing("livekit-client is not installed: run `npm ci --prefix tests/web`")
    return str(server), chromium


def left_running() -> list[psutil.Process]:
    """livekit-server processes a preview started (their config lives in avatarhub-livekit-*)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any("avatarhub-livekit-" in part for part in p.info["cmdline"] or []):
            found.append(p)
    return found


async def start_preview(tmp_path: Path, *argv: str, **env: str) -> asyncio.subprocess.Process:
    server, _ = tools()
    log = (tmp_path / "preview.err").open("wb")
    base = {k: v for k, v in clean_env(**env).items() if not k.startswith("LIVEKIT_")}
    base.update(env)
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "livekit_plugins_avatarhub",
        "preview",
        *argv,
        "--port",
        "0",
        "--livekit-server",
        server,
        "--livekit-client",
        str(LIVEKIT_CLIENT),
        env=base,
        stdout=asyncio.subprocess.PIPE,
        stderr=log,
    )


async def stop(process: asyncio.subprocess.Process) -> None:
    """Ctrl-C, as a user stops it (it stops what it started), then SIGKILL if it hangs."""
    if process.returncode is None:
        process.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(process.wait(), 30)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()


async def page_url(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
    found = re.search(r"http://127\.0\.0\.1:\d+/", line)
    assert found, line
    return found.group(0)


async def mouths(page, count: int, every: float = 0.1) -> list[float]:
    """The demo mouth's openness on ``count`` frames of the page's own <video>, each drawn at
    one size (libwebrtc may change the received size on a loaded machine)."""
    width, height = 640, 360
    x0, y0, x1, y1 = demo_mouth_box(width, height)
    grab = """([w, h, x, y, bw, bh]) => {
        const video = document.getElementById('video');
        const canvas = (window._grab ||= document.createElement('canvas'));
        canvas.width = w; canvas.height = h;
        const g = canvas.getContext('2d', { willReadFrequently: true });
        g.drawImage(video, 0, 0, w, h);
        const bytes = g.getImageData(x, y, bw, bh).data;
        let text = '';
        for (let i = 0; i < bytes.length; i += 8192)
          text += String.fromCharCode.apply(null, bytes.subarray(i, i + 8192));
        return btoa(text);
    }"""
    found = []
    for _ in range(count):
        box = [width, height, x0, y0, x1 - x0, y1 - y0]
        data = base64.b64decode(await page.evaluate(grab, box))
        rgba = np.frombuffer(data, np.uint8).reshape(y1 - y0, x1 - x0, 4)
        found.append(mouth_openness(rgba, (0, 0, x1 - x0, y1 - y0)))
        await asyncio.sleep(every)
    return found


async def decoded_fps(page, seconds: float = 5.0) -> float:
    quality = (
        "(() => { const q = document.getElementById('video').getVideoPlaybackQuality();"
        " return [q.totalVideoFrames - q.droppedVideoFrames, performance.now()]; })()"
    )
    frames0, t0 = await page.evaluate(quality)
    await asyncio.sleep(seconds)
    frames1, t1 = await page.evaluate(quality)
    return (frames1 - frames0) / ((t1 - t0) / 1000)


async def test_the_preview_shows_the_avatar_and_it_lip_syncs_the_microphone(tmp_path):
    _, chromium = tools()
    playwright = pytest.importorskip("playwright.async_api")
    # BROWSER names a browser that cannot start: --open says so, and the preview goes on
    process = await start_preview(tmp_path, "demo", "--open", BROWSER="/nonexistent/browser")
    try:
        url = await page_url(process)
        started = psutil.Process(process.pid).children()
        async with playwright.async_playwright() as p:
            browser = await p.chromium.launch(
                executable_path=chromium, args=CHROMIUM_FLAGS + FAKE_MICROPHONE
            )
            page = await browser.new_page(viewport={"width": 1280, "height": 760})
            await page.goto(url)
            await page.wait_for_function(
                "window.preview && window.preview.state === 'connected' &&"
                " window.preview.avatarTracks.length >= 2 && window.preview.phase === 'ready'",
                timeout=60_000,
            )
            await page.wait_for_function(
                "document.getElementById('video').videoWidth > 0", timeout=30_000
            )
            # the first seconds of a WebRTC call ramp up (bandwidth estimate, encoder): a
            # viewer's steady state is what counts
            await asyncio.sleep(3)
            fps = await decoded_fps(page)
            assert fps >= 24, f"{fps:.1f} frames per second shown"
            state = await page.evaluate("window.preview")
            assert state["codec"] == "video/H264" and not state["errors"], state
            if not ADAPTS_RESOLUTION:
                assert (state["width"], state["height"]) == (1280, 720), state
            shown = await page.inner_text("#f-fps")
            assert re.fullmatch(r"\d+\.\d FPS", shown), shown

            rest = await mouths(page, 10)
            assert max(rest) < OPEN, f"the mouth moves with nobody speaking: {rest}"

            await page.click("#mic")  # the fake microphone speaks the sample, looped
            await page.wait_for_function("window.preview.mic === true")
            speaking = await mouths(page, 40)
            assert sum(m >= OPEN for m in speaking) >= 8, f"mouth while speaking: {speaking}"

            await page.click("#mic")  # off: silence on the published track
            await page.wait_for_function("window.preview.mic === false")
            await asyncio.sleep(1.5)
            quiet = await mouths(page, 10)
            assert max(quiet) < OPEN, f"the mouth moves after the microphone stopped: {quiet}"

            await page.click("#sample")  # the bundled speech, played through the same track
            await asyncio.sleep(0.5)
            sample = await mouths(page, 30)
            assert sum(m >= OPEN for m in sample) >= 6, f"mouth during the sample: {sample}"

            await page.click("button[data-gesture=wave]")
            await page.wait_for_function("window.preview.lastRpc !== null", timeout=15_000)
            answer = await page.evaluate("window.preview.lastRpc")
            assert answer["status"] == "success" and answer["action"] == "wave", answer

            shot = tmp_path / "preview.png"
            await page.screenshot(path=str(shot))
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            await browser.close()
        assert started and all(p.is_running() for p in started)  # the LiveKit server it started
        process.send_signal(signal.SIGINT)  # Ctrl-C
        assert await asyncio.wait_for(process.wait(), 30) == 0
        assert not any(p.is_running() for p in started), "livekit-server left running"
    finally:
        await stop(process)
    err = (tmp_path / "preview.err").read_text()
    assert "could not start a browser: open http://127.0.0.1:" in err, err


async def test_an_agent_code_that_fails_to_load_is_shown_and_stops_everything(
    tmp_path, bithuman_env
):
    """The agent is not on the account: the page gets the failure, the command says it once
    and stops the LiveKit server it started."""
    process = await start_preview(tmp_path, "B000000404")
    try:
        await page_url(process)
        assert await asyncio.wait_for(process.wait(), 60) == 1
    finally:
        await stop(process)
    err = (tmp_path / "preview.err").read_text().strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and "B000000404" in errors[0], err
    assert not left_running()


async def test_livekit_refusing_the_keys_is_one_line(tmp_path, real_livekit):
    process = await start_preview(
        tmp_path,
        "demo",
        LIVEKIT_URL=real_livekit.url,
        LIVEKIT_API_KEY=real_livekit.api_key,
        LIVEKIT_API_SECRET="not-the-secret-of-this-server-0123456789",
    )
    assert await asyncio.wait_for(process.wait(), 60) == 1
    err = (tmp_path / "preview.err").read_text().strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"error: LiveKit at {real_livekit.url} refused the API key")
    assert "not-the-secret" not in err[0]
    assert not left_running()
