"""Every difference between the livekit-agents and bithuman versions we support, in one place.

Each helper names the version that introduced what it papers over. The rest of the package
calls these helpers and never tests versions itself.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from livekit.agents.voice.avatar import QueueAudioOutput

from livekit import rtc

if TYPE_CHECKING:
    from livekit.agents import AgentSession
    from livekit.agents.voice.io import AudioOutput


def _version(dist: str) -> tuple[int, ...]:
    try:
        raw = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return (0,)
    parts: list[int] = []
    for piece in raw.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


LIVEKIT_AGENTS_VERSION = _version("livekit-agents")


# livekit-agents 1.5.5 added the AvatarSession base class (abstract avatar_identity from
# 1.5.11, wait_for_join and participant removal in aclose from 1.5.13). Older versions get a
# small stand-in with the same start/aclose/wait_for_join surface.
class _StandInAvatarSessionBase(rtc.EventEmitter[str]):
    """Stand-in for livekit.agents.voice.avatar.AvatarSession (added in 1.5.5)."""

    def __init__(self) -> None:
        super().__init__()
        self._room: rtc.Room | None = None
        self._agent_session: AgentSession[Any] | None = None

    @property
    def avatar_identity(self) -> str:
        raise NotImplementedError

    @property
    def provider(self) -> str:
        return "unknown"

    async def start(self, agent_session: AgentSession[Any], room: rtc.Room) -> None:
        from livekit.agents import get_job_context

        try:
            job_ctx = get_job_context()
        except RuntimeError:
            job_ctx = None
        if job_ctx is not None:
            job_ctx.add_shutdown_callback(self.aclose)
        self._room = room
        self._agent_session = agent_session

    async def wait_for_join(self, *, timeout: float | None = 30.0) -> None:
        return None

    async def aclose(self) -> None:
        self._agent_session = None
        self._room = None


if TYPE_CHECKING:
    from livekit.agents.voice.avatar import AvatarSession as AvatarSessionBase
else:
    try:
        from livekit.agents.voice.avatar import AvatarSession as AvatarSessionBase
    except ImportError:  # livekit-agents < 1.5.5
        AvatarSessionBase = _StandInAvatarSessionBase


def finish_interrupted_playback(sink: Any, position: float) -> int:
    """Report every reply still playing on ``sink`` as finished (interrupted); returns how many.

    When the avatar closes mid-reply nobody else will: the runner that would have reported it is
    gone, and ``AgentSession.aclose()`` then waits for that ``playback_finished`` (forever on
    livekit-agents 1.2). ``AudioOutput`` keeps its counts private in every 1.x; ``_pending_
    playback_count`` is their difference where it exists (1.5+), else the mangled names.
    """
    pending = getattr(sink, "_pending_playback_count", None)
    if pending is None:
        captured = getattr(sink, "_AudioOutput__playback_segments_count", 0)
        finished = getattr(sink, "_AudioOutput__playback_finished_count", 0)
        pending = captured - finished
    for _ in range(max(0, int(pending))):
        sink.on_playback_finished(playback_position=position, interrupted=True)
    return max(0, int(pending))


def detach_room(session: Any) -> None:
    """Forget the room before the base class closes a session rendered in this process.

    From 1.5.13 the base ``aclose`` removes the participant named ``avatar_identity`` from the
    room; for an in-process avatar that is the agent itself, which must stay.
    """
    room = getattr(session, "_room", None)
    handler = getattr(session, "_on_connection_state_changed", None)
    if room is not None and handler is not None:
        room.off("connection_state_changed", handler)
    session._room = None


def queue_audio_output(sample_rate: int) -> QueueAudioOutput:
    """The agent-side audio sink that feeds the avatar.

    ``wait_playback_start`` (1.5.6) makes the agent's "speaking" state follow the first
    rendered audio frame instead of the first captured one.
    """
    try:
        return QueueAudioOutput(sample_rate=sample_rate, wait_playback_start=True)  # type: ignore[call-arg]
    except TypeError:  # livekit-agents < 1.5.6
        return QueueAudioOutput(sample_rate=sample_rate)


def replace_audio_output(agent_session: AgentSession[Any], sink: AudioOutput) -> None:
    """Route the agent's speech into ``sink``.

    ``replace_audio_tail`` (1.6.1) keeps any transcription-sync wrappers in front of the sink;
    before it, assigning ``output.audio`` replaced the whole chain.
    """
    output = agent_session.output
    replace_tail = getattr(output, "replace_audio_tail", None)
    if replace_tail is not None:
        replace_tail(sink)
    else:
        output.audio = sink


def receiver_takes_frame_size() -> bool:
    """``DataStreamAudioReceiver(frame_size_ms=)`` arrived in livekit-agents 1.1; 1.0 always
    hands the agent's speech on 100 ms at a time."""
    import inspect

    from livekit.agents.voice.avatar import DataStreamAudioReceiver

    return "frame_size_ms" in inspect.signature(DataStreamAudioReceiver).parameters


