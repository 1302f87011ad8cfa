"""One loader for every caller: create_runtime, the render command and the service's workers
turn "demo" / an agent code / a path into a runtime the same way, and hold the model's lease."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from livekit_plugins_avatarhub import CachedModelResolver, create_runtime
from livekit_plugins_avatarhub.exceptions import ConfigurationError, ModelFileError
from livekit_plugins_avatarhub.hub.cache import ModelCache
from livekit_plugins_avatarhub.rendering.demo import DemoRuntime
from livekit_plugins_avatarhub.rendering.loader import open_avatar, split_source

from bithuman_server import SECRET
from fakes import FakeRoom, write_fake_model

CODE = "A91XMB7113"


def evict_everything() -> list[Path]:
    return [e.path for e in ModelCache().evict(0)]


def test_one_word_names_an_id_or_a_file():
    assert split_source("demo") == ("demo", None)
    assert split_source(CODE) == (CODE, None)
    assert split_source("models/A91XMB7113.imx") == (None, "models/A91XMB7113.imx")
    # a trailing newline is not an agent code (an id check with "$" would accept it)
    assert split_source(CODE + "\n") == (None, CODE + "\n")


async def test_create_runtime_with_an_agent_code_downloads_and_leases_the_model(
    bithuman_env, fake_bithuman
):
    agent = bithuman_env.add_agent(CODE)
    runtime = await create_runtime(CODE)
    path = Path(runtime.model_path)
    assert path.parent == ModelCache().agent_dir(CODE)
    assert path.read_bytes() == agent.files["essence-1"]
    assert runtime.create_kwargs["api_secret"] == SECRET
    # the model is in use: eviction in any process skips it...
    assert evict_everything() == [] and path.exists()
    # ...until the runtime is cleaned up, at once (not whenever it is garbage collected)
    runtime.cleanup()
    assert runtime.cleaned_up == 1
    evicted = evict_everything()
    assert evicted == [path] and not path.exists()


async def test_create_runtime_with_a_path(tmp_path, fake_bithuman, monkeypatch):
    monkeypatch.setenv("BITHUMAN_API_SECRET", SECRET)
    model = write_fake_model(tmp_path / "mine.imx", seed=b"mine")
    for runtime in (await create_runtime(model), await create_runtime(model_path=model)):
        assert runtime.model_path == model
        runtime.cleanup()
    with pytest.raises(ModelFileError, match="missing.imx"):
        await create_runtime(str(tmp_path / "missing.imx"))
    with pytest.raises(ConfigurationError):
        await create_runtime()


async def test_create_runtime_demo_needs_no_account():
    runtime = await create_runtime("demo", output_size=(160, 120))
    try:
        assert isinstance(runtime, DemoRuntime)
        assert runtime.get_first_frame().shape == (120, 160, 3)
    finally:
        runtime.cleanup()


async def test_cache_only_resolver_marks_models_as_used(clean_env, fake_bithuman):
    """LRU keeps what sessions use: a model resolved from the cache is the last evicted."""
    cache = ModelCache()
    paths = {}
    for code in (CODE, "B000000002"):
        cache.agent_dir(code).mkdir(parents=True)
        paths[code] = write_fake_model(cache.agent_dir(code) / f"{code}.imx", seed=code.encode())
    old, newer = paths[CODE], paths["B000000002"]
    os.utime(old, (1, 1))  # CODE was fetched long ago...
    opened = await open_avatar(CODE, api_secret=SECRET, resolver=CachedModelResolver())
    await opened.aclose()  # ...but has just been used, so the other model goes first
    assert [e.path.name for e in sorted(cache.entries(), key=lambda e: e.last_used)] == [
        Path(newer).name,
        Path(old).name,
    ]


async def test_service_default_manager_loads_like_a_session(bithuman_env, fake_bithuman, caplog):
    """The service's own workers: hub download, cloud-only fallback, the lease while rendering."""
    from livekit_plugins_avatarhub.service.app import default_manager

    bithuman_env.add_agent(
        CODE,
        model="expression-2",
        supported_models=["expression-1", "expression-2"],
    )
    rooms: list[FakeRoom] = []

    def room() -> FakeRoom:
        rooms.append(FakeRoom("room-a"))
        return rooms[-1]

    caplog.set_level(logging.WARNING)
    manager = default_manager(api_secret=SECRET, max_workers=1, room_factory=room)
    info, created = await manager.join(
        agent_id=CODE,
        room="room-a",
        participant_id="avatar-1",
        room_url="wss://lk.example.com",
        token="token",
        model="expression",  # cloud-only: rendered locally as a model the agent supports
    )
    try:
        assert created and info.status == "connected"
        assert rooms[0].connected_with == ("wss://lk.example.com", "token")
        runtime = fake_bithuman.created[0]
        assert (
            Path(runtime.model_path).read_bytes() == bithuman_env.agents[CODE].files["expression-2"]
        )
        assert "renders only in bitHuman's cloud" in caplog.text
        assert evict_everything() == []  # rendering: the model is leased
    finally:
        await manager.leave(CODE, "room-a")
    assert runtime.cleaned_up >= 1
    assert [p.name for p in evict_everything()] == [Path(runtime.model_path).name]


async def test_demo_worker_from_the_default_manager(monkeypatch):
    from livekit_plugins_avatarhub.service.app import default_manager

    manager = default_manager(api_secret=None, max_workers=1, room_factory=FakeRoom)
    info, _ = await manager.join(
        agent_id="demo", room="r", participant_id="p", room_url="wss://x", token="t"
    )
    try:
        assert info.status == "connected"
    finally:
        await manager.aclose()
