"""The conversation survives the avatar: a runtime that fails mid-reply leaves the agent's voice
unbroken, and the avatar comes back. Rendered here, into a test room read back with LiveKit's
own streams (the real-room version is tests/test_real_failover.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
from livekit.agents import Agent, AgentSession

from livekit import rtc
from livekit_plugins_avatarhub import AvatarHubError, AvatarSession, AvatarStateChanged
from livekit_plugins_avatarhub.rendering.failover import PendingAudio

from conftest import SECRET
from fakes import FakeRoom, sine_frames

REPLY = 2.0  # seconds of speech
RATE = 16000


@dataclass
class Heard:
    """What a subscriber gets from the agent's audio track: when each loud frame came, and
    how many loud samples in all."""

    times: list[float] = field(default_factory=list)
    loud_samples: int = 0

    def add(self, frame: rtc.AudioFrame) -> None:
        samples = np.frombuffer(frame.data, np.int16).astype(np.float32)
        if samples.size and float(np.sqrt(np.mean(samples**2))) > 3000:
            self.times.append(time.monotonic())
            self.loud_samples += frame.samples_per_channel

    async def quiet(self, for_s: float = 0.3, timeout: float = 5.0) -> None:
        """Wait until nothing loud has come for ``for_s``: the last frames of a reply are still
        on their way to the subscriber when ``wait_for_playout()`` returns."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = self.times[-1] if self.times else 0.0
            if time.monotonic() - last >= for_s:
                return
            await asyncio.sleep(0.05)

    @property
    def longest_silence(self) -> float:
        gaps = np.diff(self.times)
        return float(gaps.max()) if gaps.size else float("inf")


@pytest.fixture
def crashable(fake_bithuman, monkeypatch):
    """The runtime double, with ``crash(runtime, ...)`` able to break a run in progress; the
    attempts to bring it back come 50 ms apart instead of 0.5, 1 and 2 s."""
    from livekit_plugins_avatarhub.rendering.failover import Failover

    monkeypatch.setattr(Failover, "delay", lambda self, attempt: 0.05)
    original = fake_bithuman.run

    async def run(self):
        async for frame in original(self):
            yield frame
            plan = getattr(self, "crash_plan", None)
            if plan is not None:
                plan[0] -= 1
                if plan[0] <= 0:
                    self.crash_plan = None  # once: run() may be called again
                    if plan[1] == "raise":
                        raise RuntimeError("engine crashed")
                    await asyncio.Event().wait()  # hangs: no frame ever again

    monkeypatch.setattr(fake_bithuman, "run", run)
    return fake_bithuman


def crash(runtime, *, after_frames: int, how: str = "raise") -> None:
    """Make ``runtime.run()`` fail ``after_frames`` frames from now: raise, or hang."""
    runtime.crash_plan = [after_frames, how]


@contextlib.asynccontextmanager
async def talking(avatar: AvatarSession):
    room = FakeRoom()
    session = AgentSession()
    events: list[AvatarStateChanged] = []
    avatar.on("avatar_state_changed", events.append)
    await avatar.start(session, room=room)
    await session.start(agent=Agent(instructions="test"))
    heard = Heard()
    readers: list[asyncio.Task] = []
    try:
        yield session, room, heard, events, readers
    finally:
        await heard.quiet()
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await avatar.aclose()
        await session.aclose()


async def listen(room: FakeRoom, heard: Heard, readers: list[asyncio.Task]) -> None:
    await room.wait_published(rtc.TrackKind.KIND_VIDEO)
    publication = room.local_participant.publication(rtc.TrackKind.KIND_AUDIO)
    stream = rtc.AudioStream(publication.track, sample_rate=RATE, num_channels=1)

    async def read() -> None:
        try:
            async for event in stream:
                heard.add(event.frame)
        finally:
            await stream.aclose()

    readers.append(asyncio.create_task(read()))


