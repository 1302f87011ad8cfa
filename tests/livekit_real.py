"""A real LiveKit server on 127.0.0.1, and a real participant that records what reaches it.

The server is LiveKit's own ``livekit-server`` (installed by ``scripts/install-livekit``),
pinned to loopback: signalling, ICE/TCP and the single-port ICE/UDP mux each on a free port,
no external IP discovery and no STUN server on the internet. The :class:`Subscriber` is a
``livekit.rtc`` participant: it decodes the avatar's video and audio the way any viewer does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from livekit import api, rtc
from livekit_plugins_avatarhub.preview.livekit_local import loopback_rtc
from livekit_plugins_avatarhub.rendering.demo.face import (
    DemoRuntime,  # slow to import: not mid-recording
)

ROOT = Path(__file__).resolve().parents[1]
#: where scripts/install-livekit puts the binaries (AVATARHUB_LIVEKIT_BIN overrides)
BIN_DIR = Path(
    os.environ.get("AVATARHUB_LIVEKIT_BIN")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "livekit-plugins-avatarhub"
    / "bin"
)
#: "required" (CI): a missing server fails the real-room tests instead of skipping them
REQUIRED = os.environ.get("AVATARHUB_REAL_LIVEKIT") == "required"

API_KEY = "avatarhub-key"
API_SECRET = "avatarhub-secret-for-tests-0123456789"  # >= 32 characters, as production wants
#: livekit before 1.1.2x has no degradation preference in its publish options: under CPU load
#: (a 2-core machine running server, agent, avatar and subscriber) libwebrtc lowers the size
ADAPTS_RESOLUTION = (
    "degradation_preference" not in rtc.TrackPublishOptions.DESCRIPTOR.fields_by_name
)
_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")


def find_tool(name: str) -> str | None:
    local = BIN_DIR / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: no proxy (LiveKit's worker ignores NO_PROXY)."""
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
    env.update(extra)
    return env


@dataclass
class LiveKitServer:
    """One ``livekit-server`` process on loopback; ``start()`` returns once it answers."""

    binary: str
    workdir: Path
    redis: str | None = None  # host:port of a shared Redis (multi-node)
    port: int = 0
    rtc_tcp_port: int = 0
    rtc_udp_port: int = 0
    api_key: str = API_KEY
    api_secret: str = API_SECRET
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"livekit-{self.port}.log"

    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "port": self.port,
            "bind_addresses": ["127.0.0.1"],
            "keys": {self.api_key: self.api_secret},
            "rtc": loopback_rtc(self.rtc_tcp_port, self.rtc_udp_port),
            "room": {"auto_create": True, "empty_timeout": 30, "departure_timeout": 5},
            "logging": {"level": "info", "json": True, "pion_level": "error"},
        }
        if self.redis:  # nodes of one cluster: rooms placed on any, signalling relayed
            config["redis"] = {"address": self.redis}
            config["node_selector"] = {"kind": "any", "sort_by": "random"}
        return config

    def start(self, timeout: float = 30.0) -> LiveKitServer:
        if not self.port:  # a restart keeps the ports, so clients come back to the same URL
            self.port = free_port()
            self.rtc_tcp_port = free_port()
            self.rtc_udp_port = free_port(socket.SOCK_DGRAM)
        path = self.workdir / f"livekit-{self.port}.yaml"
        path.write_text(json.dumps(self.config()))  # YAML is a superset of JSON
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [self.binary, "--config", str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=clean_env(),
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"livekit-server exited at start:\n{self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"livekit-server did not answer within {timeout}s:\n{self.log_tail()}")

    def ready(self) -> bool:
        """``GET /`` answers ``OK`` once the node's stats are fresh (406 otherwise)."""
        try:
            with urllib.request.urlopen(self.http_url + "/", timeout=1) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """Two SIGTERMs (the first waits for participants to leave), then SIGKILL."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        for _ in range(2):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout / 2)
                return
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def token(
        self,
        identity: str,
        room: str,
        *,
        name: str | None = None,
        publish: bool = True,
        subscribe: bool = True,
        publish_data: bool = True,
        kind: str | None = None,
        attributes: dict[str, str] | None = None,
        agent: bool = False,
    ) -> str:
        grants = api.VideoGrants(
            room_join=True,
            room=room,
            can_publish=publish,
            can_subscribe=subscribe,
            can_publish_data=publish_data,
            agent=agent,
        )
        token = api.AccessToken(self.api_key, self.api_secret).with_identity(identity)
        token = token.with_grants(grants)
        if name:
            token = token.with_name(name)
        if kind:
            token = token.with_kind(kind)
        if attributes:
            token = token.with_attributes(attributes)
        return token.to_jwt()

    def api(self) -> api.LiveKitAPI:
        return api.LiveKitAPI(self.http_url, self.api_key, self.api_secret)

    def env(self) -> dict[str, str]:
        return {
            "LIVEKIT_URL": self.url,
            "LIVEKIT_API_KEY": self.api_key,
            "LIVEKIT_API_SECRET": self.api_secret,
        }


@contextlib.contextmanager
def running_server(binary: str, workdir: Path, **kwargs: Any) -> Iterator[LiveKitServer]:
    server = LiveKitServer(binary, workdir, **kwargs).start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def running_redis(
    binary: str, workdir: Path, timeout: float = 15.0, port: int = 0
) -> Iterator[str]:
    """Debian's ``redis-server`` on a free loopback port (or ``port``, to come back where it
    was), keeping nothing on disk: its ``host:port``. Each start is empty, so no node of an
    earlier cluster lingers in it."""
    port = port or free_port()
    log = (workdir / f"redis-{port}.log").open("ab")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
        start_new_session=True,
    )
    log.close()
    try:
        deadline = time.monotonic() + timeout
        while not _redis_answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {port}")
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


# -- what a viewer receives ------------------------------------------------------------------


@dataclass
class VideoSample:
    at: float  # time.monotonic() on arrival
    width: int
    height: int
    mouth: float  # share of the demo avatar's mouth box painted as an open mouth
    shown: float  # when libwebrtc meant it shown (its clock is time.monotonic()'s, in µs)


@dataclass
class AudioSample:
    at: float
    rms: float  # of this 10 ms piece, int16 full scale = 32768
    track: str = ""  # the sid of the track it came on


def demo_mouth_box(width: int, height: int) -> tuple[int, int, int, int]:
    """Where the demo avatar's mouth is drawn in a frame of this size."""
    return DemoRuntime(output_size=(width, height)).mouth_box()


