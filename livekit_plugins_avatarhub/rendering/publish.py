"""How the avatar's video track is published.

LiveKit's ``AvatarRunner`` publishes with default options (VP8, simulcast), which bitHuman
documents as giving black or laggy video for its avatars; they recommend H.264, one layer, at
the avatar's frame rate. The runner is handed a thin view of the room whose ``publish_track``
applies these options: no patching of LiveKit, and it works with every AvatarRunner version.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Literal

from livekit import rtc

from ..log import logger

VideoCodecName = Literal["h264", "vp8", "vp9", "av1", "h265"]


@dataclass(frozen=True)
class VideoPublishOptions:
    """Codec, layers and limits for the avatar's video track.

    ``max_fps=None`` caps at the avatar's own frame rate; ``max_bitrate=None`` takes the bitrate
    LiveKit's presets give a track of that size (1.7 Mbit/s at 720p).
    """

    codec: VideoCodecName = "h264"
    simulcast: bool = False
    max_fps: float | None = None
    max_bitrate: int | None = None

    def __post_init__(self) -> None:
        if self.codec.upper() not in rtc.VideoCodec.keys():
            raise ValueError(f"unknown video codec {self.codec!r}")
        if self.max_fps is not None and self.max_fps <= 0:
            raise ValueError("max_fps must be positive")
        if self.max_bitrate is not None and self.max_bitrate <= 0:
            raise ValueError("max_bitrate must be positive")

    def track_options(self, fps: float, width: int, height: int) -> rtc.TrackPublishOptions:
        options = rtc.TrackPublishOptions(
            source=rtc.TrackSource.SOURCE_CAMERA,
            video_codec=rtc.VideoCodec.Value(self.codec.upper()),
            simulcast=self.simulcast,
        )
        cap = min(fps, self.max_fps) if self.max_fps else fps
        # LiveKit's wire format needs both limits once either is set
        options.video_encoding.max_framerate = float(cap)
        options.video_encoding.max_bitrate = int(self.max_bitrate or default_bitrate(width, height))
        return options


#: LiveKit's video presets (pixels, bits per second), as its SDKs pick for a camera track
_PRESETS = (
    (640 * 360, 450_000),
    (960 * 540, 800_000),
    (1280 * 720, 1_700_000),
    (1920 * 1080, 3_000_000),
    (2560 * 1440, 5_000_000),
    (3840 * 2160, 8_000_000),
)


def default_bitrate(width: int, height: int) -> int:
    """The bitrate LiveKit's own presets give a track of this size (the nearest preset up)."""
    pixels = width * height
    return next((rate for size, rate in _PRESETS if pixels <= size), _PRESETS[-1][1])


class _Participant:
    def __init__(
        self, inner: Any, video_options: rtc.TrackPublishOptions, publishing: list[Any]
    ) -> None:
        self._inner = inner
        self._video_options = video_options
        self._publishing = publishing

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def publish_track(self, track: Any, options: Any = None) -> Any:
        if isinstance(track, rtc.LocalVideoTrack):
            options = self._video_options
        call = (
            self._inner.publish_track(track)
            if options is None
            else self._inner.publish_track(track, options)
        )
        # LiveKit publishes the track even if this await is cancelled (an avatar left while it
        # was publishing), and the SDK then never lists it: kept, so that the leave can wait for
        # it and take it down (see :func:`close_runner`)
        publish = asyncio.ensure_future(call)
        publish.add_done_callback(_retrieve)
        self._publishing.append(publish)
        return await asyncio.shield(publish)


def _retrieve(publish: asyncio.Future[Any]) -> None:
    if not publish.cancelled():
        publish.exception()  # a failure its caller, already gone, would never read


class PublishingRoom:
    """The room as the runner sees it: everything passes through except video publish options,
    and its publishes are kept until the leave (see :class:`_Participant`)."""

    def __init__(self, room: rtc.Room, video_options: rtc.TrackPublishOptions) -> None:
        self._room = room
        self._video_options = video_options
        self.publishing: list[asyncio.Future[Any]] = []

    @property
    def local_participant(self) -> Any:
        # looked up on each use: an unconnected room has no local participant yet
        return _Participant(self._room.local_participant, self._video_options, self.publishing)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._room, name)


def avatar_runner(
    room: Any, generator: Any, receiver: Any, video_options: VideoPublishOptions
) -> Any:
    """LiveKit's AvatarRunner over ``generator``, publishing video with ``video_options``."""
    from typing import cast

    from livekit.agents.voice.avatar import AvatarOptions, AvatarRunner

    width, height = generator.video_resolution
    options = AvatarOptions(
        video_width=width,
        video_height=height,
        video_fps=generator.video_fps,
        audio_sample_rate=generator.audio_sample_rate,
        audio_channels=1,
    )
    publishing = PublishingRoom(
        room, video_options.track_options(generator.video_fps, width, height)
    )
    runner = AvatarRunner(
        cast(rtc.Room, publishing), audio_recv=receiver, video_gen=generator, options=options
    )
    watch = getattr(generator, "watch", None)
    if watch is not None:  # the generator reads the publisher's lip sync off its queues
        watch(runner.av_sync)
    return runner


