"""What an unlucky operator or a hostile server does, and what the user sees then.

Damaged caches, servers that redirect, trickle, expire links or answer in odd shapes, races in
the avatar service, and bad input: each gets one clear outcome, never a damaged model file, an
unbounded wait or a traceback.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import trustme

from livekit_plugins_avatarhub import (
    APITimeoutError,
    AvatarSession,
    ConfigurationError,
    IntegrityError,
    ModelFileError,
    ModelHub,
    NotCachedError,
    RateLimitedError,
    RetryPolicy,
)
from livekit_plugins_avatarhub.config import tls_context
from livekit_plugins_avatarhub.exceptions import (
    APIConnectionError,
    APIError,
    APIStatusError,
    InvalidAvatarIdError,
)
from livekit_plugins_avatarhub.hub.cache import ModelCache
from livekit_plugins_avatarhub.hub.download import RateRule
from livekit_plugins_avatarhub.hub.resolver import safe_filename
from livekit_plugins_avatarhub.ids import validate_avatar_id

from bithuman_server import SECRET, FakeBithumanService

CODE = "A91XMB7113"
FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02)


def hub(api, **options) -> ModelHub:
    return ModelHub(api_secret=SECRET, api_base=api.api_base, retry=FAST, **options)


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "livekit_plugins_avatarhub", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


# --- a model file is never handed out damaged ----------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "grow"])
async def test_a_damaged_cached_model_is_fetched_again_not_served(bithuman_api, damage):
    agent = bithuman_api.add_agent(CODE)
    path = await hub(bithuman_api).resolve(CODE)
    with path.open("r+b") as f:
        if damage == "truncate":
            f.truncate(path.stat().st_size // 2)
        else:
            f.seek(0, 2)
            f.write(b"junk")
    downloads = bithuman_api.downloads()
    again = await hub(bithuman_api).resolve(CODE)  # inside the freshness window
    assert again.read_bytes() == agent.files["essence-1"]
    assert bithuman_api.downloads() == downloads + 1


async def test_offline_a_damaged_model_is_a_clear_error(bithuman_api):
    bithuman_api.add_agent(CODE)
    path = await hub(bithuman_api).resolve(CODE)
    with path.open("r+b") as f:
        f.truncate(10)
    requests = len(bithuman_api.api_requests)
    with pytest.raises(NotCachedError, match=f"pull {CODE}"):
        await hub(bithuman_api, offline=True).resolve(CODE)
    assert len(bithuman_api.api_requests) == requests  # offline: no request at all
    listing = cli("ls")
    assert listing.returncode == 0 and "DAMAGED" in listing.stdout


async def test_pull_verify_finds_same_size_corruption(bithuman_env):
    agent = bithuman_env.add_agent(CODE)
    assert cli("pull", CODE).returncode == 0
    path = ModelCache().find(CODE)
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF  # same size, different bytes: only a hash sees it
    path.write_bytes(bytes(data))
    assert cli("pull", CODE).returncode == 0 and path.read_bytes() == bytes(data)
    verified = cli("pull", "--verify", CODE)
    assert verified.returncode == 0, verified.stderr
    assert "does not match its sha256" in verified.stderr
    assert ModelCache().find(CODE).read_bytes() == agent.files["essence-1"]


async def test_a_download_whose_completeness_cannot_be_shown_is_not_kept(bithuman_api):
    bithuman_api.add_agent(CODE, send_sha256=False)
    bithuman_api.storage_faults = ["truncate_unannounced"]
    with pytest.raises(IntegrityError, match="neither a sha256 nor a length"):
        await hub(bithuman_api).resolve(CODE)
    assert ModelCache().find(CODE) is None
    assert not [p for p in ModelCache().root.rglob("*") if p.is_file() and p.suffix == ".imx"]


def test_long_server_filenames_stay_visible():
    for name in ("." * 250 + "model", "a" * 300 + ".imx", "..." + "b" * 198 + ".imx"):
        safe = safe_filename(name, CODE, None)
        assert not safe.startswith(".") and safe.endswith(".imx") and len(safe) <= 200
    assert safe_filename("." * 300, CODE, None) == f"{CODE}.imx"


async def test_sidecars_with_wrong_types_are_ignored(bithuman_env, clean_env):
    bithuman_env.add_agent(CODE)
    path = await hub(bithuman_env).resolve(CODE)
    meta = ModelCache().meta_dir(CODE) / f"{path.name}.json"
    meta.write_text(
        json.dumps(
            {"size": "big", "sha256": 5, "last_used": "yesterday", "validated_at": [1], "model": 3}
        )
    )
    for args in (("ls",), ("prune", "--max-gb", "5"), ("pull", CODE)):
        result = cli(*args)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr


# --- network waits are bounded and honest -------------------------------------------------


@pytest.mark.parametrize("target", ["http://example.com/model.imx", "file:///etc/passwd"])
async def test_storage_redirects_are_checked_like_the_first_url(bithuman_api, target):
    bithuman_api.add_agent(CODE)
    bithuman_api.storage_faults = [f"redirect:{target}"]
    with pytest.raises(APIError, match="only https is allowed"):
        await hub(bithuman_api).resolve(CODE)
    redirects = [r for r in bithuman_api.storage_requests if r[0] == "GET"]
    assert len(redirects) == 1, "a refused redirect is not retried"


async def test_a_relative_redirect_on_the_storage_host_is_followed(bithuman_api):
    agent = bithuman_api.add_agent(CODE)
    target = f"/files/{CODE}/essence-1?X-Signature=s3cr3tsig%2Fb"
    bithuman_api.storage_faults = [f"redirect:{target}"]
    path = await hub(bithuman_api).resolve(CODE)
    assert path.read_bytes() == agent.files["essence-1"]
    gets = [p for m, p, h in bithuman_api.storage_requests if m == "GET"]
    assert gets[-1] == target, "the hop was requested exactly as given, signature unchanged"


async def test_a_redirect_loop_ends_with_a_clear_error(bithuman_api):
    bithuman_api.add_agent(CODE)
    bithuman_api.storage_faults = [f"redirect:/files/{CODE}/essence-1"] * 10
    with pytest.raises(APIError, match="redirected more than 5 times"):
        await hub(bithuman_api).resolve(CODE)
    assert len([r for r in bithuman_api.storage_requests if r[0] == "GET"]) == 6


async def test_a_trickling_download_fails_instead_of_holding_the_lock(bithuman_api):
    bithuman_api.add_agent(CODE, size=256 * 1024)
    bithuman_api.storage_faults = ["trickle"]
    started = time.monotonic()
    with pytest.raises(APITimeoutError, match="stalled"):
        await hub(bithuman_api, rate_rule=RateRule(min_rate=10 * 1024, window=0.5)).resolve(CODE)
    assert time.monotonic() - started < 10
    assert ModelCache().find(CODE) is None


@pytest.mark.parametrize("fault", ["slow", "mute"])
async def test_a_cancelled_download_stops_at_once_and_leaves_nothing(
    bithuman_api, clean_env, fault
):
    """Cancelled mid-body (a read waiting on the socket) or before the storage said anything."""
    bithuman_api.add_agent(CODE, size=1 << 20)
    bithuman_api.slow_seconds = 60.0  # "slow": 16 pieces of 64 KB, one every 3.75 s
    bithuman_api.storage_faults = [fault]
    window = 5.0  # how long a read may wait for a byte: the longest a thread may outlive it
    task = asyncio.create_task(hub(bithuman_api, rate_rule=RateRule(1, window)).resolve(CODE))

    def started() -> bool:
        if fault == "mute":
            return any(m == "GET" for m, _, _ in bithuman_api.storage_requests)
        return any(p.stat().st_size for p in clean_env.rglob("*.incomplete"))

    deadline = time.monotonic() + 20
    while not started():
        assert time.monotonic() < deadline, "the download never started"
        await asyncio.sleep(0.05)
    cancelled = time.monotonic()
    task.cancel()  # as an agent's shutdown does; the server's next word is seconds away
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - cancelled < 1.5, "the task let go at once"
    assert not [p for p in clean_env.rglob("*") if p.is_file() and "incomplete" in p.name]
    for thread in [t for t in threading.enumerate() if t.name.startswith("avatarhub-")]:
        thread.join(timeout=window + 2)
        assert not thread.is_alive(), f"{thread.name} outlived the download"
    assert not [p for p in clean_env.rglob("*") if p.is_file() and "incomplete" in p.name]


async def test_storage_downloads_go_through_the_proxy_in_the_environment(
    bithuman_api, clean_env, monkeypatch
):
    agent = bithuman_api.add_agent(CODE)
    relayed: list[str] = []

    class Proxy(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # a forward proxy: the request line holds the whole URL
            relayed.append(self.path)
            target = urlsplit(self.path)
            upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=10)
            skip = {"proxy-connection", "connection", "host"}
            upstream.request(
                "GET",
                f"{target.path}?{target.query}" if target.query else target.path,
                headers={k: v for k, v in self.headers.items() if k.lower() not in skip},
            )
            answer = upstream.getresponse()
            body = answer.read()
            self.send_response(answer.status)
            for name, value in answer.getheaders():
                if name.lower() not in ("connection", "transfer-encoding", "content-length"):
                    self.send_header(name, value)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        for name in ("no_proxy", "NO_PROXY", "HTTP_PROXY", "HTTPS_PROXY", "https_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.server_address[1]}")
        path = await hub(bithuman_api).resolve(CODE)
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert path.read_bytes() == agent.files["essence-1"]
    storage = urlsplit(bithuman_api.storage_base).netloc
    assert any(urlsplit(url).netloc == storage for url in relayed), "the model came via the proxy"


@pytest.fixture
def company_ca(tmp_path, monkeypatch):
    """A private CA (as a TLS-inspecting proxy has): a server context with a certificate it
    signed for 127.0.0.1, and its bundle as a PEM file. No CA variable is inherited."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    bundle = tmp_path / "company-ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    tls_context.cache_clear()
    yield server, bundle
    tls_context.cache_clear()