def mouth_openness(rgba: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Share of the mouth box in the demo's dark mouth-interior red (R high, G and B low)."""
    x0, y0, x1, y1 = box
    region = rgba[y0:y1, x0:x1]
    inside = (region[..., 0] > 80) & (region[..., 1] < 60) & (region[..., 2] < 70)
    return float(inside.mean())


class ViewerVideoStream(rtc.VideoStream):
    """A viewer's video stream that keeps every frame the room delivers, as a browser's
    renderer does. LiveKit's native receive path keeps only the newest frame unless asked
    otherwise (``queue_size_frames``, default 1), so a test process one frame period late on a
    busy 2-core machine counted frames the avatar published and the room delivered as lost
    ("native video stream queue overflow")."""

    def _create_owned_stream(self) -> Any:
        from livekit.rtc._ffi_client import FfiClient
        from livekit.rtc._proto import ffi_pb2, video_frame_pb2

        assert self._track is not None
        req = ffi_pb2.FfiRequest()
        new = req.new_video_stream
        new.track_handle = self._track._ffi_handle.handle
        new.type = video_frame_pb2.VideoStreamType.VIDEO_STREAM_NATIVE
        if self._format is not None:
            new.format = self._format
        new.normalize_stride = True
        if "queue_size_frames" in new.DESCRIPTOR.fields_by_name:  # rtc >= 1.1: unbounded
            new.queue_size_frames = 0
        return FfiClient.instance.request(req).new_video_stream.stream


class Subscriber:
    """A viewer in a room: finds a participant's tracks and records what arrives."""

    def __init__(self, server: LiveKitServer, room: str, identity: str = "viewer") -> None:
        self.server, self.room_name, self.identity = server, room, identity
        self.room = rtc.Room()
        self.video: list[VideoSample] = []
        self.audio: list[AudioSample] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.events: list[str] = []  # what the room reported, for failure messages
        self.room.on(
            "track_subscribed",
            lambda t, pub, p: self.events.append(f"subscribed {p.identity} {pub.kind}"),
        )
        self.room.on(
            "track_subscription_failed",
            lambda p, sid, err: self.events.append(
                f"subscription failed {p.identity} {sid}: {err}"
            ),
        )

    async def __aenter__(self) -> Subscriber:
        await self.room.connect(
            self.server.url, self.server.token(self.identity, self.room_name, publish=False)
        )
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.stop_recording()
        await self.room.disconnect()

    def participants(
        self, *, identity: str | None = None, name: str | None = None
    ) -> list[rtc.RemoteParticipant]:
        """The remote participants with this identity and name (either may be left open)."""
        return [
            p
            for p in self.room.remote_participants.values()
            if (identity is None or p.identity == identity) and (name is None or p.name == name)
        ]

    async def wait_track(
        self,
        kind: rtc.TrackKind.ValueType,
        *,
        identity: str | None = None,
        name: str | None = None,
        timeout: float = 30.0,
    ) -> tuple[rtc.RemoteParticipant, rtc.RemoteTrack]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.participants(identity=identity, name=name):
                for pub in p.track_publications.values():
                    if pub.kind == kind and pub.subscribed and pub.track is not None:
                        return p, pub.track  # type: ignore[return-value]
            await asyncio.sleep(0.05)
        who = identity or name or "anyone"
        present = {
            p.identity: [
                (pub.kind, pub.mime_type, pub.subscribed) for pub in p.track_publications.values()
            ]
            for p in self.room.remote_participants.values()
        }
        raise AssertionError(
            f"no {kind} track from {who} within {timeout}s; in room: {present}; events: {self.events}"
        )

    async def wait_gone(self, identity: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while identity in self.room.remote_participants:
            if time.monotonic() > deadline:
                raise AssertionError(f"{identity} still in the room after {timeout}s")
            await asyncio.sleep(0.05)

    def record(self, participant: rtc.RemoteParticipant) -> None:
        """Record every video frame and 10 ms of audio the participant's tracks deliver."""
        for pub in participant.track_publications.values():
            if pub.track is None:
                continue
            if pub.kind == rtc.TrackKind.KIND_VIDEO:
                self._tasks.append(asyncio.create_task(self._video(pub.track)))
            elif pub.kind == rtc.TrackKind.KIND_AUDIO:
                self._tasks.append(asyncio.create_task(self._audio(pub.track)))

    async def stop_recording(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _video(self, track: rtc.Track) -> None:
        stream = ViewerVideoStream(track, format=rtc.VideoBufferType.RGBA)
        box: tuple[int, int, int, int] | None = None
        size = (0, 0)
        try:
            async for event in stream:
                frame = event.frame
                if frame.type != rtc.VideoBufferType.RGBA:
                    frame = frame.convert(rtc.VideoBufferType.RGBA)
                if (frame.width, frame.height) != size:
                    size = (frame.width, frame.height)
                    box = demo_mouth_box(*size)
                rgba = np.frombuffer(frame.data, np.uint8).reshape(frame.height, frame.width, 4)
                assert box is not None
                self.video.append(
                    VideoSample(
                        time.monotonic(),
                        frame.width,
                        frame.height,
                        mouth_openness(rgba, box),
                        event.timestamp_us / 1e6,
                    )
                )
        finally:
            await stream.aclose()

    async def _audio(self, track: rtc.Track) -> None:
        stream = rtc.AudioStream(track, sample_rate=48000, num_channels=1, frame_size_ms=10)
        try:
            async for event in stream:
                pcm = np.frombuffer(event.frame.data, np.int16).astype(np.float32)
                rms = float(np.sqrt(np.mean(pcm * pcm)) / 32768) if pcm.size else 0.0
                self.audio.append(AudioSample(time.monotonic(), rms, track.sid))
        finally:
            await stream.aclose()

    # -- what the recording says ---------------------------------------------------------

    def fps(self, since: float, until: float) -> float:
        """Frames per second a viewer was shown: counted by the frames' own timestamps, so a
        moment in which this process fell behind and then caught up does not count."""
        n = sum(1 for s in self.video if since <= s.shown < until)
        return n / (until - since)

    def frames_each_second(self, since: float, until: float) -> list[int]:
        """Frames shown in each whole second of the span: where a low rate came from, for a
        failure message (the call's ramp-up, one stall, or all along)."""
        counts = [0] * max(1, int(until - since))
        for s in self.video:
            if since <= s.shown < since + len(counts):
                counts[int(s.shown - since)] += 1
        return counts

    def loud_audio(self, threshold: float = 0.02) -> list[AudioSample]:
        return [s for s in self.audio if s.rms > threshold]

    def mouth_while(self, *, loud: bool, threshold: float = 0.02) -> list[float]:
        """Mouth openness of the frames that arrived while the audio was (not) loud.

        Each frame is paired with the audio that arrived within 120 ms of it: loud when that
        audio is loud on average, silent when all of it is quiet; frames at a speech onset or
        end are left out rather than counted on the wrong side."""
        times = np.array([s.at for s in self.audio])
        levels = np.array([s.rms for s in self.audio])
        out = []
        for frame in self.video:
            near = levels[np.abs(times - frame.at) < 0.12]
            if near.size == 0:
                continue
            if (loud and near.mean() > threshold) or (not loud and near.max() < threshold / 4):
                out.append(frame.mouth)
        return out


async def until(condition: Any, timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(0.05)
