"""bitHuman's ``trigger_dynamics`` RPC: its payload, its answer, and who answers it.

In bitHuman's cloud the avatar is a participant of its own, and agent code plays a gesture with
``perform_rpc(destination_identity=avatar.avatar_identity, method="trigger_dynamics",
payload=json.dumps({"action": ...}))``. A remote avatar (the service, an avatar worker) answers
it as that participant. An avatar rendered in the agent's process publishes *as the agent*, and
LiveKit's server never delivers a participant's RPC to itself (the call would only time out),
so :func:`answer_in_process` answers it there: for other participants through LiveKit, and for
the agent's own call to its own identity without leaving the process.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from livekit import rtc

from ..log import logger

#: bitHuman's cloud dynamics RPC, answered by the avatar participant
RPC_TRIGGER_DYNAMICS = "trigger_dynamics"
#: the ``service`` field of the answer
SERVICE_NAME = "avatarhub"

Push = Callable[[str, bool], Awaitable[None]]


def answer(action: str | None, *, error: str | None = None) -> str:
    """``{"status", "action", "animation_triggered", "service"}``, as bitHuman's cloud answers."""
    body: dict[str, Any] = {
        "status": "error" if error else "success",
        "action": action,
        "animation_triggered": error is None,
        "service": SERVICE_NAME,
    }
    if error:
        body["message"] = error
    return json.dumps(body)


async def handle(payload: str | None, push: Push | None) -> str:
    """Play the payload's gesture with ``push(action, force)``; ``push=None``: not running."""
    try:
        request = json.loads(payload or "{}")
        action = request.get("action") if isinstance(request, dict) else None
    except ValueError:
        action = None
    if not isinstance(action, str) or not action:
        return answer(None, error='the payload must be {"action": "<name>"}')
    if push is None:
        return answer(action, error="the avatar is not running")
    await push(action, bool(request.get("force")))
    return answer(action)


def answer_in_process(participant: rtc.LocalParticipant, push: Push) -> Callable[[], None]:
    """Answer ``trigger_dynamics`` as ``participant``, its own calls included; returns undo."""

    async def on_call(data: rtc.RpcInvocationData) -> str:
        return await handle(data.payload, push)

    participant.register_rpc_method(RPC_TRIGGER_DYNAMICS, on_call)
    through_livekit = participant.perform_rpc

    async def perform_rpc(
        *, destination_identity: str, method: str, payload: str, **kw: Any
    ) -> str:
        if destination_identity == participant.identity and method == RPC_TRIGGER_DYNAMICS:
            # the avatar renders here: LiveKit would not route this call back to its sender
            logger.debug("trigger_dynamics to the avatar in this process")
            return await handle(payload, push)
        return await through_livekit(
            destination_identity=destination_identity, method=method, payload=payload, **kw
        )

    participant.perform_rpc = perform_rpc  # type: ignore[method-assign]

    def undo() -> None:
        if participant.__dict__.get("perform_rpc") is perform_rpc:
            del participant.perform_rpc
        try:
            participant.unregister_rpc_method(RPC_TRIGGER_DYNAMICS)
        except Exception:  # the room is gone already
            pass

    return undo
