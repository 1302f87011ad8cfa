"""How the avatar's video track is published.

LiveKit's ``AvatarRunner`` publishes with default options (VP8, simulcast), which bitHuman
documents as giving black or laggy video for its avatars; they recommend H.264, one layer, at
the avatar's frame rate. The runner is handed a thin view of the room whose ``publish_track``
applies these options: no patching of LiveKit, and it works with every AvatarRunner version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from livekit import rtc

VideoCodecName = Literal["h264", "vp8", "vp9", "av1", "h265"]


@dataclass(frozen=True)
class VideoPublishOptions:
    """Codec, layers and limits for the avatar's video track.

    ``max_fps=None`` caps at the avatar's own frame rate; ``max_bitrate=None`` lets LiveKit pick.
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

    def track_options(self, fps: float) -> rtc.TrackPublishOptions:
        options = rtc.TrackPublishOptions(
            source=rtc.TrackSource.SOURCE_CAMERA,
            video_codec=rtc.VideoCodec.Value(self.codec.upper()),
            simulcast=self.simulcast,
        )
        cap = min(fps, self.max_fps) if self.max_fps else fps
        options.video_encoding.max_framerate = float(cap)
        if self.max_bitrate:
            options.video_encoding.max_bitrate = int(self.max_bitrate)
        return options


class _Participant:
    def __init__(self, inner: Any, video_options: rtc.TrackPublishOptions) -> None:
        self._inner = inner
        self._video_options = video_options

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def publish_track(self, track: Any, options: Any = None) -> Any:
        if isinstance(track, rtc.LocalVideoTrack):
            options = self._video_options
        if options is None:
            return await self._inner.publish_track(track)
        return await self._inner.publish_track(track, options)


class PublishingRoom:
    """The room as the runner sees it: everything passes through except video publish options."""

    def __init__(self, room: rtc.Room, video_options: rtc.TrackPublishOptions) -> None:
        self._room = room
        self._video_options = video_options

    @property
    def local_participant(self) -> Any:
        # looked up on each use: an unconnected room has no local participant yet
        return _Participant(self._room.local_participant, self._video_options)

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
    publishing = PublishingRoom(room, video_options.track_options(generator.video_fps))
    return AvatarRunner(
        cast(rtc.Room, publishing), audio_recv=receiver, video_gen=generator, options=options
    )
