"""Test doubles: a room that needs no LiveKit server, and bitHuman's runtime without its engine.

``FakeRoom`` is the duck-typed room LiveKit's AvatarRunner accepts (an EventEmitter with a local
participant that publishes tracks). Published tracks are real ``rtc`` tracks, so tests read the
frames back through real ``rtc.VideoStream``/``rtc.AudioStream`` objects.

``FakeBithuman`` is ``bithuman.AsyncBithuman`` as its contract describes it (``runtime.py``),
written from that contract and bithuman's own ``VideoFrame``/``AudioChunk``/exceptions, and
independent of the package's demo engine (which the contract tests check against it). Its frames
are a flat colour derived from the model file, so tests can tell which file was loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import struct
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import bithuman
import numpy as np
from google.protobuf.message import EncodeError

from livekit import rtc

FAKE_MODEL_MAGIC = b"IMX\x00fake-model"
# bithuman 0.8.1 predates the exception classes (BithumanError, ModelNotFoundError, ...)
LEGACY_BITHUMAN = not hasattr(bithuman, "BithumanError")


def _claims(token: str) -> dict[str, Any]:
    import base64
    import json

    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def _native_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(len(FAKE_MODEL_MAGIC) + 4)
    if len(head) < len(FAKE_MODEL_MAGIC) + 4:
        return (1280, 720)
    width, height = struct.unpack("<HH", head[len(FAKE_MODEL_MAGIC) :])
    return width, height


def _has_magic(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(len(FAKE_MODEL_MAGIC)) == FAKE_MODEL_MAGIC


def fake_model_bytes(
    seed: bytes = b"", size: int = 4096, frame_size: tuple[int, int] = (160, 120)
) -> bytes:
    """Bytes the double accepts as a model; like an .imx they carry their own frame size."""
    head = FAKE_MODEL_MAGIC + struct.pack("<HH", *frame_size)
    block = hashlib.sha256(seed).digest() * 64
    body = head + block * (max(0, size - len(head)) // len(block) + 1)
    return body[: max(size, len(head))]


def write_fake_model(
    path: os.PathLike[str] | str,
    seed: bytes = b"",
    size: int = 4096,
    frame_size: tuple[int, int] = (160, 120),
) -> str:
    data = fake_model_bytes(seed, size, frame_size)
    with open(path, "wb") as f:
        f.write(data)
    return os.fspath(path)


def model_colour(path: str) -> tuple[int, int, int]:
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).digest()
    return digest[0], digest[1], digest[2]


@dataclass
class _Reply:
    """One reply's int16 audio at 16 kHz, as bytes not yet turned into frames."""

    message_id: str
    pcm: bytearray = field(default_factory=bytearray)
    ended: bool = False


