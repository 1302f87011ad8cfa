"""ModelHub against a real local server speaking bitHuman's protocol, with injected faults."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import pytest

from livekit_plugins_avatarhub import (
    APIStatusError,
    AuthenticationError,
    AvatarNotFoundError,
    CacheError,
    CloudOnlyError,
    IntegrityError,
    ModelNotDownloadableError,
    ModelNotReadyError,
    NotCachedError,
    RateLimitedError,
    RetryPolicy,
    ServiceUnavailableError,
)
from livekit_plugins_avatarhub.exceptions import APIError, InvalidAvatarIdError
from livekit_plugins_avatarhub.hub.cache import ModelCache
from livekit_plugins_avatarhub.hub.download import check_download_url
from livekit_plugins_avatarhub.hub.resolver import ModelHub, prefetch, safe_filename

from bithuman_server import SECRET, FakeBithumanService

CODE = "A91XMB7113"
FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)


def make_hub(bithuman_api: FakeBithumanService, **kwargs) -> ModelHub:
    options = {"api_secret": SECRET, "api_base": bithuman_api.api_base, "retry": FAST}
    options.update(kwargs)
    return ModelHub(**options)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.name.endswith((".incomplete", ".tmp"))]


async def test_resolves_downloads_verifies_and_records(bithuman_api, clean_env):
    agent = bithuman_api.add_agent(CODE)
    hub = make_hub(bithuman_api)
    path = await hub.resolve(CODE)
    assert path == clean_env / "agents" / CODE / f"{CODE}.imx"
    assert path.read_bytes() == agent.files["essence-1"]
    record = json.loads((path.parent / ".avatarhub" / f"{path.name}.json").read_text())
    assert record["sha256"] == sha(path) and record["size"] == path.stat().st_size
    assert record["model"] == "essence-1"
    assert "X-Signature" not in record["source"], "signed query strings are credentials"
    assert (clean_env / "CACHEDIR.TAG").read_text().startswith("Signature: 8a477f597d28d172")
    assert not leftovers(clean_env)


async def test_fresh_cache_makes_no_request(bithuman_api):
    bithuman_api.add_agent(CODE)
    await make_hub(bithuman_api).resolve(CODE)
    before = len(bithuman_api.api_requests) + len(bithuman_api.storage_requests)
    hub = make_hub(bithuman_api)
    await hub.resolve(CODE)
    assert len(bithuman_api.api_requests) + len(bithuman_api.storage_requests) == before
    assert hub.requests == 0


async def test_secret_goes_to_the_api_host_only(bithuman_api, caplog):
    caplog.set_level(logging.DEBUG)
    bithuman_api.add_agent(CODE)
    await make_hub(bithuman_api).resolve(CODE)
    assert all(h.get("api-secret") == SECRET for _, _, h in bithuman_api.api_requests)
    assert bithuman_api.storage_requests
    assert not any(
        "api-secret" in h or SECRET in json.dumps(h) for _, _, h in bithuman_api.storage_requests
    )
    assert SECRET not in caplog.text


async def test_stale_cache_revalidates_without_body_transfer(bithuman_api):
    bithuman_api.add_agent(CODE)
    await make_hub(bithuman_api).resolve(CODE)
    downloads = bithuman_api.downloads()
    await make_hub(bithuman_api, fresh_for=0).resolve(CODE)
    assert bithuman_api.downloads() == downloads  # sha256 from the API matched the record


async def test_revalidation_without_sha_uses_size_and_etag(bithuman_api):
    bithuman_api.add_agent(CODE, send_sha256=False)
    bithuman_api.refuse_head = True  # storage signed for GET only: fall back to a 1-byte range
    await make_hub(bithuman_api).resolve(CODE)
    downloads = bithuman_api.downloads()
    await make_hub(bithuman_api, fresh_for=0).resolve(CODE)
    assert bithuman_api.downloads() == downloads
    assert bithuman_api.storage_requests[-1][2].get("range") == "bytes=0-0"


async def test_changed_model_is_downloaded_again(bithuman_api):
    agent = bithuman_api.add_agent(CODE)
    first = await make_hub(bithuman_api).resolve(CODE)
    agent.files["essence-1"] = agent.files["essence-1"][::-1]
    second = await make_hub(bithuman_api, fresh_for=0).resolve(CODE)
    assert second.read_bytes() == agent.files["essence-1"]
    assert first == second


async def test_truncated_body_resumes_with_range(bithuman_api, clean_env):
    agent = bithuman_api.add_agent(CODE, size=512 * 1024)
    bithuman_api.storage_faults = ["truncate"]
    path = await make_hub(bithuman_api).resolve(CODE)
    assert path.read_bytes() == agent.files["essence-1"]
    ranges = [h.get("range") for m, _, h in bithuman_api.storage_requests if m == "GET"]
    assert ranges[0] is None and ranges[1] == f"bytes={256 * 1024}-"
    assert not leftovers(clean_env)


async def test_chunked_bodies_are_read_whole_and_a_cut_one_resumes(bithuman_api, clean_env):
    """A storage or CDN answering with Transfer-Encoding: chunked (no Content-Length): the body
    is taken whole, and one that stops without its last chunk is resumed, not kept as done."""
    agent = bithuman_api.add_agent(CODE, size=512 * 1024)
    bithuman_api.storage_faults = ["chunked"]
    path = await make_hub(bithuman_api).resolve(CODE)
    assert path.read_bytes() == agent.files["essence-1"]
    ModelCache().remove(CODE)
    bithuman_api.storage_faults = ["chunked_truncate"]
    path = await make_hub(bithuman_api).resolve(CODE)
    assert path.read_bytes() == agent.files["essence-1"]
    ranges = [h.get("range") for m, _, h in bithuman_api.storage_requests if m == "GET"]
    assert ranges[-2:] == [None, f"bytes={256 * 1024}-"]
    assert not leftovers(clean_env)


@pytest.mark.parametrize("fault", ["ignore_range", "416"])
async def test_unresumable_servers_restart_cleanly(bithuman_api, fault):
    agent = bithuman_api.add_agent(CODE, size=256 * 1024)
    bithuman_api.storage_faults = ["truncate", fault]
    path = await make_hub(bithuman_api).resolve(CODE)
    assert path.read_bytes() == agent.files["essence-1"]


async def test_wrong_sha256_discards_the_file(bithuman_api, clean_env):
    bithuman_api.add_agent(CODE)
    bithuman_api.storage_faults = ["corrupt"]
    with pytest.raises(IntegrityError, match="sha256"):
        await make_hub(bithuman_api).resolve(CODE)
    assert ModelCache().find(CODE) is None
    assert not leftovers(clean_env)


@pytest.mark.parametrize("fault", ["500", "503", "slow"])
async def test_storage_hiccups_are_retried(bithuman_api, fault):
    agent = bithuman_api.add_agent(CODE)
    bithuman_api.slow_seconds = 0.3
    bithuman_api.storage_faults = [fault]
    path = await make_hub(bithuman_api).resolve(CODE)
    assert path.read_bytes() == agent.files["essence-1"]


async def test_429_honours_retry_after(bithuman_api):
    bithuman_api.add_agent(CODE)
    bithuman_api.api_faults = [(429, "RATE_LIMITED", {"Retry-After": "1"})]
    start = time.monotonic()
    await make_hub(bithuman_api).resolve(CODE)
    assert time.monotonic() - start >= 0.9
    assert len(bithuman_api.api_requests) == 2


async def test_5xx_is_retried_then_reported(bithuman_api):
    bithuman_api.add_agent(CODE)
    bithuman_api.api_faults = [(503, None, {})] * 4
    with pytest.raises(ServiceUnavailableError, match="try again later"):
        await make_hub(bithuman_api).resolve(CODE)
    assert len(bithuman_api.api_requests) == 4


async def test_4xx_is_never_retried(bithuman_api):
    bithuman_api.add_agent(CODE)
    bithuman_api.api_faults = [(400, "VALIDATION_ERROR", {})]
    with pytest.raises(APIStatusError, match="VALIDATION_ERROR"):
        await make_hub(bithuman_api).resolve(CODE)
    assert len(bithuman_api.api_requests) == 1


@pytest.mark.parametrize(
    ("setup", "error", "words"),
    [
        (
            {"download_error": (404, "MODEL_ARTIFACT_NOT_READY")},
            ModelNotReadyError,
            "still being built",
        ),
        (
            {"download_error": (409, "MODEL_NOT_GENERATED")},
            ModelNotDownloadableError,
            "livekit.plugins import bithuman",
        ),
        ({"download_error": (400, "MODEL_NOT_DOWNLOADABLE")}, ModelNotDownloadableError, "cloud"),
        ({"download_error": (402, "INSUFFICIENT_BALANCE")}, APIStatusError, "credits"),
        ({"download_error": (429, "RATE_LIMITED")}, RateLimitedError, "slow down"),
    ],
)
async def test_documented_errors_become_typed_and_actionable(bithuman_api, setup, error, words):
    bithuman_api.add_agent(CODE, **setup)
    with pytest.raises(error, match=words):
        await make_hub(bithuman_api).resolve(CODE)


async def test_unknown_avatar_and_bad_secret(bithuman_api):
    with pytest.raises(AvatarNotFoundError, match="check the avatar id"):
        await make_hub(bithuman_api).resolve("B000000000")
    bithuman_api.add_agent(CODE)
    with pytest.raises(AuthenticationError, match="BITHUMAN_API_SECRET") as info:
        await make_hub(bithuman_api, api_secret="wrong-secret-1234").resolve(CODE)
    assert "wrong-secret-1234" not in str(info.value)


async def test_malformed_id_is_refused_before_any_request(bithuman_api):
    with pytest.raises(InvalidAvatarIdError):
        await make_hub(bithuman_api).resolve("../etc/x")
    assert not bithuman_api.api_requests


async def test_expression_falls_back_to_a_downloadable_family(bithuman_api, caplog):
    agent = bithuman_api.add_agent(
        CODE,
        model="expression-1",
        supported_models=["expression-1", "expression-2"],
        files={"expression-2": b"IMX\x00fake-model" + b"x" * 1000},
    )
    caplog.set_level(logging.WARNING)
    path = await make_hub(bithuman_api).resolve(CODE, model="expression")
    assert path.read_bytes() == agent.files["expression-2"]
    assert "renders only in bitHuman's cloud" in caplog.text and "expression-2" in caplog.text
    # essence names map to the family the download API expects
    bithuman_api.add_agent("B000000001", model="essence-1")
    await make_hub(bithuman_api).resolve("B000000001", model="essence")
    assert "model=essence-1" in bithuman_api.api_requests[-1][1]


async def test_cloud_only_avatar_names_the_cloud_plugin(bithuman_api):
    bithuman_api.add_agent(
        CODE, model="expression-1", supported_models=["expression-1"], files={"x": b""}
    )
    with pytest.raises(CloudOnlyError, match="livekit-plugins-bithuman"):
        await make_hub(bithuman_api).resolve(CODE, model="expression")


async def test_offline_uses_cache_or_says_to_pull(bithuman_api, monkeypatch):
    bithuman_api.add_agent(CODE)
    monkeypatch.setenv("AVATARHUB_OFFLINE", "1")
    with pytest.raises(NotCachedError, match=f"pull {CODE}"):
        await make_hub(bithuman_api).resolve(CODE)
    assert not bithuman_api.api_requests
    path = await make_hub(bithuman_api, offline=False).resolve(CODE)
    requests = len(bithuman_api.api_requests)
    assert await make_hub(bithuman_api, fresh_for=0).resolve(CODE) == path
    assert len(bithuman_api.api_requests) == requests


async def test_unreachable_service_falls_back_to_cache(bithuman_api, caplog):
    bithuman_api.add_agent(CODE)
    path = await make_hub(bithuman_api).resolve(CODE)
    caplog.set_level(logging.WARNING)
    dead = make_hub(bithuman_api, fresh_for=0, api_base="http://127.0.0.1:9")
    assert await dead.resolve(CODE) == path
    assert "unreachable" in caplog.text


async def test_model_pulled_by_the_sdk_is_used(clean_env, bithuman_api):
    folder = clean_env / "agents" / CODE
    folder.mkdir(parents=True)
    (folder / f"{CODE}.imx").write_bytes(b"IMX\x00fake-model from the sdk")
    path = await make_hub(bithuman_api).resolve(CODE)
    assert path.read_bytes().endswith(b"from the sdk")
    assert not bithuman_api.api_requests


async def test_disk_full_is_reported_and_leaves_nothing(bithuman_api, clean_env, monkeypatch):
    from livekit_plugins_avatarhub.hub import download

    bithuman_api.add_agent(CODE)

    def full(self, data):  # the writing thread meets a full disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download._Writer, "_write", full)
    with pytest.raises(CacheError, match="disk is full.*BITHUMAN_CACHE_DIR") as info:
        await make_hub(bithuman_api).resolve(CODE)
    assert str(clean_env) in str(info.value)
    assert not leftovers(clean_env) and ModelCache().find(CODE) is None


async def test_unwritable_cache_names_the_variable(bithuman_api, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache should be")
    monkeypatch.setenv("BITHUMAN_CACHE_DIR", str(blocker))
    bithuman_api.add_agent(CODE)
    with pytest.raises(CacheError, match="BITHUMAN_CACHE_DIR"):
        await make_hub(bithuman_api).resolve(CODE)


async def test_lru_eviction_keeps_the_new_and_the_held(bithuman_api, clean_env, monkeypatch):
    from livekit_plugins_avatarhub.hub.cache import hold

    codes = ["A000000001", "A000000002", "A000000003"]
    for code in codes:
        bithuman_api.add_agent(code, size=100 * 1024)
    hub = make_hub(bithuman_api)
    first = await hub.resolve(codes[0])
    second = await hub.resolve(codes[1])
    monkeypatch.setenv("BITHUMAN_AVATAR_CACHE_GB", str(150 * 1024 / (1 << 30)))
    with hold(first):  # a running session holds the oldest model: it must survive
        third = await hub.resolve(codes[2])
    assert first.exists() and third.exists() and not second.exists()


def test_safe_filenames():
    assert safe_filename("../../etc/passwd", CODE, None) == "passwd.imx"
    assert safe_filename("..\\..\\x.imx", CODE, None) == "x.imx"
    assert safe_filename(".hidden.imx", CODE, None) == "hidden.imx"
    assert safe_filename("a b;rm -rf.avatar", CODE, None) == "a_b_rm_-rf.avatar"
    assert safe_filename(None, CODE, "essence-2") == f"{CODE}.lebundle.imx"
    assert safe_filename("", CODE, None) == f"{CODE}.imx"


@pytest.mark.parametrize(
    "url", ["http://example.com/m.imx", "ftp://127.0.0.1/m.imx", "file:///etc/passwd"]
)
def test_download_urls_must_be_https(url):
    with pytest.raises(APIError, match="only https"):
        check_download_url(url)


def test_loopback_http_is_allowed():
    for url in (
        "http://127.0.0.1:8000/x",
        "http://localhost/x",
        "http://[::1]:9/x",
        "https://s3.example/x",
    ):
        check_download_url(url)


def test_prefetch_for_prewarm(bithuman_api):
    bithuman_api.add_agent(CODE)
    (path,) = prefetch(CODE, api_secret=SECRET, api_base=bithuman_api.api_base, retry=FAST)
    assert path.exists() and os.path.getsize(path) == 64 * 1024


async def test_lock_held_too_long_is_a_clear_timeout(bithuman_api, clean_env):
    from filelock import FileLock

    from livekit_plugins_avatarhub import LockTimeoutError

    bithuman_api.add_agent(CODE)
    hub = make_hub(bithuman_api, lock_timeout=0.3)
    hub.cache.ensure_dirs(CODE)
    holder = FileLock(str(hub.cache.lock_path(CODE)), thread_local=False)
    holder.acquire()  # another process downloading, from the hub's point of view
    try:
        with pytest.raises(LockTimeoutError, match="another process downloading avatar"):
            await hub.resolve(CODE)
    finally:
        holder.release()
    assert not bithuman_api.storage_requests
    assert (await make_hub(bithuman_api).resolve(CODE)).exists()  # free again: resolves
