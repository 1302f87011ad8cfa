"""``preview``'s refusals, before anything starts: one clear line each, nothing left running.

The preview itself, in a real LiveKit room watched by a real browser, is
``test_real_preview.py``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
from pathlib import Path

import pytest

from livekit_plugins_avatarhub.cli import main
from livekit_plugins_avatarhub.preview import livekit_local, page

WEB = Path(__file__).resolve().parent / "web"


@pytest.fixture
def no_livekit(monkeypatch, tmp_path):
    """No LiveKit configured, none on PATH, none installed by scripts/install-livekit."""
    for name in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(livekit_local, "INSTALL_DIR", tmp_path / "nothing")


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


def test_a_busy_port_is_refused_before_anything_starts(no_livekit, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["preview", "demo", "--port", str(port)]) == 1
    line = one_error_line(capsys)
    assert f"port {port} on 127.0.0.1 is in use" in line and "--port" in line


def test_no_livekit_anywhere_says_how_to_get_one(no_livekit, capsys):
    assert main(["preview", "--port", "0"]) == 1
    line = one_error_line(capsys)
    assert "no LiveKit server" in line
    for way in ("LIVEKIT_URL", "livekit-server on PATH", "--livekit-server"):
        assert way in line


def test_half_a_livekit_configuration_names_what_is_missing(no_livekit, monkeypatch, capsys):
    monkeypatch.setenv("LIVEKIT_URL", "ws://127.0.0.1:1")
    assert main(["preview", "--port", "0"]) == 1
    assert "LIVEKIT_API_KEY / LIVEKIT_API_SECRET are not" in one_error_line(capsys)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["missing.imx"], "model file missing.imx does not exist"),
        (["A91XMB7113"], "BITHUMAN_API_SECRET"),  # an agent code is downloaded: needs a secret
        (["demo", "--livekit-client", "/nowhere"], "no livekit-client.umd.js there"),
        (["demo", "--livekit-server", "/nowhere/livekit-server"], "not an executable file"),
    ],
)
def test_bad_input_is_one_line(no_livekit, capsys, args, words):
    assert main(["preview", *args, "--port", "0"]) == 1
    assert words in one_error_line(capsys)


def test_the_pinned_livekit_client_hash_is_npms_file():
    """The page's default script tag: the CDN serves npm's bytes, the hash must match them."""
    installed = WEB / "node_modules" / "livekit-client"
    if not installed.is_dir():
        missing = "livekit-client is not installed: run `npm ci --prefix tests/web`"
        if os.environ.get("AVATARHUB_REAL_LIVEKIT") == "required":
            pytest.fail(missing)
        pytest.skip(missing)
    import json

    version = json.loads((installed / "package.json").read_text())["version"]
    assert version == page.LIVEKIT_CLIENT_VERSION  # tests/web's lockfile pins the same one
    digest = hashlib.sha384((installed / "dist" / "livekit-client.umd.js").read_bytes()).digest()
    assert page.LIVEKIT_CLIENT_INTEGRITY == "sha384-" + base64.b64encode(digest).decode()
    assert f"livekit-client@{version}/dist/livekit-client.umd.js" in page.LIVEKIT_CLIENT_CDN


async def test_the_page_reports_download_progress_and_answers_loopback_names_only():
    from aiohttp.test_utils import TestClient, TestServer

    from livekit_plugins_avatarhub.preview.page import PageConfig, PreviewState, create_page

    state = PreviewState(avatar="A91XMB7113")
    config = PageConfig("ws://127.0.0.1:7880", "a-viewer-token", "the-avatar", "A91XMB7113", [])
    async with TestClient(TestServer(create_page(config, state), host="127.0.0.1")) as client:
        assert (await (await client.get("/status")).json())["phase"] == "starting"
        state.download_progress(0, 4 << 20)
        state._download_started -= 2.0  # type: ignore[operator]  # as if 2 s ago
        state.download_progress(1 << 20, 4 << 20)
        status = await (await client.get("/status")).json()
        assert status["phase"] == "downloading"
        assert status["download"]["bytes"] == 1 << 20 and status["download"]["total"] == 4 << 20
        assert 0.4 * (1 << 20) < status["download"]["rate"] < 0.6 * (1 << 20)
        state.phase, state.error = "failed", "agent A91XMB7113 was not found"
        assert (await (await client.get("/status")).json())["error"] == state.error

        joined = await (await client.get("/config.json")).json()
        assert joined["token"] == "a-viewer-token" and joined["avatar"] == "the-avatar"
        page = await (await client.get("/")).text()
        assert 'integrity="sha384-' in page and "cdn.jsdelivr.net" in page
        assert (await client.get("/sample.wav")).status == 200
        # another name for this address (a rebound DNS name): no token for it
        refused = await client.get("/config.json", headers={"Host": "attacker.example:80"})
        assert refused.status == 421 and "a-viewer-token" not in await refused.text()