async def close_runner(runner: Any) -> None:
    """Close an AvatarRunner, started or not.

    ``AvatarRunner.aclose()`` before ``start()`` returned raises, and a runner's start waits
    until someone subscribes to its tracks; an avatar left before that (a join/leave with no
    viewer yet) used to keep its synchroniser task, its native audio and video sources and its
    audio receiver forever, about a megabyte per avatar. So close what its constructor opened.
    """
    await _unpublish(runner)
    try:
        if getattr(runner, "_read_audio_atask", None) is not None:
            await runner.aclose()
            return
        await _close_unstarted(runner)
    finally:
        sync = getattr(runner, "_av_sync", None)
        await _finish_capture_task(sync)
        _drop_finished_tasks(runner, sync)


async def _close_unstarted(runner: Any) -> None:
    parts = ("_audio_recv", "_av_sync", "_audio_source", "_video_source")
    for part in (getattr(runner, name, None) for name in parts):
        if part is None:
            continue
        try:
            await part.aclose()
        except Exception as err:  # a part that never started may refuse: nothing to free
            logger.debug("closing an avatar runner that never started: %s", err)


async def _finish_capture_task(sync: Any) -> None:
    """``rtc.AVSynchronizer.aclose()`` cancels its capture task without waiting for it."""
    task = getattr(sync, "_capture_video_task", None)
    if isinstance(task, asyncio.Task) and not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _drop_finished_tasks(*parts: Any) -> None:
    """Let go of the finished tasks a closed runner and its synchroniser keep.

    A cancelled task keeps its CancelledError, whose traceback holds the task's frames, which
    hold the runner (and through it the room, the runtime and the native audio and video
    sources): a cycle that only Python's full collection frees. In a service hosting avatar
    after avatar those came every few hundred avatars, and RSS swung by 250 MB
    (``bench/soak_service.py``); without the cycle, a left avatar's memory goes at once.
    """
    for part in parts:
        for name, value in list(getattr(part, "__dict__", {}).items()):
            if isinstance(value, asyncio.Task) and value.done():
                setattr(part, name, None)


async def _unpublish(runner: Any, timeout: float = 5.0) -> None:
    """Take the runner's own tracks out of the room (an agent's room stays, and so would a
    frozen avatar track in it); see :func:`leave_room` for what leaving them costs.

    That includes a track still being published: LiveKit finishes the publish even though the
    runner stopped waiting for it, and a room left with it published keeps its native audio
    source (a thread) and about 0.8 MB for good (``tests/test_real_soak.py`` found it)."""
    room = getattr(runner, "_room", None)
    participant = _local_participant(room) if _connected(room) else None
    publications = [getattr(runner, n, None) for n in ("_video_publication", "_audio_publication")]
    publishing = getattr(room, "publishing", None) or []
    for publish in publishing if participant is not None else ():
        try:
            publications.append(await asyncio.wait_for(asyncio.shield(publish), timeout))
        except Exception as err:  # it failed, or never completes: nothing was published
            logger.debug("a publish in flight when the avatar left: %s", err)
    publishing.clear()  # their publications hold the tracks
    if participant is None:  # disconnected: the server took everything down
        return
    for sid in dict.fromkeys(p.sid for p in publications if p is not None):
        try:
            await asyncio.wait_for(participant.unpublish_track(sid), timeout)
        except Exception as err:  # already gone, or the connection is
            logger.debug("unpublishing the avatar's track: %s", err)


async def leave_room(room: Any, timeout: float = 5.0) -> None:
    """Leave ``room`` so that LiveKit's native side frees it: tracks unpublished, RPC methods
    unregistered, then disconnect.

    Measured with livekit 1.1.21 against a real server (``bench/soak_service.py``), per room a
    service hosts and leaves:

    - disconnected with its audio and video still published: about 0.8 MB of native memory
      kept for good; unpublished first, nothing;
    - disconnected with an RPC method still registered (ours for gestures, or the
      ``lk.clear_buffer`` one LiveKit's ``DataStreamAudioReceiver`` registers and never
      unregisters): about 0.55 MB kept for good, as the native handler holds the room;
      unregistered first, nothing.
    """
    await _unpublish_all(room, timeout)
    participant = _local_participant(room)
    # every method registered through the SDK, livekit-agents' included (it reads this too)
    for method in list(getattr(participant, "_rpc_handlers", None) or {}):
        try:
            participant.unregister_rpc_method(method)
        except Exception as err:  # a room whose native handle is gone: nothing to free
            logger.debug("unregistering RPC method %s: %s", method, err)
    await room.disconnect()


async def _unpublish_all(room: Any, timeout: float) -> None:
    if not _connected(room):  # the server closed the room: nothing is published any more,
        return  # and each unpublish would wait out its timeout
    participant = _local_participant(room)
    publications = getattr(participant, "track_publications", None) or {}
    for sid in list(publications):
        try:
            await asyncio.wait_for(participant.unpublish_track(sid), timeout)
        except Exception as err:  # already gone, or the connection is: nothing more to free
            logger.debug("unpublishing %s: %s", sid, err)


def _connected(room: Any) -> bool:
    try:
        return bool(room is not None and room.isconnected())
    except Exception:
        return False


def _local_participant(room: Any) -> Any:
    """The room's local participant, or None: an rtc.Room that never connected raises."""
    try:
        return room.local_participant if room is not None else None
    except Exception:
        return None
