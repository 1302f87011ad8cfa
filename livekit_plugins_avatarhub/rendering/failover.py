"""When the runtime fails mid-conversation, the agent's voice goes on without it.

A live generator keeps, beside what it hands the runtime, the speech the runtime has not played
back yet (:class:`PendingAudio`: references to the agent's frames, no copies). If the runtime
raises, ends, or produces no frame for ``stall_seconds``, the generator plays that speech, and
everything the agent says after it, as plain audio on the same track, shows a still picture,
and reports the change once (:class:`AvatarStateChanged`). With a way to reopen the runtime it
tries again with backoff; a runtime that is back takes over at the next pause between replies,
so no reply is cut in two.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from livekit import rtc

if TYPE_CHECKING:
    from .runtime import AvatarRuntime

#: ``rendering``: the avatar speaks; ``recovering``: plain audio while the runtime is reopened;
#: ``audio_only``: plain audio for the rest of the session (no way back, or attempts used up)
AvatarState = Literal["rendering", "recovering", "audio_only"]

#: a fresh runtime to render with (or the same one, ready to run again)
Reopen = Callable[[], Awaitable["AvatarRuntime"]]


@dataclass(frozen=True)
class AvatarStateChanged:
    """Emitted as ``avatar_state_changed``: the avatar stopped or resumed rendering."""

    old_state: AvatarState
    new_state: AvatarState
    #: why it changed, one line (the runtime's error, a stall, attempts used up, recovered)
    reason: str
    created_at: float = field(default_factory=time.time)


OnStateChanged = Callable[[AvatarStateChanged], None]


@dataclass(frozen=True)
class Failover:
    """How a live generator copes with a runtime that fails.

    ``reopen`` None: plain audio for the rest of the session. Attempts wait ``base_delay``,
    then twice as long each time (0.5, 1, 2 s by default).
    """

    reopen: Reopen | None = None
    on_state_changed: OnStateChanged | None = None
    stall_seconds: float = 0.5
    attempts: int = 3
    base_delay: float = 0.5

    def delay(self, attempt: int) -> float:
        return float(self.base_delay * 2.0**attempt)


class PendingAudio:
    """The speech handed to the runtime that it has not played back yet, in order, with the
    ends of replies (``None``) between. The runtime's audio out consumes it sample by sample;
    a reply's end drops what is left of it (the runtime pads its last frame)."""

    __slots__ = ("_items", "_offset", "in_reply")

    def __init__(self) -> None:
        self._items: deque[rtc.AudioFrame | None] = deque()
        self._offset = 0  # samples per channel of the first frame already played
        #: audio arrived since the last end of a reply
        self.in_reply = False

    def __bool__(self) -> bool:
        return bool(self._items)

    def add(self, frame: rtc.AudioFrame) -> None:
        self._items.append(frame)
        self.in_reply = True

    def end(self) -> None:
        self._items.append(None)
        self.in_reply = False

    def clear(self) -> None:
        self._items.clear()
        self._offset = 0
        self.in_reply = False

    def played(self, samples: int, sample_rate: int) -> None:
        """``samples`` at ``sample_rate`` came out of the runtime: forget as much input."""
        items = self._items
        while samples > 0 and items:
            head = items[0]
            if head is None:  # padding past the reply's end
                return
            rate = head.sample_rate
            wanted = samples if rate == sample_rate else samples * rate // sample_rate
            left = head.samples_per_channel - self._offset
            if wanted < left:
                self._offset += wanted
                return
            items.popleft()
            self._offset = 0
            samples -= left if rate == sample_rate else left * sample_rate // rate

    def played_end(self) -> None:
        """The runtime finished a reply: drop its rest, up to and including its end."""
        items = self._items
        while items:
            if items.popleft() is None:
                break
        self._offset = 0

    def pop(self) -> rtc.AudioFrame | None:
        """The next frame not played yet (cut where the runtime stopped), or None for the end
        of a reply. Raises IndexError when nothing is pending."""
        item = self._items.popleft()
        offset, self._offset = self._offset, 0
        if item is None or offset == 0:
            return item
        channels = item.num_channels
        rest = item.data[offset * channels :]  # int16 memoryview
        return rtc.AudioFrame(
            data=rest.tobytes(),
            sample_rate=item.sample_rate,
            num_channels=channels,
            samples_per_channel=item.samples_per_channel - offset,
        )
