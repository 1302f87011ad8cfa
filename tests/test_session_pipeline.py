"""End to end with no LiveKit server: AgentSession → AvatarSession → tracks in a test room.

Frames are read back from the published tracks with real rtc.VideoStream / rtc.AudioStream.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
from livekit.agents import Agent, AgentSession

from livekit import rtc
from livekit_plugins_avatarhub import AvatarSession, VideoPublishOptions

from conftest import SECRET
from fakes import FakeRoom, sine_frames, write_fake_model


@dataclass
class Capture:
    video: list[tuple[float, rtc.VideoFrame]] = field(default_factory=list)
    audio: list[rtc.AudioFrame] = field(default_factory=list)
    tasks: list[asyncio.Task] = field(default_factory=list)
    streams: list = field(default_factory=list)

    async def attach(self, room: FakeRoom) -> None:
        vpub = await room.wait_published(rtc.TrackKind.KIND_VIDEO)
        apub = room.local_participant.publication(rtc.TrackKind.KIND_AUDIO)
        assert apub is not None

        video = rtc.VideoStream(vpub.track)
        audio = rtc.AudioStream(apub.track, sample_rate=16000, num_channels=1)
        self.streams = [video, audio]

        async def read_video():
            async for ev in video:
                self.video.append((time.monotonic(), ev.frame))

        async def read_audio():
            async for ev in audio:
                self.audio.append(ev.frame)

        self.tasks = [asyncio.create_task(read_video()), asyncio.create_task(read_audio())]

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for stream in self.streams:
            await stream.aclose()


@contextlib.asynccontextmanager
async def running(avatar: AvatarSession):
    room = FakeRoom()
    session = AgentSession()
    await avatar.start(session, room=room)
    await session.start(agent=Agent(instructions="test"))
    capture = Capture()
    try:
        yield session, room, capture
    finally:
        await capture.close()
        await avatar.aclose()
        await session.aclose()


async def test_speech_renders_video_and_audio_at_runtime_rate(tmp_path, fake_bithuman):
    model_file = write_fake_model(tmp_path / "m.imx", frame_size=(320, 240))
    avatar = AvatarSession(model_path=model_file, api_secret=SECRET, output_size=(320, 240))
    async with running(avatar) as (session, room, capture):
        handle = session.say("hello", audio=sine_frames(1.2))
        await capture.attach(room)
        started = time.monotonic()
        await asyncio.wait_for(handle.wait_for_playout(), 10)
        played = time.monotonic() - started
        assert not handle.interrupted
        await asyncio.sleep(0.5)
        runtime = avatar.runtime
        assert runtime is fake_bithuman.created[0]

    # playback_finished came back after the audio was rendered in real time
    assert 1.0 < played < 2.5
    frames = capture.video
    span = frames[-1][0] - frames[0][0]
    fps = (len(frames) - 1) / span
    assert 21 <= fps <= 29, fps
    assert all(f.width == 320 and f.height == 240 for _, f in frames)
    # the frames are the model's (colour from the file), converted BGR → RGB
    rgb = frames[0][1].convert(rtc.VideoBufferType.RGB24)
    pixel = np.frombuffer(rgb.data, np.uint8).reshape(240, 320, 3)[10, 300]
    b, g, r = runtime.colour
    assert np.allclose(pixel, (r, g, b), atol=8)
    # every sample of speech was published
    samples = sum(f.samples_per_channel for f in capture.audio)
    assert samples >= int(1.2 * 16000) * 0.95
    assert runtime.cleaned_up == 1  # aclose freed the runtime it created


async def test_interrupt_clears_the_runtime_and_closes_the_mouth(model_file, fake_bithuman):
    avatar = AvatarSession(model_path=model_file, api_secret=SECRET, output_size=(160, 120))
    async with running(avatar) as (session, room, capture):
        handle = session.say("a long answer", audio=sine_frames(5.0))
        await capture.attach(room)
        await asyncio.sleep(1.0)
        runtime = avatar.runtime
        assert runtime.interrupts == 0
        session.interrupt()
        interrupted_at = time.monotonic()
        await asyncio.wait_for(handle.wait_for_playout(), 5)
        await asyncio.sleep(0.6)
        assert handle.interrupted
        assert runtime.interrupts >= 1

    def mouth_open(frame: rtc.VideoFrame) -> bool:
        img = np.frombuffer(frame.convert(rtc.VideoBufferType.RGB24).data, np.uint8)
        return bool(img.reshape(120, 160, 3)[-2, 2].min() > 240)

    before = [mouth_open(f) for t, f in capture.video if t < interrupted_at]
    after = [mouth_open(f) for t, f in capture.video if t > interrupted_at + 0.2]
    assert sum(before) > 10, "the avatar talked before the interruption"
    assert after and not any(after), "the mouth stays closed after the interruption"


async def test_video_is_published_h264_single_layer_at_avatar_fps(model_file, fake_bithuman):
    avatar = AvatarSession(model_path=model_file, api_secret=SECRET, output_size=(160, 120))
    async with running(avatar) as (session, room, _):
        handle = session.say("hi", audio=sine_frames(0.2))
        vpub = await room.wait_published(rtc.TrackKind.KIND_VIDEO)
        await asyncio.wait_for(handle.wait_for_playout(), 10)
        opts = vpub.options
        assert opts.video_codec == rtc.VideoCodec.H264
        assert opts.simulcast is False
        assert opts.video_encoding.max_framerate == 25
        assert opts.video_encoding.max_bitrate == 450_000  # LiveKit's preset for up to 360p
        assert opts.source == rtc.TrackSource.SOURCE_CAMERA


async def test_publish_options_are_configurable(model_file, fake_bithuman):
    options = VideoPublishOptions(codec="vp8", simulcast=True, max_fps=15, max_bitrate=1_500_000)
    avatar = AvatarSession(
        model_path=model_file, api_secret=SECRET, output_size=(160, 120), video_options=options
    )
    async with running(avatar) as (session, room, _):
        handle = session.say("hi", audio=sine_frames(0.2))
        vpub = await room.wait_published(rtc.TrackKind.KIND_VIDEO)
        await asyncio.wait_for(handle.wait_for_playout(), 10)
        assert vpub.options.video_codec == rtc.VideoCodec.VP8
        assert vpub.options.simulcast is True
        assert vpub.options.video_encoding.max_framerate == 15
        assert vpub.options.video_encoding.max_bitrate == 1_500_000


def test_publish_options_reject_nonsense():
    with pytest.raises(ValueError, match="codec"):
        VideoPublishOptions(codec="mpeg2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_fps"):
        VideoPublishOptions(max_fps=0)


async def test_prewarmed_runtime_is_reused_across_jobs_and_not_freed(model_file, fake_bithuman):
    runtime = await fake_bithuman.create(model_path=model_file, api_secret=SECRET)
    for job in range(2):
        avatar = AvatarSession(runtime=runtime, api_secret=SECRET)
        async with running(avatar) as (session, room, capture):
            handle = session.say("hello", audio=sine_frames(0.3))
            await capture.attach(room)
            await asyncio.wait_for(handle.wait_for_playout(), 5)
            assert avatar.runtime is runtime
        assert runtime.token_initialisations == job + 1
    assert runtime.cleaned_up == 0
    assert len(fake_bithuman.created) == 1


async def test_aclose_is_idempotent_and_safe_before_start(model_file, fake_bithuman):
    never_started = AvatarSession(model_path=model_file, api_secret=SECRET)
    await never_started.aclose()
    await never_started.aclose()
    avatar = AvatarSession(model_path=model_file, api_secret=SECRET, output_size=(160, 120))
    room = FakeRoom()
    session = AgentSession()
    await avatar.start(session, room=room)
    await avatar.aclose()
    await avatar.aclose()
    assert fake_bithuman.created[0].cleaned_up == 1
    await session.aclose()


async def test_runtime_push_reaches_the_runtime(model_file, fake_bithuman):
    from livekit_plugins_avatarhub import VideoControl

    avatar = AvatarSession(model_path=model_file, api_secret=SECRET, output_size=(160, 120))
    async with running(avatar):
        await avatar.runtime.push(VideoControl(action="wave"))
        assert [c.action for c in avatar.runtime.pushed_controls] == ["wave"]


async def test_starting_twice_is_refused(fake_bithuman, model_file):
    avatar = AvatarSession(model_path=model_file, api_secret=SECRET, output_size=(160, 120))
    async with running(avatar) as (session, room, _):
        with pytest.raises(Exception, match="already started"):
            await avatar.start(session, room=room)


async def test_avatar_id_downloads_through_the_hub_then_renders(
    fake_bithuman, clean_env, monkeypatch
):
    """The cloud-style call: an agent code and a secret, nothing fetched by hand."""
    from bithuman_server import SECRET as SERVER_SECRET
    from bithuman_server import FakeBithumanService

    with FakeBithumanService() as service:
        agent = service.add_agent("A91XMB7113")
        monkeypatch.setenv("BITHUMAN_API_BASE", service.api_base)
        avatar = AvatarSession(
            avatar_id="A91XMB7113",
            api_secret=SERVER_SECRET,
            model="essence",
            output_size=(160, 120),
        )
        async with running(avatar) as (session, room, capture):
            handle = session.say("hi", audio=sine_frames(0.3))
            await capture.attach(room)
            await asyncio.wait_for(handle.wait_for_playout(), 5)
            runtime = avatar.runtime
            assert open(runtime.model_path, "rb").read() == agent.files["essence-1"]
            assert runtime.model_path.startswith(str(clean_env))
        assert capture.video


@pytest.mark.parametrize("first", ["avatar", "agent_session"])
async def test_closing_mid_reply_never_hangs(first, model_file, fake_bithuman):
    """A job that ends while the avatar is speaking: both closes return, in either order, and
    the reply is reported as interrupted (livekit-agents 1.2 used to wait for it forever)."""
    avatar = AvatarSession(model_path=model_file, api_secret=SECRET, output_size=(160, 120))
    room = FakeRoom()
    session = AgentSession()
    await avatar.start(session, room=room)
    await session.start(agent=Agent(instructions="test"))
    handle = session.say("a long answer", audio=sine_frames(5.0))
    for _ in range(200):  # until the avatar is actually talking
        if fake_bithuman.created[0]._replies:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)
    finished = []
    avatar._backend._audio_sink.on(
        "playback_finished", finished.append
    )  # what the AgentSession hears
    closes = (
        (avatar.aclose, session.aclose) if first == "avatar" else (session.aclose, avatar.aclose)
    )
    for close in closes:
        await asyncio.wait_for(close(), 10)
    await asyncio.wait_for(handle.wait_for_playout(), 5)  # the reply ended, it did not hang
    assert finished and finished[-1].interrupted, "the cut-off reply was reported interrupted"
    assert finished[-1].playback_position < 5.0
    assert fake_bithuman.created[0].cleaned_up == 1


async def test_a_stalled_event_loop_leaves_no_lasting_audio_delay(
    tmp_path, fake_bithuman, monkeypatch
):
    """A blocking call in the agent's process stalls everything; afterwards the runtime
    catches up with a burst of late frames. Those must not stay queued in front of every
    later reply's audio for the rest of the session."""
    model_file = write_fake_model(tmp_path / "m.imx", frame_size=(320, 240))
    avatar = AvatarSession(model_path=model_file, api_secret=SECRET, output_size=(320, 240))
    entered: list[float] = []  # each reply's first audio frame entering the avatar
    published: list[float] = []  # the first loud audio after it reaching LiveKit
    new_reply = [False]
    original = rtc.AudioSource.capture_frame

    def loud(frame: rtc.AudioFrame) -> bool:
        return int(np.abs(np.frombuffer(frame.data, np.int16)).max()) > 3000

    async def capture(self: rtc.AudioSource, frame: rtc.AudioFrame) -> None:
        if len(published) < len(entered) and loud(frame):
            published.append(time.perf_counter())
        await original(self, frame)

    monkeypatch.setattr(rtc.AudioSource, "capture_frame", capture)
    async with running(avatar) as (session, room, capture_):
        sink = avatar._backend._audio_sink
        into_sink = sink.capture_frame

        async def entering(frame: rtc.AudioFrame) -> None:
            if new_reply[0] and loud(frame):
                new_reply[0] = False
                entered.append(time.perf_counter())
            await into_sink(frame)

        await asyncio.sleep(0.5)
        time.sleep(0.3)  # the stall
        await asyncio.sleep(0.5)
        sink.capture_frame = entering  # type: ignore[method-assign]
        for _ in range(5):
            new_reply[0] = True
            handle = session.say("reply", audio=sine_frames(0.2), add_to_chat_ctx=False)
            await asyncio.wait_for(handle.wait_for_playout(), 10)
            await asyncio.sleep(0.2 + 0.1 * random.random())
    assert len(entered) == len(published) == 5
    delays = sorted((p - e) * 1000 for e, p in zip(entered, published, strict=True))
    # a paced renderer adds 0-40 ms (the frame clock's phase); each queued frame of a burst
    # adds 40 more (median 75 ms here before stale pictures were skipped)
    assert delays[2] < 50, delays