class FakeBithuman:
    """``bithuman.AsyncBithuman`` as the contract describes it, written from that contract alone.

    ``create`` follows the installed bithuman line's check order and exceptions (0.8.1 or 2.x);
    ``run`` paces ``bithuman.VideoFrame``s at ``settings.FPS``, each talking frame carrying
    exactly ``INPUT_SAMPLE_RATE / FPS`` samples, the last one of a reply padded and marked
    ``end_of_speech``. Pixels are a flat colour derived from the model file (so a test can tell
    which file was loaded), with a white bar at the bottom left while the audio is loud.
    """

    #: set False to simulate an offline machine: auth fails as in the real SDK (RuntimeError)
    auth_reachable = True
    created: list[FakeBithuman] = []

    class settings:
        FPS = 25
        INPUT_SAMPLE_RATE = 16000

    def __init__(self, model_path: str, output_size: tuple[int, int]) -> None:
        self.model_path = model_path
        self.output_size = output_size
        self.colour = model_colour(model_path)
        self.transaction_id = uuid.uuid4().hex
        self.create_kwargs: dict[str, Any] = {}
        self.cleaned_up = 0
        self.interrupts = 0
        self.pushed_controls: list[bithuman.VideoControl] = []
        self.token_initialisations = 0
        self._replies: deque[_Reply] = deque()
        self._frame_bytes = 2 * self.settings.INPUT_SAMPLE_RATE // self.settings.FPS
        self._frame_index = 0
        self._stop = asyncio.Event()

    # -- creation, as the installed SDK does it ------------------------------------------------

    @classmethod
    async def create(cls, **kwargs: Any) -> FakeBithuman:
        """``AsyncBithuman.create`` as the installed bithuman version behaves."""
        if LEGACY_BITHUMAN:
            return await cls._create_0_8(**kwargs)
        return await cls._create_2_x(**kwargs)

    @classmethod
    async def _create_2_x(
        cls,
        *,
        model_path: str | None = None,
        api_secret: str | None = None,
        token: str | None = None,
        api_url: str = "https://auth.api.bithuman.ai/v1/runtime-tokens/request",
        insecure: bool = False,
        input_buffer_size: int = 0,
        output_buffer_size: int = 6,
        num_threads: int = 0,
        output_size: tuple[int, int] = (1280, 720),
        agent_code: str | None = None,
    ) -> FakeBithuman:
        # 2.x order: model_path, the file, the secret (token alone refused), auth, model load
        if not model_path:
            raise ValueError("model_path is required")
        if not os.path.exists(model_path):
            raise bithuman.ModelNotFoundError(f"Model file not found: {model_path}")
        secret = (
            api_secret
            or os.environ.get("BITHUMAN_API_SECRET")
            or os.environ.get("BITHUMAN_API_KEY")
        )
        if not secret:
            raise bithuman.BithumanError("api_secret is required (token= alone is not accepted)")
        if not cls.auth_reachable:
            raise RuntimeError("curl: (6) Could not resolve host: auth.api.bithuman.ai")
        if not _has_magic(model_path):
            raise bithuman.ModelLoadError(f"Failed to load model: {model_path} is not an IMX model")
        return cls._made(
            model_path, output_size, api_secret=api_secret, token=token, api_url=api_url
        )

    @classmethod
    async def _create_0_8(
        cls,
        *,
        model_path: str | None = None,
        token: str | None = None,
        api_secret: str | None = None,
        api_url: str = "https://auth.api.bithuman.ai/v1/runtime-tokens/request",
        tags: str | None = "bithuman",
        insecure: bool = True,
        input_buffer_size: int = 0,
        output_buffer_size: int = 5,
        num_threads: int = 0,
        verbose: bool | None = None,
    ) -> FakeBithuman:
        # 0.8.1 order: credentials (a token alone is fine), auth, then the model file
        if not token and not api_secret:
            raise ValueError("Either token or api_secret must be provided")
        if not cls.auth_reachable:
            raise RuntimeError("curl: (6) Could not resolve host: auth.api.bithuman.ai")
        if not model_path:
            raise ValueError("Model path cannot be empty")
        if not os.path.exists(model_path):
            raise FileNotFoundError(f"Model path {model_path} does not exist")
        if not _has_magic(model_path):
            raise RuntimeError(f"Failed to load model data from {model_path}")
        # 0.8.1 has no output_size: it renders at the model's own size
        return cls._made(
            model_path,
            _native_size(model_path),
            api_secret=api_secret,
            token=token,
            api_url=api_url,
        )

    @classmethod
    def _made(cls, model_path: str, output_size: tuple[int, int], **kwargs: Any) -> FakeBithuman:
        runtime = cls(model_path, output_size)
        runtime.create_kwargs = {**kwargs, "output_size": output_size}
        cls.created.append(runtime)
        return runtime

    # -- input ----------------------------------------------------------------------------

    async def push_audio(self, data: bytes, sample_rate: int, last_chunk: bool = True) -> None:
        pcm = bytes(data)
        if sample_rate != self.settings.INPUT_SAMPLE_RATE:
            pcm = _resampled(pcm, sample_rate, self.settings.INPUT_SAMPLE_RATE)
        reply = self._open_reply()
        reply.pcm += pcm
        reply.ended = last_chunk

    async def flush(self) -> None:
        if self._replies and not self._replies[-1].ended:
            self._replies[-1].ended = True

    async def push(self, control: bithuman.VideoControl) -> None:
        self.pushed_controls.append(control)
        if control.audio is not None:
            await self.push_audio(
                control.audio.bytes, control.audio.sample_rate, control.audio.last_chunk
            )
        if control.end_of_speech:
            await self.flush()

    def interrupt(self) -> None:
        self.interrupts += 1
        self._replies.clear()

    def _open_reply(self) -> _Reply:
        if not self._replies or self._replies[-1].ended:
            self._replies.append(_Reply(str(uuid.uuid4())))
        return self._replies[-1]

    # -- lifecycle ------------------------------------------------------------------------

    async def stop(self) -> None:
        self._stop.set()

    async def shutdown(self) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        self.cleaned_up += 1  # counted, so tests see who freed it; a second call is harmless
        self._stop.set()
        self._replies.clear()

    def _regenerate_transaction_id(self) -> None:
        self.transaction_id = uuid.uuid4().hex

    async def _initialize_token(self) -> None:
        self.token_initialisations += 1

    # -- output ---------------------------------------------------------------------------

    def get_first_frame(self) -> np.ndarray:
        return self._image(None)

    async def run(self) -> AsyncIterator[bithuman.VideoFrame]:
        loop = asyncio.get_running_loop()
        period = 1.0 / self.settings.FPS
        due = loop.time()
        while not self._stop.is_set():
            yield self._frame()
            due += period
            wait = due - loop.time()
            if wait < -0.5:  # a stalled host: start counting again rather than burst
                due = loop.time()
            elif wait > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), wait)

    def _frame(self) -> bithuman.VideoFrame:
        index, self._frame_index = self._frame_index, self._frame_index + 1
        reply = self._replies[0] if self._replies else None
        if reply is None or (len(reply.pcm) < self._frame_bytes and not reply.ended):
            # idle, or the reply's next audio has not arrived yet
            return bithuman.VideoFrame(bgr_image=self._image(None), frame_index=index)
        if not reply.pcm:  # ended after its audio was used up: a bare end-of-speech frame
            self._replies.popleft()
            return bithuman.VideoFrame(
                bgr_image=self._image(None),
                frame_index=index,
                source_message_id=reply.message_id,
                end_of_speech=True,
            )
        chunk = bytes(reply.pcm[: self._frame_bytes]).ljust(self._frame_bytes, b"\0")
        del reply.pcm[: self._frame_bytes]
        last = reply.ended and not reply.pcm
        if last:
            self._replies.popleft()
        samples = np.frombuffer(chunk, np.int16).copy()
        return bithuman.VideoFrame(
            bgr_image=self._image(samples),
            audio_chunk=bithuman.AudioChunk(
                data=samples, sample_rate=self.settings.INPUT_SAMPLE_RATE, last_chunk=last
            ),
            frame_index=index,
            source_message_id=reply.message_id,
            end_of_speech=last,
        )

    def _image(self, samples: np.ndarray | None) -> np.ndarray:
        w, h = self.output_size
        image = np.empty((h, w, 3), np.uint8)
        image[:] = self.colour
        if samples is not None and samples.size:
            level = float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) / 32768.0
            bar = int(min(1.0, level * 4) * (h // 4))
            if bar:
                image[h - bar :, : w // 8] = 255
        return image


def _resampled(pcm: bytes, src: int, dst: int) -> bytes:
    samples = np.frombuffer(pcm, np.int16).astype(np.float64)
    n = round(samples.size * dst / src)
    out = np.interp(np.arange(n) * src / dst, np.arange(samples.size), samples)
    return out.astype(np.int16).tobytes()


# --- a room without a server ----------------------------------------------------------------


@dataclass
class FakePublication:
    track: Any
    options: Any
    sid: str

    @property
    def kind(self) -> Any:
        return self.track.kind

    async def wait_for_subscription(self) -> None:
        return None


@dataclass
class FakeLocalParticipant:
    room: FakeRoom
    identity: str = "agent-test"
    kind: int = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
    track_publications: dict[str, FakePublication] = field(default_factory=dict)
    rpc_methods: dict[str, Any] = field(default_factory=dict)
    attributes: dict[str, str] = field(default_factory=dict)
    name: str = ""
    sid: str = "PA_agenttest0001"
    #: what the token's grant allows (LiveKit refuses set_name/set_attributes without it)
    can_update_own_metadata: bool = True
    unpublished: list[str] = field(default_factory=list)
    #: seconds a publish takes to reach the server; it lands even if the caller stops waiting
    #: (and the SDK then never lists it), as LiveKit's does
    publish_delay: float = 0.0
    #: SIDs the server holds published: what subscribers see, listed by the SDK or not
    on_server: set[str] = field(default_factory=set)
    publishing: int = 0  # publishes in flight
    _published: int = 0

    async def set_name(self, name: str) -> None:
        self._check_metadata_grant()
        self.name = name
        self.room.sfu_broadcast("participant_name_changed", self)

    async def set_attributes(self, attributes: dict[str, str]) -> None:
        self._check_metadata_grant()
        for key, value in attributes.items():
            if value:
                self.attributes[key] = value
            else:  # LiveKit deletes an attribute set to ""
                self.attributes.pop(key, None)

    def _check_metadata_grant(self) -> None:
        if not self.can_update_own_metadata:
            raise rtc.RpcError(403, "does not have permission to update own metadata")

    def register_rpc_method(self, method: str, handler: Any = None) -> Any:
        if handler is None:

            def decorator(fn: Any) -> Any:
                self.rpc_methods[method] = fn
                return fn

            return decorator
        self.rpc_methods[method] = handler
        return None

    def unregister_rpc_method(self, method: str) -> None:
        self.rpc_methods.pop(method, None)

    @property
    def _rpc_handlers(self) -> dict[str, Any]:  # read by DataStreamAudioReceiver
        return self.rpc_methods

    async def perform_rpc(
        self,
        *,
        destination_identity: str,
        method: str,
        payload: str,
        response_timeout: float | None = None,
    ) -> str:
        self.room.rpc_calls.append((destination_identity, method, payload))
        peer = self.room.sfu_peer(destination_identity)
        if peer is None:
            return ""
        if method not in peer.local_participant.rpc_methods:
            raise rtc.RpcError(rtc.RpcError.ErrorCode.UNSUPPORTED_METHOD, "Method not supported")
        result = await peer.local_participant.invoke(method, payload, caller=self.identity)
        return str(result)

    async def invoke(self, method: str, payload: str, caller: str = "agent-1") -> Any:
        """Deliver an RPC from ``caller`` to a handler registered here."""
        handler = self.rpc_methods[method]
        result = handler(
            rtc.RpcInvocationData(
                request_id="req", caller_identity=caller, payload=payload, response_timeout=5.0
            )
        )
        return await result if asyncio.iscoroutine(result) else result

    async def unpublish_track(self, sid: str) -> None:
        """By SID, as the SDK does: also a track it never listed."""
        if sid not in self.on_server:
            raise RuntimeError(f"track {sid} not found")  # the SDK raises UnpublishTrackError
        self.on_server.discard(sid)
        self.unpublished.append(sid)
        pub = self.track_publications.pop(sid, None)
        if pub is not None:
            self.room.emit("local_track_unpublished", pub)

    async def publish_track(self, track: Any, options: Any = None) -> FakePublication:
        if options is not None and not options.IsInitialized():
            # what LiveKit's FFI does when it serialises the request
            raise EncodeError(f"missing required fields: {options.FindInitializationErrors()}")
        self._published += 1
        pub = FakePublication(track, options, f"TR_{self._published}")
        if self.publish_delay:
            self.publishing += 1
            await asyncio.shield(asyncio.ensure_future(self._land(pub.sid)))
        else:
            self.on_server.add(pub.sid)
        self.track_publications[pub.sid] = pub
        self.room.emit("local_track_published", pub, track)
        self.room.sfu_broadcast("track_published", self, pub)
        return pub

    async def _land(self, sid: str) -> None:
        await asyncio.sleep(self.publish_delay)
        self.on_server.add(sid)
        self.publishing -= 1

    def publication(self, kind: Any) -> FakePublication | None:
        for pub in self.track_publications.values():
            if pub.track.kind == kind:
                return pub
        return None


@dataclass
class FakeRemoteParticipant:
    identity: str
    kind: int = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
    attributes: dict[str, str] = field(default_factory=dict)
    track_publications: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    sid: str = "PA_remote"
    # ParticipantState arrived in later livekit (rtc) releases; 2 is PARTICIPANT_STATE_ACTIVE
    state: int = getattr(getattr(rtc, "ParticipantState", None), "PARTICIPANT_STATE_ACTIVE", 2)


@dataclass
class _StreamInfo:
    stream_id: str
    topic: str
    attributes: dict[str, str]


class FakeByteStreamReader:
    """Enough of rtc.ByteStreamReader for LiveKit's DataStreamAudioReceiver."""

    def __init__(self, topic: str, attributes: dict[str, str], chunks: list[bytes]) -> None:
        self.info = _StreamInfo(f"stream-{id(self)}", topic, attributes)
        self._chunks = list(chunks)

    def __aiter__(self) -> FakeByteStreamReader:
        return self

    async def __anext__(self) -> bytes:
        if not self._chunks:
            raise StopAsyncIteration
        await asyncio.sleep(0)
        return self._chunks.pop(0)


class FakeSFU:
    """A loopback stand-in for a LiveKit server: rooms that connect through it with a token
    join the room its grant names, see each other as remote participants (kind, name and
    attributes from the token), see each other's publications, and reach each other's RPC
    methods. Rooms made with ``FakeRoom(name, sfu=...)`` are already in."""

    def __init__(self) -> None:
        self.rooms: list[FakeRoom] = []
        self.connect_delay = 0.0  # seconds each connect() takes, like a real signalling round trip
        self.connect_error: Exception | None = None

    def room(self) -> FakeRoom:
        """A room factory for workers: not connected until ``connect(url, token)``."""
        room = FakeRoom("", sfu=self, connected=False)
        return room

    def peers(self, room: FakeRoom) -> list[FakeRoom]:
        return [r for r in self.rooms if r is not room and r.name == room.name and r._connected]

    def enter(self, room: FakeRoom) -> None:
        if room not in self.rooms:
            self.rooms.append(room)
        for peer in self.peers(room):
            peer.remote_join(room.local_participant)
            room.remote_join(peer.local_participant)

    def leave(self, room: FakeRoom) -> None:
        """As a server forgets a participant that disconnected."""
        for peer in self.peers(room):
            peer.remote_leave(room.local_participant.identity)
        if room in self.rooms:
            self.rooms.remove(room)


class FakeRoom(rtc.EventEmitter[str]):
    def __init__(
        self, name: str = "test-room", *, sfu: FakeSFU | None = None, connected: bool = True
    ) -> None:
        super().__init__()
        self.name = name
        self.remote_participants: dict[str, Any] = {}
        self.local_participant = FakeLocalParticipant(self)
        self.byte_stream_handlers: dict[str, Any] = {}
        self.rpc_calls: list[tuple[str, str, str]] = []
        self.connected_with: tuple[str, str] | None = None
        self.left_with: list[str] | None = None  # publications still up at disconnect()
        self.sfu = sfu
        self._connected = connected
        if sfu is not None and connected:
            sfu.enter(self)

    def isconnected(self) -> bool:
        return self._connected

    async def connect(self, url: str, token: str, *args: Any, **kwargs: Any) -> None:
        self.connected_with = (url, token)
        if self.sfu is not None:
            if self.sfu.connect_delay:
                await asyncio.sleep(self.sfu.connect_delay)
            if self.sfu.connect_error is not None:
                raise self.sfu.connect_error
            claims = _claims(token)
            grant = claims.get("video") or {}
            self.name = grant.get("room", self.name)
            me = self.local_participant
            me.identity = claims.get("sub", me.identity)
            me.name = claims.get("name", "")
            me.attributes = dict(claims.get("attributes") or {})
            me.sid = f"PA_{hashlib.sha1(me.identity.encode()).hexdigest()[:12]}"
            me.can_update_own_metadata = bool(grant.get("canUpdateOwnMetadata", False))
            kind = claims.get("kind")
            me.kind = (
                rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
                if kind == "agent"
                else rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD
            )
        self._connected = True
        if self.sfu is not None:
            self.sfu.enter(self)

    async def disconnect(self) -> None:
        if self._connected:
            self._connected = False
            self.left_with = list(self.local_participant.track_publications)
            if self.sfu is not None:
                self.sfu.leave(self)
            self.emit("disconnected", "CLIENT_INITIATED")

    # -- what the server relays between rooms of one name ------------------------------------

    def sfu_peer(self, identity: str) -> FakeRoom | None:
        if self.sfu is None:
            return None
        for peer in self.sfu.peers(self):
            if peer.local_participant.identity == identity:
                return peer
        return None

    def sfu_broadcast(self, event: str, sender: FakeLocalParticipant, *args: Any) -> None:
        if self.sfu is None or not self._connected:
            return
        for peer in self.sfu.peers(self):
            remote = peer.remote_participants.get(sender.identity)
            if remote is None:
                continue
            if event == "participant_name_changed":
                remote.name = sender.name
                peer.emit(event, remote, "", sender.name)
            elif event == "track_published":
                (pub,) = args
                remote.track_publications[pub.sid] = pub
                peer.emit(event, pub, remote)

    def remote_join(self, local: FakeLocalParticipant) -> None:
        participant = FakeRemoteParticipant(
            local.identity, local.kind, dict(local.attributes), dict(local.track_publications)
        )
        participant.name = local.name
        participant.sid = local.sid
        self.remote_participants[local.identity] = participant
        self.emit("participant_connected", participant)
        self.emit("participant_active", participant)
        for pub in participant.track_publications.values():
            self.emit("track_published", pub, participant)

    def remote_leave(self, identity: str) -> None:
        participant = self.remote_participants.pop(identity, None)
        if participant is not None:
            self.emit("participant_disconnected", participant)

    def drop_connection(self) -> None:
        """A transient network loss: LiveKit reconnects by itself."""
        self.emit("reconnecting")

    def restore_connection(self) -> None:
        self.emit("reconnected")

    def register_byte_stream_handler(self, topic: str, handler: Any) -> None:
        self.byte_stream_handlers[topic] = handler

    def unregister_byte_stream_handler(self, topic: str) -> None:
        self.byte_stream_handlers.pop(topic, None)

    def join(
        self, identity: str, kind: int = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
    ) -> FakeRemoteParticipant:
        participant = FakeRemoteParticipant(identity, kind)
        self.remote_participants[identity] = participant
        self.emit("participant_connected", participant)
        self.emit("participant_active", participant)  # what livekit-agents 1.8 waits for
        return participant

    def send_audio_stream(
        self, sender: str, pcm: bytes, sample_rate: int = 16000, chunk_bytes: int = 3200
    ) -> None:
        """What DataStreamAudioOutput sends: one byte stream per speech segment."""
        chunks = [pcm[i : i + chunk_bytes] for i in range(0, len(pcm), chunk_bytes)]
        reader = FakeByteStreamReader(
            "lk.audio_stream", {"sample_rate": str(sample_rate), "num_channels": "1"}, chunks
        )
        self.byte_stream_handlers["lk.audio_stream"](reader, sender)

    async def wait_published(self, kind: Any, timeout: float = 10.0) -> FakePublication:
        async def poll() -> FakePublication:
            while (pub := self.local_participant.publication(kind)) is None:
                await asyncio.sleep(0.01)
            return pub

        return await asyncio.wait_for(poll(), timeout)


async def sine_frames(
    seconds: float,
    *,
    sample_rate: int = 16000,
    freq: float = 220.0,
    amplitude: float = 0.5,
    chunk_ms: int = 20,
):
    """Speech stand-in: a loud tone as rtc.AudioFrames, produced faster than real time."""
    n = int(sample_rate * chunk_ms / 1000)
    total = int(seconds * sample_rate)
    t = np.arange(total) / sample_rate
    pcm = (np.sin(2 * np.pi * freq * t) * amplitude * 32767).astype(np.int16)
    for start in range(0, total, n):
        part = pcm[start : start + n]
        yield rtc.AudioFrame(part.tobytes(), sample_rate, 1, len(part))
        await asyncio.sleep(0)


# --- a job without a LiveKit server -----------------------------------------------------------


class FakeJobProcess:
    def __init__(self) -> None:
        self.userdata: dict[str, Any] = {}


class FakeJobContext:
    """What the examples use of ``JobContext``: a room, the process, connect()."""

    def __init__(self, room: FakeRoom | None = None, proc: FakeJobProcess | None = None) -> None:
        self.room = room or FakeRoom()
        self.proc = proc or FakeJobProcess()
        self.shutdown_callbacks: list[Any] = []
        self.connected = False

    async def connect(self, *args: Any, **kwargs: Any) -> None:
        self.connected = True

    def add_shutdown_callback(self, callback: Any) -> None:
        self.shutdown_callbacks.append(callback)
