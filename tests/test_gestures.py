"""Keyword → gesture triggers: whole-word matching, cooldowns, and wiring to an AgentSession."""

from __future__ import annotations

import asyncio
import logging

import pytest
from livekit.agents import Agent, AgentSession

from livekit_plugins_avatarhub import AvatarSession
from livekit_plugins_avatarhub.gestures import GestureTrigger, default_keywords

from bithuman_server import SECRET, FakeBithumanService
from fakes import FakeRoom

ACTIONS = ["mini_wave_hello", "talk_head_nod_subtle", "blow_kiss_heart", "laugh_react"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """A runtime stand-in that records pushes (the gesture helper only calls push)."""

    def __init__(self) -> None:
        self.actions: list[str] = []

    async def push(self, control) -> None:
        self.actions.append(control.action)


def make(**kwargs) -> tuple[GestureTrigger, Recorder, Clock]:
    runtime, clock = Recorder(), Clock()
    return GestureTrigger(runtime, ACTIONS, clock=clock, **kwargs), runtime, clock


def test_defaults_come_from_the_gesture_names():
    mapping = default_keywords(ACTIONS)
    assert mapping["hello"] == "mini_wave_hello" and mapping["hi"] == "mini_wave_hello"
    assert mapping["funny"] == "laugh_react" and mapping["thank you"] == "blow_kiss_heart"
    assert mapping["yes"] == "talk_head_nod_subtle"
    assert mapping["mini wave hello"] == "mini_wave_hello"


@pytest.mark.parametrize(
    ("text", "action"),
    [
        ("Hi there!", "mini_wave_hello"),
        ("HELLO", "mini_wave_hello"),
        ("well... hi, you", "mini_wave_hello"),
        ("this is his thing", None),  # "hi" inside words never fires
        ("That's so FUNNY!!!", "laugh_react"),
        ("thank-you very much", "blow_kiss_heart"),
        ("thankful", None),
        ("whatever", None),
        ("", None),
    ],
)
def test_whole_words_any_case_any_punctuation(text, action):
    trigger, _, _ = make()
    assert trigger.match(text) == action


def test_overrides_win_and_unknown_actions_warn_once(caplog):
    caplog.set_level(logging.WARNING)
    trigger, _, _ = make(keywords={"Hi": "laugh_react", "dance": "moonwalk", "boogie": "moonwalk"})
    assert trigger.match("hi") == "laugh_react"
    assert trigger.match("dance") is None
    assert caplog.text.count("no gesture 'moonwalk'") == 1


async def test_cooldowns_per_action_and_global():
    trigger, runtime, clock = make(cooldown=5.0, global_cooldown=2.0)
    assert await trigger.handle_text("hello") == "mini_wave_hello"
    clock.now += 1.0
    assert await trigger.handle_text("haha") is None  # global cooldown
    clock.now += 1.5
    assert await trigger.handle_text("haha") == "laugh_react"
    clock.now += 2.0
    assert await trigger.handle_text("hello again") is None  # 4.5 s since the last wave
    clock.now += 0.6
    assert await trigger.handle_text("hello again") == "mini_wave_hello"
    assert runtime.actions == ["mini_wave_hello", "laugh_react", "mini_wave_hello"]


async def test_explicit_trigger_and_force():
    trigger, runtime, clock = make()
    assert await trigger.trigger("laugh_react")
    assert not await trigger.trigger("laugh_react")
    assert await trigger.trigger("laugh_react", force=True)
    assert not await trigger.trigger("moonwalk", force=True)
    assert runtime.actions == ["laugh_react", "laugh_react"]


async def test_from_dynamics_uses_the_agents_gestures():
    with FakeBithumanService() as service:
        service.add_agent("A91XMB7113", gestures={"laugh_react": "https://v/1.mp4"})
        from livekit_plugins_avatarhub import BithumanAPI

        async with BithumanAPI(api_secret=SECRET, api_base=service.api_base) as api:
            trigger = await GestureTrigger.from_dynamics(Recorder(), "A91XMB7113", api=api)
    assert trigger.actions == {"laugh_react"}
    assert trigger.match("lol") == "laugh_react" and trigger.match("hello") is None


async def test_attached_to_a_session_with_the_demo_avatar():
    avatar = AvatarSession(avatar_id="demo", output_size=(160, 120))
    trigger = await GestureTrigger.from_dynamics(avatar, "demo", cooldown=0, global_cooldown=0)
    room = FakeRoom()
    session = AgentSession()
    await avatar.start(session, room=room)
    await session.start(agent=Agent(instructions="test"))
    detach = trigger.attach(session)
    try:
        from livekit.agents.voice.events import UserInputTranscribedEvent

        session.emit(
            "user_input_transcribed", UserInputTranscribedEvent(transcript="hel", is_final=False)
        )
        await asyncio.sleep(0.05)
        assert avatar.runtime._action is None  # interim transcripts are ignored
        session.emit(
            "user_input_transcribed",
            UserInputTranscribedEvent(transcript="Hello there!", is_final=True),
        )
        await asyncio.sleep(0.05)
        assert avatar.runtime._action is not None and avatar.runtime._action[0] == "wave"
        # typed text (and every committed user turn) arrives as a user chat item
        from livekit.agents.llm import ChatMessage
        from livekit.agents.voice.events import ConversationItemAddedEvent

        item = ChatMessage(role="user", content=["That is GREAT."])
        session.emit("conversation_item_added", ConversationItemAddedEvent(item=item))
        await asyncio.sleep(0.05)
        assert avatar.runtime._action[0] == "smile"
        # the same turn seen twice (final transcript, then chat item) triggers once
        pushed = []
        original = avatar.runtime.push

        async def spy(control):
            pushed.append(control.action)
            await original(control)

        avatar.runtime.push = spy
        session.emit(
            "user_input_transcribed", UserInputTranscribedEvent(transcript="Wow!", is_final=True)
        )
        session.emit(
            "conversation_item_added",
            ConversationItemAddedEvent(item=ChatMessage(role="user", content=["Wow!"])),
        )
        await asyncio.sleep(0.05)
        assert pushed == ["surprised"]
    finally:
        detach()
        await avatar.aclose()
        await session.aclose()