async def test_downloads_over_tls_trust_the_ca_in_ssl_cert_file(company_ca, monkeypatch):
    server, bundle = company_ca
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    with FakeBithumanService(tls=server) as api:
        agent = api.add_agent(CODE, size=512 * 1024)
        api.storage_faults = ["truncate"]  # the resume is a second TLS connection
        path = await hub(api).resolve(CODE)
        assert api.api_base.startswith("https://") and api.storage_base.startswith("https://")
    assert path.read_bytes() == agent.files["essence-1"]
    ranges = [h.get("range") for m, _, h in api.storage_requests if m == "GET"]
    assert ranges == [None, f"bytes={256 * 1024}-"]


@pytest.mark.parametrize("untrusted", ["api", "storage"])
async def test_an_untrusted_certificate_fails_at_once_naming_ssl_cert_file(company_ca, untrusted):
    server, _ = company_ca
    with FakeBithumanService(tls=server, tls_on=(untrusted,)) as api:
        api.add_agent(CODE)
        with pytest.raises(APIConnectionError, match="not trusted.*SSL_CERT_FILE") as caught:
            await hub(api).resolve(CODE)
        deadline = time.monotonic() + 5
        while not api.handshakes_refused and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        assert api.handshakes_refused == 1, "a refused certificate is not retried"
    message = str(caught.value)
    assert "certificate verify failed" in message or "issuer" in message
    assert SECRET not in message and "s3cr3tsig" not in message
    assert ModelCache().find(CODE) is None


