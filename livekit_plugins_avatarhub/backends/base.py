"""The contract every place an ``AvatarSession`` renders meets, and what the remote two share.

``AvatarSession`` keeps LiveKit's surface (arguments, ``avatar_identity``, ``start``/``aclose``
of its base class) and hands the rest to one backend: ``local`` renders in this process,
``service`` in the avatar service, ``dispatch`` on an avatar worker that LiveKit sends.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from livekit import rtc

from .. import _compat
from ..exceptions import AvatarHubError, ConfigurationError
from ..log import logger
from ..remote.protocol import RPC_TRIGGER_DYNAMICS, read_answer
from ..rendering.failover import AvatarState, OnStateChanged
from .relay import AvatarRelay, Relaunch

if TYPE_CHECKING:
    from bithuman import VideoControl
    from livekit.agents import AgentSession

#: registers the session with LiveKit's AvatarSession base class; a backend calls it once,
#: when the avatar is ready to be spoken to
Attach = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class LiveKitKeys:
    """The LiveKit credentials ``start()`` was given (each None: ``LIVEKIT_*`` decides)."""

    url: str | None = None
    api_key: str | None = None
    api_secret: str | None = None


@dataclass(frozen=True)
class RemoteAvatar:
    """An avatar that is a participant of its own: what it renders, and who it is in the room."""

    agent_id: str
    model: str | None
    identity: str
    name: str


class AvatarBackend(Protocol):
    """Where an avatar renders, as ``AvatarSession`` drives it."""

    #: whether the avatar is a participant of its own (LiveKit's base class removes it on
    #: close); False when the agent's own participant publishes it
    own_participant: bool
    #: told when the avatar stops or resumes rendering (set by ``AvatarSession``)
    on_state_changed: OnStateChanged | None

    @property
    def avatar_state(self) -> AvatarState: ...

    def identity(self, room: rtc.Room | None) -> str:
        """The participant that publishes the avatar (``avatar_identity``)."""
        ...

    async def start(
        self, agent_session: AgentSession[Any], room: rtc.Room, keys: LiveKitKeys, attach: Attach
    ) -> None: ...

    async def push(self, control: VideoControl) -> None: ...

    async def aclose(self) -> None: ...


async def push_gesture(
    room: rtc.Room | None, identity: str, control: VideoControl, mode: str
) -> None:
    """A control's gesture to an avatar in a participant of its own. Speech is refused (it goes
    through the AgentSession there); bitHuman plays a list's first gesture."""
    if control.audio is not None or control.end_of_speech:
        raise ConfigurationError(
            f"in mode={mode!r} the avatar takes speech from the AgentSession; push() sends "
            "only actions (VideoControl(action=...))"
        )
    actions = [control.action] if isinstance(control.action, str) else control.action or []
    if not actions:
        return
    if room is None:
        raise AvatarHubError("the avatar is not started yet; call start() first")
    await trigger_remote(room, identity, actions[0], force=bool(control.force_action))


async def trigger_remote(room: rtc.Room, identity: str, action: str, *, force: bool) -> None:
    """bitHuman's cloud dynamics RPC to the avatar participant; its error answer raises."""
    me = room.local_participant
    payload: dict[str, Any] = {"action": action, "identity": me.identity, "timestamp": time.time()}
    if force:
        payload["force"] = True
    try:
        raw = await me.perform_rpc(
            destination_identity=identity, method=RPC_TRIGGER_DYNAMICS, payload=json.dumps(payload)
        )
    except rtc.RpcError as err:
        raise AvatarHubError(
            f"the avatar {identity} did not take the gesture {action!r}: {err.message}"
        ) from None
    answer = read_answer(raw)
    if answer.get("status") == "error":
        raise AvatarHubError(
            f"the avatar refused the gesture {action!r}: {answer.get('message') or answer}"
        )


def route_audio_to(
    agent_session: AgentSession[Any],
    room: rtc.Room,
    identity: str,
    *,
    relaunch: Relaunch | None,
    on_state_changed: OnStateChanged | None,
) -> AvatarRelay:
    """The agent's speech goes to ``identity`` as LiveKit's DataStream avatar audio, and into
    the room as plain audio whenever that avatar is gone (see :mod:`.relay`)."""
    relay = AvatarRelay(room, identity, relaunch=relaunch, on_state_changed=on_state_changed)
    _compat.replace_audio_output(agent_session, relay)
    return relay


#: a remote avatar is asked to leave this much after the session's own limit, so that it goes
#: even when the agent that would have sent it away is gone
LIMIT_BACKSTOP = 5.0


async def end_at_limit(
    seconds: float, relay: AvatarRelay, send_away: Callable[[], Awaitable[None]]
) -> None:
    """A remote avatar's session limit, kept by the agent: the speech goes on as plain audio,
    the avatar is sent away and not asked for again."""
    await asyncio.sleep(seconds)
    relay.retire(f"the session limit of {seconds:g} s was reached")
    try:
        await send_away()
    except Exception as err:  # it leaves at its own limit anyway
        logger.debug("sending the avatar away at its session limit: %s", err)


async def stop_speaking_to_avatar(
    guard: asyncio.Task[None] | None, relay: AvatarRelay | None
) -> None:
    """A remote backend's close, first of all: no session limit fires, and the relay lets go
    before the avatar is sent away (its leaving is then no failure)."""
    if guard is not None and guard is not asyncio.current_task():
        guard.cancel()
    if relay is not None:
        await relay.aclose()


async def avatar_joined(room: rtc.Room, identity: str) -> None:
    """Until ``identity`` is in the room (an avatar publishing on our behalf)."""
    if identity in room.remote_participants:
        return
    joined = asyncio.Event()

    def on_connected(participant: Any) -> None:
        if participant.identity == identity:
            joined.set()

    room.on("participant_connected", on_connected)
    try:
        if identity not in room.remote_participants:  # it may have joined meanwhile
            await joined.wait()
    finally:
        room.off("participant_connected", on_connected)