async def until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("how", ["raise", "hang"])
async def test_a_runtime_failing_mid_reply_leaves_the_whole_reply_heard(how, model_file, crashable):
    avatar = AvatarSession(model_path=model_file, api_secret=SECRET, output_size=(160, 120))
    async with talking(avatar) as (session, room, heard, events, readers):
        first = avatar.runtime
        await listen(room, heard, readers)
        await asyncio.sleep(1.0)
        handle = session.say("a long answer", audio=sine_frames(REPLY))
        crash(first, after_frames=20, how=how)  # most of a second into the reply
        await asyncio.wait_for(handle.wait_for_playout(), 15)
        assert not handle.interrupted
        await until(lambda: avatar.avatar_state == "rendering" and len(events) == 2)

    # every sample of the reply was heard once: nothing lost with the runtime, nothing twice
    assert REPLY * RATE * 0.95 <= heard.loud_samples <= REPLY * RATE * 1.05
    assert heard.longest_silence < 1.0
    failed, back = events
    assert (failed.old_state, failed.new_state) == ("rendering", "recovering")
    assert ("engine crashed" if how == "raise" else "no frame for") in failed.reason
    assert (back.old_state, back.new_state) == ("recovering", "rendering")
    assert len(crashable.created) == 2 and first.cleaned_up  # loaded again, old one freed


async def test_the_avatar_is_back_for_the_next_reply(model_file, crashable):
    avatar = AvatarSession(model_path=model_file, api_secret=SECRET, output_size=(160, 120))
    async with talking(avatar) as (session, room, heard, events, readers):
        crash(avatar.runtime, after_frames=10)
        await listen(room, heard, readers)
        await until(lambda: avatar.avatar_state == "rendering" and len(events) == 2)
        renewed = avatar.runtime
        assert renewed is crashable.created[1]
        handle = session.say("hello again", audio=sine_frames(1.0))
        await asyncio.wait_for(handle.wait_for_playout(), 10)
        await avatar.trigger("wave")  # gestures work again
    assert renewed.pushed_controls[-1].action == "wave"
    assert heard.loud_samples >= RATE * 0.95


async def test_a_runtime_passed_in_is_run_again_not_replaced(model_file, crashable):
    runtime = await crashable.create(model_path=model_file, api_secret=SECRET)
    avatar = AvatarSession(runtime=runtime)
    async with talking(avatar) as (session, room, heard, events, readers):
        crash(runtime, after_frames=5)
        await listen(room, heard, readers)
        await until(lambda: len(events) == 2)
        assert avatar.avatar_state == "rendering" and avatar.runtime is runtime
        handle = session.say("hello", audio=sine_frames(1.0))
        await asyncio.wait_for(handle.wait_for_playout(), 10)
    assert len(crashable.created) == 1 and runtime.cleaned_up == 0  # the caller's, kept
    assert heard.loud_samples >= RATE * 0.95


async def test_with_no_runtime_left_the_agent_speaks_on_in_audio_only(
    model_file, crashable, monkeypatch
):
    avatar = AvatarSession(model_path=model_file, api_secret=SECRET, output_size=(160, 120))
    async with talking(avatar) as (session, room, heard, events, readers):
        crash(avatar.runtime, after_frames=10)
        crashable.auth_reachable = False  # every attempt to load it again fails
        await listen(room, heard, readers)
        await until(lambda: avatar.avatar_state == "audio_only", timeout=15)
        with pytest.raises(AvatarHubError, match="not rendering"):
            await avatar.trigger("wave")
        handle = session.say("still here", audio=sine_frames(1.5))
        await asyncio.wait_for(handle.wait_for_playout(), 10)
        assert not handle.interrupted
    assert [e.new_state for e in events] == ["recovering", "audio_only"]
    assert "3 attempts failed" in events[-1].reason
    assert heard.loud_samples >= 1.5 * RATE * 0.95


async def test_an_interruption_in_audio_only_stops_the_speech(model_file, crashable):
    avatar = AvatarSession(model_path=model_file, api_secret=SECRET, output_size=(160, 120))
    async with talking(avatar) as (session, room, heard, events, readers):
        crash(avatar.runtime, after_frames=10)
        crashable.auth_reachable = False
        await listen(room, heard, readers)
        await until(lambda: avatar.avatar_state != "rendering")
        handle = session.say("a long answer", audio=sine_frames(5.0))
        await asyncio.sleep(1.0)
        session.interrupt()
        await asyncio.wait_for(handle.wait_for_playout(), 5)
        assert handle.interrupted
        heard_then = heard.loud_samples
        await asyncio.sleep(0.5)
        heard_later = heard.loud_samples
    assert heard_later - heard_then < 0.3 * RATE  # it stopped, not 4 more seconds