def datastream_audio_receiver(room: Any, sender: str | None, piece_ms: int) -> Any:
    """LiveKit's receiver of an agent's speech, handing it on ``piece_ms`` at a time where
    the installed livekit-agents lets it (:func:`receiver_takes_frame_size`)."""
    from livekit.agents.voice.avatar import DataStreamAudioReceiver

    if receiver_takes_frame_size():
        return DataStreamAudioReceiver(room, sender_identity=sender, frame_size_ms=piece_ms)
    return DataStreamAudioReceiver(room, sender_identity=sender)


def job_context_or_none() -> Any:
    """The current job context, or None outside a job (``required=`` arrived in 1.1)."""
    from livekit.agents import get_job_context

    try:
        return get_job_context()
    except RuntimeError:
        return None


# --- bithuman -----------------------------------------------------------------------------

BITHUMAN_VERSION = _version("bithuman")


def bithuman_runtime_class() -> Any:
    """Import the runtime lazily: ``bithuman`` costs ~0.15 s and ~50 MB to import."""
    from bithuman import AsyncBithuman

    return AsyncBithuman


def model_missing_errors() -> tuple[type[BaseException], ...]:
    """bithuman 2.x raises ModelNotFoundError for a missing file; 0.8.1 raised FileNotFoundError."""
    import bithuman

    errors: list[type[BaseException]] = [FileNotFoundError]
    not_found = getattr(bithuman, "ModelNotFoundError", None)
    if isinstance(not_found, type):
        errors.append(not_found)
    return tuple(errors)


def bithuman_errors() -> tuple[type[BaseException], ...]:
    import bithuman

    base = getattr(bithuman, "BithumanError", None)
    return (base,) if isinstance(base, type) else ()


def runtime_accepts_output_size() -> bool:
    """``output_size=`` arrived with bithuman 2.x; 0.8.1's create() rejects it."""
    return BITHUMAN_VERSION >= (2,)


def token_alone_accepted() -> bool:
    """bithuman 2.x refuses ``token=`` without a secret; 0.8.1 accepted a runtime token alone."""
    return BITHUMAN_VERSION < (2,)


async def maybe_await(value: Any) -> Any:
    """Some runtime methods are sync in one bithuman version and async in another."""
    if asyncio.iscoroutine(value):
        return await value
    return value


def agent_worker(options: Any) -> tuple[Any, Callable[[], Awaitable[None]]]:
    """LiveKit's worker for ``options`` and its coroutine to run it registered, in dev mode.

    ``AgentServer.from_server_options`` replaced ``Worker(options)`` (livekit-agents 1.3); both
    speak the same protocol to the server.
    """
    try:
        from livekit.agents import AgentServer
    except ImportError:  # before 1.3
        from livekit.agents import Worker

        worker = Worker(options, devmode=True)
        return worker, worker.run
    server = AgentServer.from_server_options(options)
    return server, lambda: server.run(devmode=True)