@pytest.mark.parametrize("problem", ["does not exist", "is not a bundle"])
async def test_a_bad_ssl_cert_file_is_named(
    company_ca, monkeypatch, tmp_path, bithuman_api, problem
):
    bundle = tmp_path / "ca.pem"
    if problem == "is not a bundle":
        bundle.write_text("not a certificate")
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    bithuman_api.add_agent(CODE)
    with pytest.raises(ConfigurationError, match=f"SSL_CERT_FILE=.*ca.pem.* {problem}"):
        await hub(bithuman_api).resolve(CODE)


async def test_a_slow_api_fails_at_its_deadline(bithuman_api):
    bithuman_api.add_agent(CODE)
    bithuman_api.api_delay = 2.0
    started = time.monotonic()
    with pytest.raises(APITimeoutError, match="AVATARHUB_API_DEADLINE"):
        await hub(bithuman_api, deadline=0.5).resolve(CODE)
    assert time.monotonic() - started < 1.9


async def test_a_long_retry_after_fails_at_once_saying_when(bithuman_api):
    bithuman_api.add_agent(CODE)
    bithuman_api.api_faults = [(429, "RATE_LIMITED", {"Retry-After": "86400"})]
    started = time.monotonic()
    with pytest.raises(RateLimitedError, match="retry after 86400s"):
        await hub(bithuman_api).resolve(CODE)
    assert time.monotonic() - started < 2
    assert len(bithuman_api.api_requests) == 1


