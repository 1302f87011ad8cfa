"""The package as users install and import it."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PUBLIC = {
    "DEMO_AVATAR_ID",
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "AuthenticationError",
    "AvatarHubError",
    "AvatarNotFoundError",
    "AvatarResolver",
    "AvatarState",
    "AvatarStateChanged",
    "AvatarRuntime",
    "AvatarSession",
    "CacheError",
    "CachedModelResolver",
    "CloudOnlyError",
    "ConfigurationError",
    "DemoRuntime",
    "IntegrityError",
    "InvalidAvatarIdError",
    "LockTimeoutError",
    "MissingSecretError",
    "ModelFileError",
    "ModelNotDownloadableError",
    "ModelNotReadyError",
    "NotCachedError",
    "RateLimitedError",
    "RuntimeLoadError",
    "ServiceUnavailableError",
    "VideoControl",
    "VideoPublishOptions",
    "__version__",
    "BithumanAPI",
    "ModelHub",
    "RetryPolicy",
    "prefetch",
    "GestureTrigger",
    "create_runtime",
    "open_avatar",
    "OpenedAvatar",
    "AgentGenerationFailedError",
    "AgentNotReadyError",
    "InsufficientBalanceError",
    "BitHumanException",
    "APITimeoutError",
    "CapacityError",
}


def run_python(code: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
        cwd=env.pop("CWD", None) or str(ROOT.parent),
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_public_names_are_pinned():
    import livekit_plugins_avatarhub as hub

    assert set(hub.__all__) == PUBLIC
    for name in hub.__all__:
        assert getattr(hub, name) is not None


def test_every_exception_is_importable_from_the_package():
    import livekit_plugins_avatarhub as hub
    from livekit.plugins import avatarhub
    from livekit_plugins_avatarhub import exceptions

    defined = {
        name
        for name, value in vars(exceptions).items()
        if isinstance(value, type) and issubclass(value, BaseException) and not name.startswith("_")
    }
    assert set(exceptions.__all__) == defined
    assert "InsufficientBalanceError" in defined and "BitHumanException" in defined
    for name in defined:
        assert name in hub.__all__
        assert getattr(hub, name) is getattr(exceptions, name) is getattr(avatarhub, name)


def test_errors_are_caught_by_the_handlers_existing_code_writes():
    """``except bithuman.BitHumanException`` after the import swap, and LiveKit's own classes."""
    import livekit.agents as agents

    from livekit.plugins import avatarhub as bithuman

    status = bithuman.ModelNotReadyError("not yet", status_code=404)
    connection = bithuman.APIConnectionError("bitHuman unreachable")
    for error in (status, connection, bithuman.ConfigurationError("bad")):
        with pytest.raises(bithuman.BitHumanException):
            raise error
    with pytest.raises(agents.APIStatusError) as info:
        raise status
    assert info.value.status_code == 404 and info.value.retryable is False
    assert str(info.value) == "not yet"  # our message, not LiveKit's field dump
    with pytest.raises(agents.APIConnectionError):
        raise connection
    with pytest.raises(ConnectionError):  # and still the builtin
        raise connection
    assert bithuman.ServiceUnavailableError("x", status_code=503).retryable
    assert isinstance(bithuman.ModelNotDownloadableError("x", status_code=400), ValueError)


def test_both_import_paths_give_the_same_objects():
    import livekit_plugins_avatarhub as hub
    from livekit.plugins import avatarhub

    assert avatarhub.AvatarSession is hub.AvatarSession
    assert avatarhub.VideoControl is hub.VideoControl
    assert avatarhub.__version__ == hub.__version__


def test_video_control_is_bithumans_own():
    import bithuman

    from livekit_plugins_avatarhub import VideoControl

    assert VideoControl is bithuman.VideoControl
    assert VideoControl(action="wave").action == "wave"


def test_import_does_not_load_bithuman_and_registers_the_plugin_once():
    out = run_python(
        "import sys, livekit_plugins_avatarhub\n"
        "from livekit.plugins import avatarhub\n"
        "from livekit.agents import Plugin\n"
        "print('bithuman' in sys.modules, 'cv2' in sys.modules)\n"
        "print(sum(p.title == 'livekit_plugins_avatarhub' for p in Plugin.registered_plugins))\n"
    )
    assert out.split() == ["False", "False", "1"]


def test_errors_root_and_version():
    import livekit_plugins_avatarhub as hub
    from livekit_plugins_avatarhub.version import __version__

    assert hub.__version__ == __version__
    errors = [
        getattr(hub, n)
        for n in hub.__all__
        if inspect.isclass(getattr(hub, n)) and issubclass(getattr(hub, n), Exception)
    ]
    assert errors and all(issubclass(e, hub.AvatarHubError) for e in errors)


@pytest.mark.slow
def test_wheel_installs_both_import_paths_and_ships_py_typed(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if build.returncode != 0 and "No module named hatchling" in build.stderr:
        pytest.skip("hatchling is not installed in this environment")
    assert build.returncode == 0, build.stderr
    wheel = next(tmp_path.glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "livekit_plugins_avatarhub/py.typed" in names
    assert "livekit/plugins/avatarhub/__init__.py" in names
    # namespace packages must stay namespaces, or the wheel would shadow livekit itself
    assert "livekit/__init__.py" not in names and "livekit/plugins/__init__.py" not in names
    assert not any(n.startswith("tests/") for n in names)
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    out = run_python(
        "import livekit_plugins_avatarhub as a\n"
        "from livekit.plugins import avatarhub as b\n"
        "print(a.__file__); print(b.__file__); print(a.AvatarSession is b.AvatarSession)",
        PYTHONPATH=str(unpacked),
        CWD=str(tmp_path),
    ).split()
    assert out[0].startswith(str(unpacked)) and out[1].startswith(str(unpacked))
    assert out[2] == "True"
