"""The command line as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from livekit_plugins_avatarhub.cli import main

CODE = "A91XMB7113"


def test_pull_ls_rm_prune(bithuman_env, capsys, clean_env):
    bithuman_env.add_agent(CODE, size=300 * 1024)
    bithuman_env.add_agent("B000000002", size=200 * 1024)
    assert main(["pull", CODE, "B000000002"]) == 0
    out = capsys.readouterr().out
    assert f"{CODE}\t{clean_env / 'agents' / CODE / (CODE + '.imx')}" in out

    assert main(["ls"]) == 0
    listing = capsys.readouterr().out
    assert CODE in listing and "essence-1" in listing and "300.0 KB" in listing
    assert "2 models, 500.0 KB" in listing

    assert main(["prune", "--max-gb", str(250 * 1024 / (1 << 30))]) == 0
    pruned = capsys.readouterr().out
    assert f"{CODE}: removed" in pruned  # pulled first, so least recently used

    assert main(["rm", "B000000002"]) == 0
    assert "removed 200.0 KB" in capsys.readouterr().out
    assert main(["rm", "B000000002"]) == 1
    assert "not cached" in capsys.readouterr().err


def test_errors_are_one_line_without_traceback(bithuman_env, capsys, monkeypatch):
    monkeypatch.setenv("BITHUMAN_API_SECRET", "wrong-secret-value")
    assert main(["pull", CODE]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "wrong-secret-value" not in err
    assert main(["pull", "not-an-id"]) == 1
    assert "not a bitHuman agent code" in capsys.readouterr().err


def test_pull_shows_a_progress_bar_on_a_terminal(bithuman_env, clean_env):
    bithuman_env.add_agent(CODE, size=3 << 20)
    # tqdm draws only on a terminal; give it one with a pseudo-terminal
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    drawn = b""

    def read_all() -> None:
        nonlocal drawn
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:
                return
            if not data:
                return
            drawn += data

    reader = threading.Thread(target=read_all)
    reader.start()
    proc = subprocess.run(
        [sys.executable, "-m", "livekit_plugins_avatarhub", "pull", CODE],
        stdout=subprocess.PIPE,
        stderr=follower,
        env=os.environ.copy(),
        timeout=120,
    )
    os.close(follower)
    reader.join(10)
    os.close(leader)
    assert proc.returncode == 0
    assert b"100%" in drawn and b"3.00M" in drawn and CODE.encode() in drawn


def test_module_help_lists_the_commands():
    out = subprocess.run(
        [sys.executable, "-m", "livekit_plugins_avatarhub", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    for command in ("pull", "ls", "rm", "prune"):
        assert command in out


def test_agents_commands(bithuman_env, capsys, monkeypatch):
    bithuman_env.add_agent(CODE, name="Ava", model="essence-2", supported_models=["essence-2"])
    assert main(["agents", "ls"]) == 0
    out = capsys.readouterr().out
    assert CODE in out and "Ava" in out and "essence-2" in out and "1 agents" in out

    bithuman_env.status_script["A000000000"] = [
        {"status": "processing", "progress": 0.5, "progress_msg": "rendering"},
        {"status": "ready", "progress": 1.0},
    ]
    from livekit_plugins_avatarhub import api

    real_wait = api.BithumanAPI.wait_until_ready

    async def quick_wait(self, agent_id, **kwargs):
        kwargs["interval"] = 0.01
        return await real_wait(self, agent_id, **kwargs)

    monkeypatch.setattr(api.BithumanAPI, "wait_until_ready", quick_wait)
    assert main(["agents", "generate", "--prompt", "a calm narrator", "--wait"]) == 0
    out = capsys.readouterr().out
    assert "A000000000: processing" in out and "A000000000: ready" in out
    assert bithuman_env.generated[0]["body"] == {"prompt": "a calm narrator"}

    assert main(["agents", "status", "A000000000"]) == 0
    assert "A000000000: ready 100%" in capsys.readouterr().out
    bithuman_env.status_script["A000000001"] = [{"status": "failed", "error_message": "bad image"}]
    assert main(["agents", "status", "A000000001"]) == 1
    assert "bad image" in capsys.readouterr().out


def test_gestures_command(bithuman_env, capsys):
    bithuman_env.add_agent(
        CODE, gestures={"laugh_react": "https://v/l.mp4", "mini_wave_hello": "https://v/w.mp4"}
    )
    assert main(["gestures", CODE]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "laugh_react\thttps://v/l.mp4",
        "mini_wave_hello\thttps://v/w.mp4",
    ]
    assert main(["gestures", "demo"]) == 0
    assert "wave" in capsys.readouterr().out.split()
