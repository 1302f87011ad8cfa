"""The hub across processes: concurrent resolution and a download killed midway."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bithuman_server import FakeBithumanService

CODE = "A91XMB7113"
WORKER = str(Path(__file__).with_name("resolve_worker.py"))
pytestmark = pytest.mark.slow


def spawn(service: FakeBithumanService) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, WORKER, service.api_base, CODE],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )


def test_eight_processes_download_once(clean_env):
    with FakeBithumanService() as service:
        agent = service.add_agent(CODE, size=2 << 20)
        service.slow_seconds = 1.0
        service.storage_faults = ["slow"]  # keep the first download open while others queue up
        workers = [spawn(service) for _ in range(8)]
        outputs = []
        for w in workers:
            out, err = w.communicate(timeout=120)
            assert w.returncode == 0, err
            outputs.append(out.split()[-2:])
        assert service.downloads() == 1
    expected = hashlib.sha256(agent.files["essence-1"]).hexdigest()
    assert {tuple(o) for o in outputs} == {
        (str(clean_env / "agents" / CODE / f"{CODE}.imx"), expected)
    }


def test_download_killed_midway_then_resolved_again(clean_env):
    with FakeBithumanService() as service:
        agent = service.add_agent(CODE, size=4 << 20)
        service.slow_seconds = 8.0
        service.storage_faults = ["slow"]
        worker = spawn(service)
        folder = clean_env / "agents" / CODE
        deadline = time.monotonic() + 60
        # wait until the partial file has real bytes in it, then kill without any cleanup
        while time.monotonic() < deadline:
            partials = list(folder.glob(".*.incomplete")) if folder.exists() else []
            if partials and partials[0].stat().st_size > 0:
                break
            time.sleep(0.05)
        else:
            worker.kill()
            pytest.fail("the download never started")
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        assert list(folder.glob(".*.incomplete")), "the killed process left its partial file"
        assert not (folder / f"{CODE}.imx").exists()

        again = spawn(service)
        out, err = again.communicate(timeout=120)
        assert again.returncode == 0, err
    path = folder / f"{CODE}.imx"
    assert path.read_bytes() == agent.files["essence-1"]
    assert not list(folder.glob(".*.incomplete")), "the stale partial was cleaned up"
