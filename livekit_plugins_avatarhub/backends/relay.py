"""The agent's speech to a remote avatar, or, when the avatar is gone, into the room itself.

``AvatarRelay`` is the AgentSession's audio output in ``mode="participant"`` and
``mode="dispatch"``. While the avatar is there it hands every frame to LiveKit's
``DataStreamAudioOutput``, keeping references to the reply in progress. The avatar is taken
for gone when it leaves the room, or when its audio stops arriving in the middle of a reply
(a killed worker stays in LiveKit's room for ~20 s, but its packets stop at once). Then the
part of the reply it had not played yet, and everything after it, is published by the agent's
own participant as a plain audio track, the backend is asked once to bring the avatar back,
and a returned avatar takes the speech again at the next pause between replies.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

from livekit.agents.voice.io import AudioOutput

from livekit import rtc

from ..log import logger
from ..rendering.failover import AvatarState, AvatarStateChanged, OnStateChanged

#: how long a reply's audio from the avatar may stop before the avatar is taken for gone
#: (Opus sends a packet at least every 400 ms even in silence)
MEDIA_TIMEOUT = 0.6
POLL = 0.1
#: after LiveKit reconnected the agent, how long the avatar may take to be in the room again
RECONNECT_GRACE = 5.0

Relaunch = Callable[[], Awaitable[None]]


def _init_output(output: AudioOutput, sample_rate: int | None) -> None:
    """``AudioOutput.__init__`` across livekit-agents 1.x (``label`` and ``capabilities``
    arrived after 1.0)."""
    params = inspect.signature(AudioOutput.__init__).parameters
    kwargs: dict[str, Any] = {"next_in_chain": None, "sample_rate": sample_rate}
    if "label" in params:
        kwargs["label"] = "avatarhub.relay"
    if "capabilities" in params:
        from livekit.agents.voice.io import AudioOutputCapabilities

        kwargs["capabilities"] = AudioOutputCapabilities(pause=False)
    AudioOutput.__init__(output, **kwargs)


def datastream_output(room: rtc.Room, identity: str) -> AudioOutput:
    """LiveKit's DataStream avatar audio to ``identity``; it holds the audio until the avatar
    publishes video (``wait_remote_track``, livekit-agents 1.1+)."""
    from livekit.agents.voice.avatar import DataStreamAudioOutput

    try:
        return DataStreamAudioOutput(  # type: ignore[call-arg]
            room, destination_identity=identity, wait_remote_track=rtc.TrackKind.KIND_VIDEO
        )
    except TypeError:  # livekit-agents 1.0
        return DataStreamAudioOutput(room, destination_identity=identity)


class AvatarRelay(AudioOutput):
    """See the module docstring. ``relaunch`` asks for the avatar again (once)."""

    def __init__(
        self,
        room: rtc.Room,
        identity: str,
        *,
        relaunch: Relaunch | None = None,
        on_state_changed: OnStateChanged | None = None,
        media_timeout: float = MEDIA_TIMEOUT,
    ) -> None:
        _init_output(self, None)
        self._room, self._identity = room, identity
        self._relaunch, self._on_state_changed = relaunch, on_state_changed
        self._media_timeout = media_timeout
        self.state: AvatarState = "rendering"
        self._remote: AudioOutput | None = None
        self._attach(datastream_output(room, identity))
        # the plain track is published now, so that listeners have subscribed to it before
        # it is needed: audio sent to a track nobody has subscribed to yet is lost
        self._plain = _PlainAudio(room, self._plain_finished)
        # the reply in progress: its frames (references), when it began, when the avatar
        # began to play it, whether all of it has been handed over
        self._segment: list[rtc.AudioFrame] = []
        self._in_segment = False
        self._first_at = 0.0
        self._started_at: float | None = None
        self._flushed = False
        self._back = False  # a relaunched avatar is in the room, waiting for a pause
        self._failed_at = 0.0
        self._retired = False  # stopped on purpose: the avatar is not asked for again
        self._ask_when_joined = False  # it left an empty room: ask again when someone comes
        self._tasks: set[asyncio.Task[Any]] = set()
        room.on("participant_connected", self._on_joined)
        room.on("participant_disconnected", self._on_left)
        room.on("track_published", self._on_published)
        room.on("reconnecting", self._on_reconnecting)
        room.on("reconnected", self._on_reconnected)
        self._reconnecting_at: float | None = None
        self._spawn(self._watch_media(), "avatarhub-avatar-watch")

    # -- the AudioOutput interface --------------------------------------------------------

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        if not self._in_segment:
            self._begin_segment()
        await super().capture_frame(frame)
        self._segment.append(frame)
        if self._remote is not None:
            await self._remote.capture_frame(frame)
        else:
            self._plain.put(frame)

    def flush(self) -> None:
        super().flush()
        self._flushed = True
        if self._remote is not None:
            self._remote.flush()
        else:
            self._plain.end()

    def clear_buffer(self) -> None:
        if self._remote is not None:
            self._remote.clear_buffer()
        else:
            self._plain.clear()

    # -- the avatar's side ------------------------------------------------------------------

    def _attach(self, remote: AudioOutput) -> None:
        self._remote = remote
        remote.on("playback_finished", self._remote_finished)
        remote.on("playback_started", self._remote_started)

    def _detach(self) -> None:
        remote, self._remote = self._remote, None
        if remote is not None:
            remote.off("playback_finished", self._remote_finished)
            remote.off("playback_started", self._remote_started)

    def _remote_started(self, event: Any) -> None:
        self._started_at = time.monotonic()
        started = getattr(self, "on_playback_started", None)
        if started is not None:  # livekit-agents 1.5+
            started(created_at=getattr(event, "created_at", time.time()))

    def _remote_finished(self, event: Any) -> None:
        self._end_segment()
        self.on_playback_finished(
            playback_position=event.playback_position, interrupted=event.interrupted
        )

    def _begin_segment(self) -> None:
        if self._back and self._remote is None and self._plain.idle:
            self._take_back()
        self._in_segment, self._segment, self._flushed = True, [], False
        self._first_at, self._started_at = time.monotonic(), None
        if self._remote is None:
            started = getattr(self, "on_playback_started", None)
            if started is not None:
                started(created_at=time.time())

    def _end_segment(self) -> None:
        self._in_segment, self._segment = False, []

    def _on_left(self, participant: rtc.RemoteParticipant) -> None:
        # while this side reconnects, everyone seems to leave and come back: not a failure
        if participant.identity == self._identity and _connected(self._room):
            self._gone("the avatar left the room", stopped_ago=0.0)

    def _on_reconnecting(self, *_: Any) -> None:
        self._reconnecting_at = time.monotonic()

    def _on_reconnected(self, *_: Any) -> None:
        """After LiveKit reconnected this side, the avatar has a while to be back too. A reply
        that was streaming to it was cut with the connection (it would never be reported
        played): its rest goes out as plain audio, and the next reply to the avatar again."""
        since, self._reconnecting_at = self._reconnecting_at, None
        if self._remote is not None and self._in_segment:
            self._detach()
            self._replay_rest(time.monotonic() - (since or time.monotonic()))
            self._back = True  # a fresh stream to the avatar from the next reply on

        async def check() -> None:
            await asyncio.sleep(RECONNECT_GRACE)
            if self._identity not in self._room.remote_participants:
                self._back = False
                self._gone("the avatar did not come back after LiveKit reconnected", stopped_ago=0)

        if self._remote is not None or self._back:
            self._spawn(check(), "avatarhub-avatar-after-reconnect")

    def _on_joined(self, participant: rtc.RemoteParticipant) -> None:
        if self._ask_when_joined and participant.kind != rtc.ParticipantKind.PARTICIPANT_KIND_AGENT:
            self._ask_when_joined = False
            assert self._relaunch is not None
            self._set_state("recovering", f"{participant.identity} joined: asking for the avatar")
            self._spawn(self._ask_again(self._relaunch), "avatarhub-avatar-relaunch")

    def retire(self, reason: str) -> None:
        """Stop sending speech to the avatar on purpose (a session limit): the agent speaks on
        as plain audio, and the avatar is not asked for again."""
        self._retired, self._ask_when_joined = True, False
        if self._remote is not None:
            self._gone(reason, stopped_ago=0.0)
        elif self.state != "audio_only":
            self._set_state("audio_only", reason)
        for task in list(self._tasks):
            if task.get_name() == "avatarhub-avatar-relaunch":
                task.cancel()

    def _on_published(self, publication: Any, participant: rtc.RemoteParticipant) -> None:
        """The avatar publishes video: asked for again, or back by itself (after LiveKit
        itself came back, say), it takes the speech again."""
        if (
            participant.identity == self._identity
            and publication.kind == rtc.TrackKind.KIND_VIDEO
            and self._remote is None
            and not self._retired
        ):
            self._ask_when_joined = False
            self._back = True
            if not self._in_segment:
                self._take_back()

    async def _watch_media(self) -> None:
        """During a reply the avatar's audio must keep arriving; a worker that died stops it
        at once, long before LiveKit removes its participant."""
        last: Any = None
        since = time.monotonic()
        while True:
            await asyncio.sleep(POLL)
            now = time.monotonic()
            if self._remote is None or not self._in_segment or not _connected(self._room):
                last, since = None, now  # (nothing arrives from anyone while reconnecting)
                continue
            playing_since = self._started_at or self._first_at + self._media_timeout
            received = await self._received()
            if received != last or received is None or now - playing_since < 0:
                last, since = received, now
            elif now - since > self._media_timeout:
                self._gone(
                    f"the avatar's audio stopped arriving for {now - since:.1f} s",
                    stopped_ago=now - since,
                )

    async def _received(self) -> Any:
        """Packets received so far on the avatar's audio track (subscribing if needed), or
        None when there is no such track to read."""
        try:
            return await self._packets_received()
        except Exception as err:  # the track is going away, or this room cannot say
            logger.debug("reading the avatar's audio statistics: %s", err)
            return None

    async def _packets_received(self) -> Any:
        avatar = self._room.remote_participants.get(self._identity)
        if avatar is None:
            return None
        for publication in avatar.track_publications.values():
            if publication.kind != rtc.TrackKind.KIND_AUDIO:
                continue
            if not publication.subscribed:
                publication.set_subscribed(True)
            track = publication.track
            if track is None:
                return None
            for entry in await track.get_stats():
                if entry.WhichOneof("stats") == "inbound_rtp":
                    return entry.inbound_rtp.received.packets_received
        return None

    # -- failing over, and back -------------------------------------------------------------

    def _gone(self, reason: str, *, stopped_ago: float) -> None:
        if self._remote is None:
            return
        self._detach()
        self._failed_at = time.monotonic()
        ask = self._relaunch is not None and not self._retired
        if ask and nobody_but_agents(self._room):  # an idle leave: wait for an audience
            ask, self._ask_when_joined = False, True
            reason += ", with nobody but agents in it"
        self._set_state("recovering" if ask else "audio_only", reason)
        if self._in_segment:  # the rest of this reply goes out as plain audio
            self._replay_rest(stopped_ago)
        if ask:
            assert self._relaunch is not None
            self._spawn(self._ask_again(self._relaunch), "avatarhub-avatar-relaunch")

    def _replay_rest(self, stopped_ago: float) -> None:
        """The part of the reply in progress the avatar did not play, as plain audio."""
        start = self._started_at or self._first_at
        played = max(0.0, time.monotonic() - stopped_ago - start)
        plain = self._plain
        plain.resume_at(played)
        for frame in _after(self._segment, played):
            plain.put(frame)
        if self._flushed:
            plain.end()

    async def _ask_again(self, relaunch: Relaunch) -> None:
        try:
            await relaunch()
        except Exception as err:
            self._set_state("audio_only", f"asking for the avatar again failed: {err}")
            return
        logger.info("asked for the avatar %s again", self._identity)

    def _take_back(self) -> None:
        self._back = False
        self._attach(datastream_output(self._room, self._identity))
        if self.state != "rendering":  # (after a reconnect it never stopped being the avatar)
            outage = time.monotonic() - self._failed_at
            self._set_state("rendering", f"the avatar is back after {outage:.1f} s")

    def _set_state(self, new: AvatarState, reason: str) -> None:
        old, self.state = self.state, new
        if new == "rendering":
            logger.info("the avatar %s speaks again: %s", self._identity, reason)
        elif self._retired or self._ask_when_joined or (new == "recovering" and old != "rendering"):
            logger.info("the avatar %s: %s", self._identity, reason)
        elif old == "rendering":
            logger.warning(
                "the avatar %s is gone (%s); the agent's speech goes on as plain audio",
                self._identity,
                reason,
            )
        else:
            logger.error("the avatar %s is not coming back (%s)", self._identity, reason)
        if self._on_state_changed is not None:
            try:
                self._on_state_changed(AvatarStateChanged(old, new, reason))
            except Exception:
                logger.exception("an avatar_state_changed handler failed")

    def _plain_finished(self, position: float, interrupted: bool) -> None:
        self._end_segment()
        self.on_playback_finished(playback_position=position, interrupted=interrupted)

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        self._room.off("participant_connected", self._on_joined)
        self._room.off("participant_disconnected", self._on_left)
        self._room.off("track_published", self._on_published)
        self._room.off("reconnecting", self._on_reconnecting)
        self._room.off("reconnected", self._on_reconnected)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._plain.aclose()


def _connected(room: rtc.Room) -> bool:
    state = getattr(room, "connection_state", rtc.ConnectionState.CONN_CONNECTED)
    return bool(state == rtc.ConnectionState.CONN_CONNECTED)


def nobody_but_agents(room: rtc.Room) -> bool:
    """Nobody in the room but agents (this agent, a second one, an avatar): no audience."""
    agent = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
    return all(p.kind == agent for p in room.remote_participants.values())


def _after(frames: list[rtc.AudioFrame], seconds: float) -> list[rtc.AudioFrame]:
    """``frames`` from ``seconds`` into them on (the first one cut there)."""
    out: list[rtc.AudioFrame] = []
    for frame in frames:
        duration = frame.samples_per_channel / frame.sample_rate
        if seconds >= duration:
            seconds -= duration
            continue
        skip = int(seconds * frame.sample_rate)
        seconds = 0.0
        if skip:
            channels = frame.num_channels
            frame = rtc.AudioFrame(
                frame.data[skip * channels :].tobytes(),
                frame.sample_rate,
                channels,
                frame.samples_per_channel - skip,
            )
        out.append(frame)
    return out


#: the plain track's rate, LiveKit's own Opus rate: speech at any other rate is resampled
PLAIN_RATE = 48000


class _PlainAudio:
    """The agent's own audio track, published (silent) as soon as it is made, fed in real
    time by a task when the avatar is gone."""

    def __init__(self, room: rtc.Room, finished: Callable[[float, bool], None]) -> None:
        self._room, self._finished = room, finished
        self._queue: asyncio.Queue[rtc.AudioFrame | None] = asyncio.Queue()
        self._source: rtc.AudioSource | None = None
        self._resampler: rtc.AudioResampler | None = None
        self._position = 0.0  # of the reply in progress, in seconds handed to the source
        self._published: asyncio.Task[rtc.AudioSource] = asyncio.ensure_future(self._publish())
        self._published.add_done_callback(self._publish_done)
        self._task = asyncio.ensure_future(self._play())
        self.idle = True

    def resume_at(self, position: float) -> None:
        self._position = position

    def put(self, frame: rtc.AudioFrame) -> None:
        self.idle = False
        self._queue.put_nowait(frame)

    def end(self) -> None:
        self._queue.put_nowait(None)

    def clear(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()
        queued = 0.0
        if self._source is not None:
            queued = self._source.queued_duration
            self._source.clear_queue()
        if not self.idle:
            self.idle = True
            position, self._position = max(0.0, self._position - queued), 0.0
            self._finished(position, True)

    async def _play(self) -> None:
        while True:
            frame = await self._queue.get()
            if frame is None:  # the reply's end: report it once it has been heard
                if self._source is not None:
                    for piece in self._resampler.flush() if self._resampler else ():
                        await self._source.capture_frame(piece)
                    await self._source.wait_for_playout()
                if not self.idle:
                    self.idle = True
                    position, self._position = self._position, 0.0
                    self._finished(position, False)
                continue
            source = await self._source_for()
            if source is None:
                continue
            for piece in self._resampled(frame, source.sample_rate):
                await source.capture_frame(piece)
                self._position += piece.samples_per_channel / piece.sample_rate

    async def _publish(self) -> rtc.AudioSource:
        source = rtc.AudioSource(PLAIN_RATE, 1)
        track = rtc.LocalAudioTrack.create_audio_track("agent_audio", source)
        options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        await self._room.local_participant.publish_track(track, options)
        return source

    def _publish_done(self, task: asyncio.Task[rtc.AudioSource]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.warning(
                "the agent could not publish its own audio track, so without the avatar its "
                "speech is not heard: %s",
                task.exception(),
            )

    async def _source_for(self) -> rtc.AudioSource | None:
        """The published track's source; None when publishing failed."""
        if self._source is None:
            await asyncio.wait([self._published])
            if not self._published.cancelled() and self._published.exception() is None:
                self._source = self._published.result()
        return self._source

    def _resampled(self, frame: rtc.AudioFrame, rate: int) -> list[rtc.AudioFrame]:
        if frame.sample_rate == rate:
            return [frame]
        if self._resampler is None:
            self._resampler = rtc.AudioResampler(frame.sample_rate, rate, num_channels=1)
        return list(self._resampler.push(frame))

    async def aclose(self) -> None:
        self._task.cancel()
        self._published.cancel()
        await asyncio.gather(self._task, self._published, return_exceptions=True)
        if self._source is not None:
            await self._source.aclose()
