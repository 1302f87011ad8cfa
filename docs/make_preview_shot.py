"""Draw README's picture of ``preview`` with the command itself and a real browser.

Starts ``python -m livekit_plugins_avatarhub preview demo`` (it starts a livekit-server on
loopback), opens the page in Debian's Chromium through Playwright, plays the sample speech,
and saves the page as docs/preview.png. Needs what ``bash scripts/install-tools`` installs.

Run from the repository root: ``python docs/make_preview_shot.py``.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import sys
from pathlib import Path

from playwright.async_api import async_playwright

ROOT = Path(__file__).resolve().parents[1]
BIN = Path.home() / ".cache" / "livekit-plugins-avatarhub" / "bin" / "livekit-server"
CLIENT = ROOT / "tests" / "web" / "node_modules" / "livekit-client"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--autoplay-policy=no-user-gesture-required",
    "--disable-audio-output",
]


async def main() -> None:
    server = shutil.which("livekit-server") or str(BIN)
    argv = ["preview", "demo", "--port", "0", "--livekit-server", server]
    if CLIENT.is_dir():
        argv += ["--livekit-client", str(CLIENT)]
    preview = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "livekit_plugins_avatarhub", *argv, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert preview.stdout is not None
        line = (await preview.stdout.readline()).decode()
        found = re.search(r"http://127\.0\.0\.1:\d+/", line)
        if not found:
            raise SystemExit(f"the preview did not start: {line}")
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=shutil.which("chromium"), args=FLAGS)
            page = await browser.new_page(viewport={"width": 1280, "height": 700})
            await page.goto(found.group(0))
            await page.wait_for_function(
                "window.preview && window.preview.phase === 'ready' && window.preview.fps > 0",
                timeout=60_000,
            )
            await page.click("#sample")
            await asyncio.sleep(2.2)  # mid-word, the figures filled in
            out = Path(__file__).with_name("preview.png")
            await page.screenshot(path=str(out))
            await browser.close()
            print(out)
    finally:
        preview.send_signal(signal.SIGINT)
        await preview.wait()


if __name__ == "__main__":
    asyncio.run(main())