async def test_an_expired_link_is_renewed_once_and_the_download_resumes(bithuman_api):
    agent = bithuman_api.add_agent(CODE, size=512 * 1024)
    bithuman_api.storage_faults = ["truncate", "403"]  # cut off, then the link has expired
    path = await hub(bithuman_api).resolve(CODE)
    assert path.read_bytes() == agent.files["essence-1"]
    infos = [r for r in bithuman_api.api_requests if "/model/download" in r[1]]
    assert len(infos) == 2, "one fresh link was asked for"
    last = [h for m, p, h in bithuman_api.storage_requests if m == "GET"][-1]
    assert last.get("range", "").startswith("bytes="), "what was received was kept"


async def test_a_link_refused_twice_is_an_error_naming_the_cause(bithuman_api):
    bithuman_api.add_agent(CODE)
    bithuman_api.storage_faults = ["403", "403"]
    with pytest.raises(APIStatusError, match="expired or was refused"):
        await hub(bithuman_api).resolve(CODE)


async def test_an_error_envelope_in_a_200_answer_keeps_the_servers_words(bithuman_api):
    bithuman_api.add_agent(CODE)
    bithuman_api.api_faults = [(200, "QUOTA_EXCEEDED", {})]
    with pytest.raises(APIStatusError, match="QUOTA_EXCEEDED; injected"):
        await hub(bithuman_api).resolve(CODE)


async def test_oversized_api_answers_are_refused(bithuman_api):
    bithuman_api.add_agent(CODE)
    bithuman_api.huge_answer = 20 << 20
    with pytest.raises(APIStatusError, match="larger than 8 MB"):
        await hub(bithuman_api).resolve(CODE)


async def test_no_signed_query_in_any_log_line(bithuman_api, caplog):
    bithuman_api.add_agent(CODE)
    caplog.set_level(logging.DEBUG)
    await hub(bithuman_api).resolve(CODE)
    assert "HTTP Request" in caplog.text  # httpx did log the requests...
    assert "s3cr3tsig" not in caplog.text  # ...without the signature
    assert SECRET not in caplog.text


# --- the avatar service: no races, nothing left behind --------------------------------------


def flutter_join(room: str) -> dict:
    from service_harness import room_token

    return {"room_url": "wss://lk", "room_token": room_token(room), "participant_name": "Ava"}


async def test_a_leave_while_connecting_takes_the_avatar_out(avatar_service):
    client, harness, manager = avatar_service
    harness.sfu.connect_delay = 0.5
    join = asyncio.create_task(client.post("/v1/agents/demo/join-room", json=flutter_join("r")))
    await asyncio.sleep(0.2)
    left = await client.post("/v1/agents/demo/leave-room", json={"room_name": "r"})
    assert left.status_code == 200
    await join
    await asyncio.sleep(0.1)
    assert manager.get("demo", "r") is None
    assert not harness.rooms[0].isconnected(), "the worker did not stay in the room"
    assert harness.runtimes[0]._closed


async def test_failed_workers_are_bounded(avatar_service):
    client, _, _ = avatar_service
    for i in range(60):
        await client.post("/v1/agents/B000000000/join-room", json=flutter_join(f"room-{i}"))
    listed = (await client.get("/v1/workers")).json()["data"]
    assert 0 < len(listed) <= 50
    assert listed[-1]["room_name"] == "room-59", "the newest failures are kept"