async def test_the_agent_s_metrics_stream_shows_the_avatar():
    """Where livekit-agents has AvatarMetrics, an agent's metrics dashboard sees the avatar:
    when it joined, and each reply's playback latency, under this package's name."""
    from livekit_plugins_avatarhub import _compat

    if not hasattr(_compat.AvatarSessionBase, "_emit_metrics"):
        pytest.skip("this livekit-agents has no AvatarMetrics")
    avatar = AvatarSession(avatar_id="demo", output_size=(320, 240))
    seen = []
    async with running(avatar) as (session, room, capture):
        session.on("metrics_collected", lambda ev: seen.append(ev.metrics))
        await capture.attach(room)
        handle = session.say("hello", audio=sine_frames(0.6))
        await asyncio.wait_for(handle.wait_for_playout(), 10)
        await asyncio.sleep(0.2)
    avatar_metrics = [m for m in seen if m.type == "avatar_metrics"]
    assert {m.metadata.model_provider for m in avatar_metrics} == {"avatarhub"}
    joined = [m for m in avatar_metrics if m.avatar_joined_time]
    assert len(joined) == 1 and joined[0].avatar_joined_time >= joined[0].session_started_time
    (reply,) = [m for m in avatar_metrics if m.playback_latency]
    assert 0 < reply.playback_latency < 0.5
