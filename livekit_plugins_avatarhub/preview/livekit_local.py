"""A ``livekit-server`` for the preview, on loopback only, stopped when the preview ends.

It gets free ports (signalling, ICE/TCP and the one ICE/UDP port), a fresh random API key and
secret (not the well-known dev key, so nothing else on the machine can mint tokens for it), no
external IP discovery and no public STUN server: it works offline.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from ..exceptions import ConfigurationError

#: where the repository's ``scripts/install-livekit`` puts the binary
INSTALL_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / (
    "livekit-plugins-avatarhub/bin"
)
HOW_TO_GET_ONE = (
    "no LiveKit server: set LIVEKIT_URL, LIVEKIT_API_KEY and LIVEKIT_API_SECRET, or put "
    "livekit-server on PATH (https://docs.livekit.io/home/self-hosting/local/, or `go install "
    "github.com/livekit/livekit-server/cmd/server@latest`), or pass --livekit-server PATH"
)


def find_livekit_server(explicit: str | None = None) -> str | None:
    """``explicit``, else ``livekit-server`` on PATH, else the one ``install-livekit`` built."""
    if explicit:
        path = shutil.which(explicit) or explicit
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise ConfigurationError(f"--livekit-server {explicit}: not an executable file")
        return path
    found = shutil.which("livekit-server")
    if found:
        return found
    installed = INSTALL_DIR / "livekit-server"
    return str(installed) if os.access(installed, os.X_OK) else None


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loopback_rtc(tcp_port: int, udp_port: int) -> dict[str, object]:
    """``livekit-server``'s ``rtc`` settings for a server only this machine reaches: ICE on
    127.0.0.1 only, no external IP discovery, and no public STUN server."""
    return {
        "node_ip": "127.0.0.1",
        "tcp_port": tcp_port,
        "udp_port": udp_port,
        "use_external_ip": False,
        "enable_loopback_candidate": True,
        "ips": {"includes": ["127.0.0.1/32"]},
        # handed to clients; a dead loopback port keeps them off public STUN servers
        "stun_servers": [f"127.0.0.1:{_free_port(socket.SOCK_DGRAM)}"],
    }


class LocalLiveKit:
    """One ``livekit-server`` process. Blocking: call :meth:`start` and :meth:`stop` in a thread."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.api_key = "preview-" + secrets.token_hex(4)
        self.api_secret = secrets.token_urlsafe(32)
        self.port = 0
        self._workdir = Path(tempfile.mkdtemp(prefix="avatarhub-livekit-"))
        self._process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:  # the secret is a credential: never shown
        return f"LocalLiveKit({self.binary!r}, port={self.port})"

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def _config(self) -> dict[str, object]:
        return {
            "port": self.port,
            "bind_addresses": ["127.0.0.1"],
            "keys": {self.api_key: self.api_secret},
            "rtc": loopback_rtc(_free_port(), _free_port(socket.SOCK_DGRAM)),
            "room": {"auto_create": True, "empty_timeout": 60, "departure_timeout": 5},
            "logging": {"level": "warn", "json": True, "pion_level": "error"},
        }

    def start(self, timeout: float = 30.0) -> None:
        self.port = _free_port()
        config = self._workdir / "livekit.yaml"
        config.write_text(json.dumps(self._config()))  # YAML is a superset of JSON
        config.chmod(0o600)  # it holds the secret
        log = (self._workdir / "livekit.log").open("ab")
        try:
            self._process = subprocess.Popen(
                [self.binary, "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C is the preview's to handle, then ours to pass on
            )
        except OSError as err:
            raise ConfigurationError(f"could not start {self.binary}: {err}") from None
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise ConfigurationError(f"{self.binary} exited at start: {tail}")
            if self._answers():
                return
            time.sleep(0.1)
        self.stop()
        raise ConfigurationError(f"{self.binary} did not answer within {timeout:g} s")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=1) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def log_tail(self, lines: int = 3) -> str:
        with contextlib.suppress(OSError):
            text = (self._workdir / "livekit.log").read_text(errors="replace")
            return " | ".join(text.strip().splitlines()[-lines:])
        return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM twice (the first lets participants leave), then SIGKILL; the config goes."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, sig)
                try:
                    process.wait(timeout / 2)
                    break
                except subprocess.TimeoutExpired:
                    continue
        shutil.rmtree(self._workdir, ignore_errors=True)