async def test_malformed_requests_get_a_4xx_envelope(avatar_service):
    client, _, _ = avatar_service
    r = await client.post(
        "/v1/agents/demo/join-room",
        json=flutter_join("r"),
        headers={"authorization": b"Bearer \xff\xfe\xfa"},
    )
    assert r.status_code == 401
    deep = "[" * 30_000 + "]" * 30_000  # deeper than the JSON parser recurses, under 64 KB
    r = await client.post(
        "/v1/agents/demo/join-room", content=deep, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "VALIDATION_ERROR"
    r = await client.post(
        "/v1/agents/demo/join-room",
        content="[" * 100_000,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "REQUEST_TOO_LARGE"
    r = await client.post(f"/v1/agents/{CODE}%0A/join-room", json=flutter_join("r"))
    assert r.status_code == 400 and r.json()["error"]["code"] == "VALIDATION_ERROR"


def test_ids_with_a_trailing_newline_are_refused():
    with pytest.raises(InvalidAvatarIdError):
        validate_avatar_id(CODE + "\n")


def test_sigterm_during_a_join_stops_the_service_within_seconds(tmp_path):
    """A LiveKit URL that accepts connections and never answers holds a join in connect()."""
    with socket.socket() as blackhole, socket.socket() as probe:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(8)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        key = "service-key-0123456789"
        proc = subprocess.Popen(
            [sys.executable, "-m", "livekit_plugins_avatarhub", "serve", "--port", str(port)],
            env={**os.environ, "AVATARHUB_SERVICE_KEY": key},
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                    break
                except httpx.TransportError:
                    time.sleep(0.2)
            from service_harness import room_token

            body = {
                "room_url": f"ws://127.0.0.1:{blackhole.getsockname()[1]}",
                "room_token": room_token("r"),
            }

            def join() -> None:
                try:
                    httpx.post(
                        f"http://127.0.0.1:{port}/v1/agents/demo/join-room",
                        json=body,
                        headers={"authorization": f"Bearer {key}"},
                        timeout=60,
                    )
                except httpx.HTTPError:
                    pass

            import threading

            thread = threading.Thread(target=join, daemon=True)
            thread.start()
            time.sleep(2.0)  # the worker is now inside LiveKit's connect()
            stopped_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
            took = time.monotonic() - stopped_at
        finally:
            if proc.poll() is None:
                proc.kill()
    assert code == 0
    print(f"SIGTERM with a join in flight: the service stopped in {took:.2f}s")
    assert took < 8, f"shutdown took {took:.1f}s"


# --- every bad input gets one clear line -------------------------------------------------


def test_an_empty_model_file_is_refused_in_the_constructor(tmp_path):
    empty = tmp_path / "empty.imx"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty"):
        AvatarSession(model_path=str(empty), api_secret=SECRET)


@pytest.mark.parametrize("size", [(0, 0), (-1, 720), (1280,), (1280.0, 720), "1280x720"])
def test_a_bad_output_size_is_refused_in_the_constructor(size):
    with pytest.raises(ConfigurationError, match="output_size"):
        AvatarSession(avatar_id="demo", output_size=size)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("prune", "--max-gb", "nan"), "not a size"),
        (("prune", "--max-gb", "inf"), "not a size"),
        (("serve", "--port", "99999"), "not a TCP port"),
        (("serve", "--host", "256.1.1.1"), "not an IP address"),
        (("pull", CODE, "--api-base", "http://[::1", "--api-secret", "x"), "not an http(s) URL"),
    ],
)
def test_cli_mistakes_are_one_line(args, words):
    result = cli(*args, AVATARHUB_SERVICE_KEY="k")
    assert result.returncode != 0
    assert words in result.stderr and "Traceback" not in result.stderr


def test_render_into_a_directory_is_one_line(tmp_path: Path):
    result = cli("render", "demo", "-o", str(tmp_path))
    assert result.returncode != 0
    assert "is a directory" in result.stderr and "Traceback" not in result.stderr


async def test_a_storage_failure_never_shows_the_signature(tmp_path):
    from livekit_plugins_avatarhub._retry import RetryPolicy
    from livekit_plugins_avatarhub.exceptions import APIConnectionError
    from livekit_plugins_avatarhub.hub.download import download, storage_client

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/files/m.imx?X-Signature=s3cr3tsig"
    async with storage_client(5, RateRule()) as storage:
        with pytest.raises(APIConnectionError) as failed:
            await download(
                storage, url, tmp_path / "m.imx", retry=RetryPolicy(attempts=2, base_delay=0.01)
            )
    message = str(failed.value)
    assert "after 2 attempts" in message and "Connect" in message, "the cause is named"
    assert "s3cr3tsig" not in message
    assert not list(tmp_path.iterdir()), "no partial file left"