def _frame(samples: int, rate: int = RATE, start: int = 0) -> rtc.AudioFrame:
    pcm = np.arange(start, start + samples, dtype=np.int16)
    return rtc.AudioFrame(pcm.tobytes(), rate, 1, samples)


def test_pending_audio_forgets_what_the_runtime_played_and_keeps_the_rest():
    pending = PendingAudio()
    pending.add(_frame(320))
    pending.add(_frame(320, start=320))
    pending.end()
    pending.add(_frame(480, rate=24000))
    pending.played(400, RATE)  # all of the first frame, 80 samples of the second
    rest = pending.pop()
    assert rest is not None and rest.samples_per_channel == 240
    assert np.frombuffer(rest.data, np.int16)[0] == 400  # cut exactly where playback stopped
    assert pending.pop() is None  # the reply's end
    pending.played(160, RATE)  # 160 at 16 kHz = 240 at 24 kHz
    last = pending.pop()
    assert last is not None and last.samples_per_channel == 240 and not pending


def test_pending_audio_drops_a_finished_replys_padding_but_not_the_next_reply():
    pending = PendingAudio()
    pending.add(_frame(300))
    pending.end()
    pending.add(_frame(320))
    pending.played(640, RATE)  # the runtime pads the reply's last frame
    pending.played_end()
    frame = pending.pop()
    assert frame is not None and frame.samples_per_channel == 320 and pending.in_reply
    pending.clear()
    assert not pending and not pending.in_reply


# -- cost guards: the avatar stops rendering on purpose, the agent speaks on ------------------


async def test_the_session_limit_stops_rendering_and_frees_the_runtime(model_file, crashable):
    avatar = AvatarSession(
        model_path=model_file, api_secret=SECRET, output_size=(160, 120), max_session_seconds=1.5
    )
    async with talking(avatar) as (session, room, heard, events, readers):
        room.join("user-1", rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD)
        runtime = avatar.runtime
        await listen(room, heard, readers)
        handle = session.say("a long answer", audio=sine_frames(REPLY))
        await asyncio.wait_for(handle.wait_for_playout(), 15)
        assert not handle.interrupted
        assert avatar.avatar_state == "audio_only" and runtime.cleaned_up == 1
        with pytest.raises(AvatarHubError, match="not rendering"):
            avatar.runtime
    assert [(e.new_state, e.reason) for e in events] == [
        ("audio_only", "the session limit of 1.5 s was reached")
    ]
    # the limit cut the avatar mid-reply, not the reply
    assert REPLY * RATE * 0.95 <= heard.loud_samples <= REPLY * RATE * 1.05
    assert len(crashable.created) == 1  # and it was not loaded again


async def test_an_avatar_alone_with_agents_stops_until_someone_joins(model_file, crashable):
    avatar = AvatarSession(
        model_path=model_file, api_secret=SECRET, output_size=(160, 120), idle_timeout=0.5
    )
    async with talking(avatar) as (session, room, heard, events, readers):
        room.join("another-agent")  # agents do not count as an audience
        await until(lambda: avatar.avatar_state == "audio_only", timeout=5)
        first = crashable.created[0]
        assert first.cleaned_up == 1, "the runtime was freed while nobody watched"
        room.join("user-1", rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD)
        await until(lambda: avatar.avatar_state == "rendering", timeout=10)
        assert len(crashable.created) == 2 and avatar.runtime is crashable.created[1]
    assert [e.new_state for e in events] == ["audio_only", "recovering", "rendering"]
    assert "nobody but agents" in events[0].reason and "joined" in events[1].reason


def test_bad_cost_guard_values_are_refused(model_file, monkeypatch):
    from livekit_plugins_avatarhub import ConfigurationError

    for bad in (-1, "soon", 10**9, True):
        with pytest.raises(ConfigurationError, match="max_session_seconds"):
            AvatarSession(model_path=model_file, api_secret=SECRET, max_session_seconds=bad)
    monkeypatch.setenv("AVATARHUB_IDLE_TIMEOUT", "five minutes")
    with pytest.raises(ConfigurationError, match="idle_timeout"):
        AvatarSession(model_path=model_file, api_secret=SECRET)
