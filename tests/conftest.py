from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from bithuman_server import FakeBithumanService
from fakes import FakeBithuman, write_fake_model
from livekit_real import REQUIRED, LiveKitServer, find_tool, running_redis, running_server

_ENV = [
    "BITHUMAN_API_SECRET",
    "BITHUMAN_API_KEY",
    "BITHUMAN_API_TOKEN",
    "BITHUMAN_MODEL_PATH",
    "BITHUMAN_AVATAR_ID",
    "BITHUMAN_API_URL",
    "BITHUMAN_API_BASE",
    "BITHUMAN_AVATAR_CACHE_GB",
    "AVATARHUB_OFFLINE",
    "LIVEKIT_URL",
    "LIVEKIT_API_KEY",
    "LIVEKIT_API_SECRET",
]

SECRET = "sk-test-0123456789abcdef"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No test sees the developer's bitHuman settings or cache."""
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("BITHUMAN_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def fake_bithuman(monkeypatch: pytest.MonkeyPatch) -> type[FakeBithuman]:
    """Route runtime creation to the faithful double of AsyncBithuman."""
    from livekit_plugins_avatarhub import _compat

    FakeBithuman.created = []
    FakeBithuman.auth_reachable = True
    monkeypatch.setattr(_compat, "bithuman_runtime_class", lambda: FakeBithuman)
    return FakeBithuman


@pytest.fixture
def model_file(tmp_path: Path) -> str:
    return write_fake_model(tmp_path / "avatar.imx", seed=b"model-a")


@pytest.fixture
def bithuman_api() -> Iterator[FakeBithumanService]:
    """bitHuman's REST API and its model storage, two real servers on 127.0.0.1."""
    with FakeBithumanService() as api:
        yield api


@pytest.fixture
def bithuman_env(
    bithuman_api: FakeBithumanService, monkeypatch: pytest.MonkeyPatch
) -> FakeBithumanService:
    """The same servers, configured through the environment as a user would."""
    monkeypatch.setenv("BITHUMAN_API_BASE", bithuman_api.api_base)
    monkeypatch.setenv("BITHUMAN_API_SECRET", SECRET)
    return bithuman_api


@pytest.fixture
async def avatar_service():  # type: ignore[no-untyped-def]
    """The self-hosted avatar service (HTTP on 127.0.0.1) with demo workers in loopback rooms:
    yields (client with the key, the workers' Harness, the WorkerManager)."""
    pytest.importorskip("aiohttp")
    from livekit_plugins_avatarhub.service.manager import WorkerManager

    from service_harness import Harness, serve

    harness = Harness()
    manager = WorkerManager(harness.worker, max_workers=2)
    async with serve(manager) as client:
        yield client, harness, manager


# -- a real LiveKit server ------------------------------------------------------------------


#: the model hub against bitHuman's REST API: our code, httpx and urllib3 only
_HUB_MODULES = ("test_hub.py", "test_hub_processes.py")
_HUB_FIXTURES = {"bithuman_api", "bithuman_env", "company_ca"}


def _is_hub_test(item: pytest.Item) -> bool:
    name = item.path.name
    if name in _HUB_MODULES:
        return True
    return name == "test_hardening.py" and bool(
        _HUB_FIXTURES & set(getattr(item, "fixturenames", ()))
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that need no other version of livekit-agents or bithuman run in some envs only:
    AVATARHUB_REAL_LIVEKIT=off leaves out the real-room tests, AVATARHUB_REAL_ONCE=off those
    of them that no livekit-agents version changes, AVATARHUB_HUB_TESTS=off the model hub's
    (tox.ini says which envs run them). The soak runs only with AVATARHUB_SOAK=on."""
    import os

    for item in items:
        if _is_hub_test(item):
            item.add_marker(pytest.mark.hub)
    left_out = []
    if os.environ.get("AVATARHUB_REAL_LIVEKIT") == "off":
        left_out.append("livekit_real")
    if os.environ.get("AVATARHUB_REAL_ONCE") == "off":
        left_out.append("real_once")
    if os.environ.get("AVATARHUB_HUB_TESTS") == "off":
        left_out.append("hub")
    if os.environ.get("AVATARHUB_SOAK") != "on":
        left_out.append("soak")
    if not left_out:
        return
    kept = [item for item in items if not any(m in item.keywords for m in left_out)]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept


@pytest.fixture(scope="session")
def real_livekit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveKitServer]:
    """LiveKit's own server on free loopback ports, for the whole session.

    Missing: the test fails when AVATARHUB_REAL_LIVEKIT=required (CI), else it is skipped
    with what to run."""
    binary = find_tool("livekit-server")
    if binary is None:
        message = "livekit-server is not installed: run `bash scripts/install-livekit`"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    with running_server(binary, tmp_path_factory.mktemp("livekit")) as server:
        yield server


@pytest.fixture(scope="module")
def livekit_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LiveKitServer, LiveKitServer]]:
    """Two LiveKit nodes sharing one Redis (LiveKit's multi-node mode), on loopback."""
    binary, redis = find_tool("livekit-server"), find_tool("redis-server")
    if binary is None or redis is None:
        message = "livekit-server or redis-server is missing: run `bash scripts/install-tools`"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    workdir = tmp_path_factory.mktemp("cluster")
    with (
        running_redis(redis, workdir) as address,
        running_server(binary, workdir, redis=address) as a,
        running_server(binary, workdir, redis=address) as b,
    ):
        yield a, b


@pytest.fixture
def livekit_env(real_livekit: LiveKitServer, monkeypatch: pytest.MonkeyPatch) -> LiveKitServer:
    """The real server in LIVEKIT_URL / LIVEKIT_API_KEY / LIVEKIT_API_SECRET, as agents see it."""
    for name, value in real_livekit.env().items():
        monkeypatch.setenv(name, value)
    return real_livekit
