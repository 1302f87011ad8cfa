"""Keyword-triggered gestures ("dynamics"), as bitHuman's self-hosted docs build them.

``GestureTrigger`` maps words and phrases to the avatar's own gesture actions (from
``GET /v1/dynamics/{agent_id}``), matches them as whole words (never substrings: "hi" does not
fire on "this"), ignoring case and punctuation, and pushes ``VideoControl(action=...)`` with a
per-action and a global cooldown. ``attach(session)`` wires it to an ``AgentSession``'s final
user transcripts and typed text in one call.
"""

from __future__ import annotations

import asyncio
import re
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .log import logger

if TYPE_CHECKING:
    from livekit.agents import AgentSession

    from .api import BithumanAPI

# words that commonly call for a gesture whose name contains the key
_HINTS: dict[str, tuple[str, ...]] = {
    "wave": ("hello", "hi", "hey", "goodbye", "bye", "see you"),
    "hello": ("hello", "hi", "hey"),
    "nod": ("yes", "agree", "exactly", "right", "sure"),
    "laugh": ("laugh", "laughing", "haha", "funny", "hilarious", "lol"),
    "kiss": ("love", "thank you", "thanks"),
    "heart": ("love", "thank you", "thanks"),
    "smile": ("great", "nice", "happy", "wonderful"),
    "wink": ("just kidding", "secret", "wink"),
    "surprise": ("wow", "no way", "really", "amazing"),
    "clap": ("congratulations", "well done", "bravo"),
    "think": ("hmm", "let me think", "thinking"),
}


def normalize(text: str) -> str:
    """Lower case, accents kept, punctuation and runs of space folded to single spaces."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.findall(r"\w+", text))


def default_keywords(actions: Iterable[str]) -> dict[str, str]:
    """Phrase → action for the given actions: each name's own words, plus common hints."""
    mapping: dict[str, str] = {}
    for action in actions:
        words = normalize(action.replace("_", " ").replace("-", " "))
        if words:
            mapping.setdefault(words, action)
        for key, phrases in _HINTS.items():
            if key in words.split() or key in action.lower():
                for phrase in phrases:
                    mapping.setdefault(phrase, action)
    return mapping


class GestureTrigger:
    """Turns text into gestures on an avatar, with cooldowns.

    ``target`` is an ``AvatarSession`` (its runtime is looked up at trigger time, so the
    trigger can be built before ``start()``) or a runtime. ``actions`` are the gestures the
    avatar has; ``keywords`` (phrase → action) add to or override the defaults.
    """

    def __init__(
        self,
        target: Any,
        actions: Iterable[str],
        *,
        keywords: Mapping[str, str] | None = None,
        use_default_keywords: bool = True,
        cooldown: float = 5.0,
        global_cooldown: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if cooldown < 0 or global_cooldown < 0:
            raise ValueError("cooldowns must be zero or more")
        self._target = target
        self.actions = frozenset(actions)
        self.cooldown = cooldown
        self.global_cooldown = global_cooldown
        self._clock = clock
        self._last: dict[str, float] = {}
        self._last_any: float | None = None
        self._warned: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._recent: dict[str, float] = {}
        mapping = default_keywords(self.actions) if use_default_keywords else {}
        for phrase, action in (keywords or {}).items():
            if action not in self.actions:
                self._warn_missing(action)
                continue
            key = normalize(phrase)
            if key:
                mapping[key] = action
        self.keywords = mapping
        self._pattern = self._compile(mapping)

    @classmethod
    async def from_dynamics(
        cls,
        target: Any,
        agent_id: str,
        *,
        api: BithumanAPI | None = None,
        **options: Any,
    ) -> GestureTrigger:
        """Build from the agent's gestures (``GET /v1/dynamics/{agent_id}``).

        ``agent_id="demo"`` uses the demo avatar's gestures, with no request.
        """
        from .ids import is_demo

        if is_demo(agent_id):
            from .rendering.demo import DemoRuntime

            return cls(target, DemoRuntime.ACTIONS, **options)
        from .api import BithumanAPI

        client = api or BithumanAPI()
        try:
            gestures = await client.gestures(agent_id)
        finally:
            if api is None:
                await client.aclose()
        if not gestures:
            logger.warning("avatar %s has no gestures (dynamics not generated?)", agent_id)
        return cls(target, gestures.keys(), **options)

    @staticmethod
    def _compile(mapping: Mapping[str, str]) -> re.Pattern[str] | None:
        if not mapping:
            return None
        # longest first, so "thank you" wins over "thank"; whole words only
        phrases = sorted(mapping, key=len, reverse=True)
        return re.compile(r"(?<!\w)(" + "|".join(re.escape(p) for p in phrases) + r")(?!\w)")

    def match(self, text: str) -> str | None:
        """The action for the first phrase in ``text``, if any."""
        if self._pattern is None:
            return None
        found = self._pattern.search(normalize(text))
        return self.keywords[found.group(1)] if found else None

    def ready(self, action: str) -> bool:
        now = self._clock()
        if self._last_any is not None and now - self._last_any < self.global_cooldown:
            return False
        last = self._last.get(action)
        return last is None or now - last >= self.cooldown

    async def trigger(self, action: str, *, force: bool = False) -> bool:
        """Perform ``action`` now unless unknown or cooling down (``force`` skips cooldowns)."""
        if action not in self.actions:
            self._warn_missing(action)
            return False
        if not force and not self.ready(action):
            logger.debug("gesture %r skipped: cooling down", action)
            return False
        now = self._clock()
        self._last[action] = now
        self._last_any = now
        from bithuman import VideoControl

        await self._receiver().push(VideoControl(action=action))
        logger.debug("gesture %r triggered", action)
        return True

    async def handle_text(self, text: str) -> str | None:
        """Match ``text`` and trigger what it calls for; returns the action performed."""
        action = self.match(text)
        if action is not None and await self.trigger(action):
            return action
        return None

    def attach(self, session: AgentSession[Any]) -> Callable[[], None]:
        """Listen to ``session``'s final user transcripts and text input; returns a detach."""

        def on_transcript(event: Any) -> None:
            if getattr(event, "is_final", False):
                self._spawn(getattr(event, "transcript", ""))

        def on_item(event: Any) -> None:
            item = getattr(event, "item", None)
            if getattr(item, "role", None) == "user":
                self._spawn(getattr(item, "text_content", None) or "")

        session.on("user_input_transcribed", on_transcript)
        session.on("conversation_item_added", on_item)

        def detach() -> None:
            session.off("user_input_transcribed", on_transcript)
            session.off("conversation_item_added", on_item)

        return detach

    def _spawn(self, text: str) -> None:
        key = normalize(text)
        if not key:
            return
        now = self._clock()
        # a spoken turn arrives twice (final transcript, then the chat item): handle it once
        self._recent = {k: t for k, t in self._recent.items() if now - t < 10.0}
        if key in self._recent:
            return
        self._recent[key] = now
        task = asyncio.get_running_loop().create_task(self.handle_text(text))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("gesture failed: %s", task.exception())

    def _receiver(self) -> Any:
        """Whatever takes ``push(VideoControl)``: an AvatarSession (either mode) or a runtime."""
        if callable(getattr(self._target, "push", None)):
            return self._target
        return self._target.runtime  # something else that holds a runtime

    def _warn_missing(self, action: str) -> None:
        if action not in self._warned:
            self._warned.add(action)
            logger.warning(
                "the avatar has no gesture %r; it is ignored (available: %s)",
                action,
                ", ".join(sorted(self.actions)) or "none",
            )
