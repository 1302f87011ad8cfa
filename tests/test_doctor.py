"""``doctor`` as an operator runs it: one line per check, the failing ones with what to do."""

from __future__ import annotations

import asyncio
import json
import socket

from livekit_plugins_avatarhub.cli import main
from livekit_plugins_avatarhub.hub.resolver import ModelHub

from bithuman_server import SECRET

CODE = "A91XMB7113"


def lines(out: str) -> dict[str, list[str]]:
    """check name → the verdicts it printed."""
    found: dict[str, list[str]] = {}
    for line in out.splitlines():
        verdict, check, *_ = line.split()
        found.setdefault(check, []).append(verdict)
    return found


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_everything_fine_passes_and_the_secret_is_never_printed(bithuman_env, capsys):
    assert main(["doctor", "--no-browser"]) == 0
    out = capsys.readouterr().out
    verdicts = lines(out)
    for check in ("python", "livekit-agents", "livekit", "bithuman", "account", "cache", "demo"):
        assert verdicts.get(check) == ["ok"], (check, out)
    assert SECRET not in out


def test_a_refused_secret_fails_and_says_what_to_check(bithuman_env, monkeypatch, capsys):
    monkeypatch.setenv("BITHUMAN_API_SECRET", "sk-wrong-0000000000")
    assert main(["doctor", "--no-browser"]) == 1
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.split()[1] == "account")
    assert line.startswith("fail") and "refused" in line and "BITHUMAN_API_SECRET" in line
    assert "sk-wrong" not in out


def test_no_secret_is_a_warning_not_a_failure(capsys):
    assert main(["doctor", "--no-browser", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    account = next(c for c in report["checks"] if c["check"] == "account")
    assert report["ok"] is True and account["verdict"] == "warn"
    assert "BITHUMAN_API_SECRET" in account["fix"]


def test_a_truncated_cached_model_is_named_with_the_commands_that_fix_it(bithuman_env, capsys):
    bithuman_env.add_agent(CODE)
    path = asyncio.run(ModelHub().resolve(CODE))
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)
    assert main(["doctor", "--no-browser"]) == 1
    out = capsys.readouterr().out
    damaged = [x for x in out.splitlines() if x.startswith("fail") and "cache" in x]
    assert len(damaged) == 1 and CODE in damaged[0]
    assert f"avatarhub rm {CODE} && avatarhub pull {CODE}" in damaged[0]


def test_an_unreachable_livekit_fails_naming_the_url(monkeypatch, capsys):
    url = f"ws://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("LIVEKIT_URL", url)
    monkeypatch.setenv("LIVEKIT_API_KEY", "key")
    monkeypatch.setenv("LIVEKIT_API_SECRET", "a-livekit-secret-that-stays-private")
    assert main(["doctor", "--no-browser", "--json"]) == 1
    out = capsys.readouterr().out
    livekit = next(c for c in json.loads(out)["checks"] if c["check"] == "server")
    assert livekit["verdict"] == "fail" and url in livekit["detail"]
    assert "unreachable" in livekit["detail"] and "LIVEKIT_URL" in livekit["detail"]
    assert "stays-private" not in out
