"""What AvatarSession accepts and refuses before anything reaches a room."""

from __future__ import annotations

import logging

import pytest

from livekit_plugins_avatarhub import (
    AvatarHubError,
    AvatarSession,
    CloudOnlyError,
    ConfigurationError,
    InvalidAvatarIdError,
    MissingSecretError,
    ModelFileError,
    NotCachedError,
    RuntimeLoadError,
)

from conftest import SECRET
from fakes import LEGACY_BITHUMAN, FakeRoom, write_fake_model


def test_needs_an_avatar():
    with pytest.raises(ConfigurationError, match="avatar_id=.*model_path="):
        AvatarSession(api_secret=SECRET)


async def test_avatar_id_wins_over_model_path_with_one_warning(
    model_file, fake_bithuman, clean_env, caplog
):
    """bitHuman's cloud quickstart passes both; like the official plugin, the id is rendered."""
    agent_dir = clean_env / "agents" / "A91XMB7113"
    agent_dir.mkdir(parents=True)
    cached = write_fake_model(agent_dir / "A91XMB7113.imx", seed=b"the agent")
    from livekit.agents import AgentSession

    from livekit_plugins_avatarhub import CachedModelResolver

    caplog.set_level(logging.WARNING)
    session = AvatarSession(
        avatar_id="A91XMB7113",
        model_path=model_file,
        api_secret=SECRET,
        resolver=CachedModelResolver(),
    )
    warnings = [r for r in caplog.records if "model_path" in r.getMessage()]
    assert len(warnings) == 1 and model_file in warnings[0].getMessage()
    await session.start(AgentSession(), room=FakeRoom())
    try:
        assert session.runtime.model_path == cached
    finally:
        await session.aclose()


def test_both_avatar_environment_variables_stay_an_error(monkeypatch, model_file):
    monkeypatch.setenv("BITHUMAN_AVATAR_ID", "A91XMB7113")
    monkeypatch.setenv("BITHUMAN_MODEL_PATH", model_file)
    with pytest.raises(ConfigurationError, match="both BITHUMAN_AVATAR_ID and BITHUMAN_MODEL_PATH"):
        AvatarSession(api_secret=SECRET)


@pytest.mark.parametrize(
    "bad", ["a91xmb7113", "A91XMB711", "A91XMB71134", "191XMB7113", "A91-MB7113", "../../etc"]
)
def test_refuses_malformed_avatar_ids(bad):
    with pytest.raises(InvalidAvatarIdError, match="not a bitHuman agent code"):
        AvatarSession(avatar_id=bad, api_secret=SECRET)


def test_missing_secret_names_the_variable(model_file):
    with pytest.raises(MissingSecretError, match="BITHUMAN_API_SECRET"):
        AvatarSession(model_path=model_file)


@pytest.mark.skipif(
    LEGACY_BITHUMAN, reason="bithuman 0.8.1 accepts a runtime token without a secret"
)
def test_token_alone_is_refused_with_bithuman_2(model_file):
    with pytest.raises(MissingSecretError, match="api_token alone"):
        AvatarSession(model_path=model_file, api_token="tok-123456")


@pytest.mark.skipif(not LEGACY_BITHUMAN, reason="bithuman 2.x refuses a token without a secret")
async def test_token_alone_is_enough_with_bithuman_0_8(model_file, fake_bithuman):
    session = AvatarSession(model_path=model_file, api_token="tok-123456")
    room = FakeRoom()
    from livekit.agents import AgentSession

    await session.start(AgentSession(), room=room)
    try:
        assert session.runtime.create_kwargs["token"] == "tok-123456"
    finally:
        await session.aclose()


def test_avatar_image_is_cloud_only():
    with pytest.raises(CloudOnlyError, match="livekit-plugins-bithuman"):
        AvatarSession(avatar_image="https://example.com/face.jpg", api_secret=SECRET)


def test_unknown_model_name_is_refused_at_construction():
    with pytest.raises(ConfigurationError, match="unknown model"):
        AvatarSession(avatar_id="A91XMB7113", api_secret=SECRET, model="essense")


def test_demo_needs_no_secret():
    AvatarSession(avatar_id="demo")


def test_errors_share_one_root_and_builtins():
    assert issubclass(ModelFileError, FileNotFoundError)
    assert issubclass(ConfigurationError, ValueError)
    for err in (
        CloudOnlyError,
        MissingSecretError,
        ModelFileError,
        NotCachedError,
        RuntimeLoadError,
    ):
        assert issubclass(err, AvatarHubError)


