"""Switching to bitHuman's cloud plugin must stay an import change."""

from __future__ import annotations

import inspect

import pytest

official = pytest.importorskip("livekit.plugins.bithuman")

from livekit_plugins_avatarhub import AvatarSession  # noqa: E402


def _params(fn):
    return inspect.signature(fn).parameters


OFFICIAL_VERSION = tuple(int(p) for p in official.__version__.split(".")[:3])


@pytest.mark.parametrize("method", ["__init__", "start"])
def test_every_official_parameter_is_accepted_the_same_way(method):
    ours = _params(getattr(AvatarSession, method))
    theirs = _params(getattr(official.AvatarSession, method))
    missing = [name for name in theirs if name not in ours]
    assert not missing, f"{method} lacks {missing}"
    for name, param in theirs.items():
        mine = ours[name]
        assert mine.kind == param.kind, name
        if param.default is not inspect.Parameter.empty:
            assert mine.default is not inspect.Parameter.empty, f"{name} must stay optional"
            # defaults follow 1.8.10; before it, the plugin's `model` defaulted to "essence"
            if OFFICIAL_VERSION >= (1, 8, 10) or name != "model":
                assert mine.default == param.default or repr(mine.default) == repr(param.default), (
                    name
                )
    # anything we add is keyword-only and optional, so calls written for theirs still bind
    for name, param in ours.items():
        if name not in theirs:
            assert param.kind == inspect.Parameter.KEYWORD_ONLY, name
            assert param.default is not inspect.Parameter.empty, name


def test_public_surface_of_the_official_plugin_exists_here():
    for attr in ("runtime", "avatar_identity", "start", "aclose"):
        assert hasattr(AvatarSession, attr), attr