def test_environment_fills_in_and_arguments_win(monkeypatch, tmp_path, model_file):
    env_model = write_fake_model(tmp_path / "env.imx", seed=b"env")
    monkeypatch.setenv("BITHUMAN_API_SECRET", "env-secret-value")
    monkeypatch.setenv("BITHUMAN_MODEL_PATH", env_model)
    assert str(AvatarSession()._source.model_path) == env_model
    assert str(AvatarSession(model_path=model_file)._source.model_path) == model_file
    assert AvatarSession(api_secret=SECRET)._source.api_secret == SECRET
    # an explicit avatar_id wins over BITHUMAN_MODEL_PATH instead of clashing with it
    source = AvatarSession(avatar_id="A91XMB7113")._source
    assert source.avatar_id == "A91XMB7113" and source.model_path is None
    monkeypatch.setenv("BITHUMAN_AVATAR_ID", "B12345678Z")
    with pytest.raises(ConfigurationError, match="both BITHUMAN_AVATAR_ID and BITHUMAN_MODEL_PATH"):
        AvatarSession()
    monkeypatch.delenv("BITHUMAN_MODEL_PATH")
    assert AvatarSession()._source.avatar_id == "B12345678Z"


def test_secret_never_in_repr(model_file):
    session = AvatarSession(model_path=model_file, api_secret=SECRET, api_token="tok-abcdef")
    assert SECRET not in repr(session) and "tok-abcdef" not in repr(session)
    assert "api_secret=<set>" in repr(session)


async def start(session):
    room = FakeRoom()
    from livekit.agents import AgentSession

    try:
        await session.start(AgentSession(), room=room)
    finally:
        assert room.local_participant.track_publications == {}, "published before failing"
        await session.aclose()


async def test_missing_model_file_fails_at_start_naming_it(tmp_path, fake_bithuman):
    missing = tmp_path / "nope.imx"
    with pytest.raises(ModelFileError, match="nope.imx"):
        await start(AvatarSession(model_path=str(missing), api_secret=SECRET))


async def test_directory_as_model_file(tmp_path, fake_bithuman):
    with pytest.raises(ModelFileError, match="not a file"):
        await start(AvatarSession(model_path=str(tmp_path), api_secret=SECRET))


async def test_corrupt_model_is_a_runtime_load_error(tmp_path, fake_bithuman):
    bad = tmp_path / "bad.imx"
    bad.write_bytes(b"not a model")
    with pytest.raises(RuntimeLoadError, match="refused bad.imx|could not start with bad.imx"):
        await start(AvatarSession(model_path=str(bad), api_secret=SECRET))


async def test_offline_auth_failure_is_clear_and_hides_the_secret(
    model_file, fake_bithuman, caplog
):
    fake_bithuman.auth_reachable = False
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RuntimeLoadError, match="network access") as info:
        await start(AvatarSession(model_path=model_file, api_secret=SECRET))
    assert SECRET not in str(info.value)
    assert SECRET not in caplog.text


async def test_uncached_avatar_id_without_network_is_clear(fake_bithuman):
    from livekit_plugins_avatarhub import CachedModelResolver

    session = AvatarSession(
        avatar_id="A91XMB7113", api_secret=SECRET, resolver=CachedModelResolver()
    )
    with pytest.raises(NotCachedError, match="pull A91XMB7113"):
        await start(session)


async def test_avatar_id_found_in_the_sdk_cache_layout(clean_env, fake_bithuman):
    from livekit_plugins_avatarhub import CachedModelResolver

    agent_dir = clean_env / "agents" / "A91XMB7113"
    agent_dir.mkdir(parents=True)
    path = write_fake_model(agent_dir / "A91XMB7113.imx", seed=b"cached")
    session = AvatarSession(
        avatar_id="A91XMB7113", api_secret=SECRET, resolver=CachedModelResolver()
    )
    room = FakeRoom()
    from livekit.agents import AgentSession

    await session.start(AgentSession(), room=room)
    try:
        assert session.runtime.model_path == path
        assert session.runtime.create_kwargs["api_secret"] == SECRET
    finally:
        await session.aclose()


def test_runtime_property_before_start():
    with pytest.raises(AvatarHubError, match="start"):
        AvatarSession(avatar_id="demo").runtime
