"""The wire contract between an agent and an avatar that is a participant of its own.

Everything both sides must agree on lives here, so changing the protocol means opening one
file: the avatar job an agent dispatches (:class:`AvatarJob`, carried as the job's metadata),
the LiveKit agent name avatar workers register under and the identity the avatar joins as, and
bitHuman's ``trigger_dynamics`` RPC with its answer (written by :func:`answer`, read by
:func:`read_answer`).

A job's metadata, JSON::

    {"agent_id": "A91XMB7113" | "demo", "model": "expression-2",
     "participant_identity": "bithuman-avatar-agent", "participant_name": "BitHuman Agent",
     "publish_on_behalf": "<the agent it renders for>",   # its speech comes as DataStream audio
     "listen_to": "<a participant>",                      # or: follow that microphone
     "allow_gestures_from": ["<identity>", ...]}          # who else may trigger gestures

The RPC: in bitHuman's cloud the avatar is a participant of its own, and agent code plays a
gesture with ``perform_rpc(destination_identity=avatar.avatar_identity,
method="trigger_dynamics", payload=json.dumps({"action": ...}))``; a remote avatar (the
service, an avatar worker) answers it as that participant with :func:`handle`. (An avatar
rendered in the agent's own process answers it there: ``backends.local``.)
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from ..config import MAX_SECONDS, env_or
from ..exceptions import AvatarHubError, ConfigurationError
from ..ids import check_avatar, check_model

#: the LiveKit agent name avatar workers register under, unless AVATARHUB_AGENT_NAME says
DEFAULT_AGENT_NAME = "avatarhub-avatar"
#: where LiveKit's bithuman plugin sends speech
DEFAULT_IDENTITY = "bithuman-avatar-agent"
#: seconds with nobody but agents in the room before an avatar stops (leaves, when remote)
DEFAULT_IDLE_TIMEOUT = 300.0
_TEXT_LIMIT = 256

#: bitHuman's cloud dynamics RPC, answered by the avatar participant
RPC_TRIGGER_DYNAMICS = "trigger_dynamics"
#: the RPC error code for a caller that may not drive the avatar (LiveKit keeps 1001-1999)
RPC_NOT_ALLOWED = 403
_MAX_ALLOWED = 32
#: the ``service`` field of the answer
SERVICE_NAME = "avatarhub"

Push = Callable[[str, bool], Awaitable[None]]


def agent_name(value: Any = None) -> str:
    """The avatar workers' LiveKit agent name: the argument, ``AVATARHUB_AGENT_NAME``, then
    :data:`DEFAULT_AGENT_NAME`. ``mode="dispatch"``, ``worker`` and ``serve --dispatch`` all
    ask here, so one variable set on every machine names the same workers on all three sides."""
    return env_or(value, "AVATARHUB_AGENT_NAME") or DEFAULT_AGENT_NAME


def _identity(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value.strip()) <= _TEXT_LIMIT


def gesture_callers(given: Iterable[str] = ()) -> frozenset[str]:
    """Identities besides the served participant that may trigger an avatar's gestures:
    ``given`` and ``AVATARHUB_ALLOW_GESTURES_FROM`` (comma-separated), together."""
    names = [*given, *(env_or(None, "AVATARHUB_ALLOW_GESTURES_FROM") or "").split(",")]
    return frozenset(n.strip() for n in names if n and n.strip())


def allow_gestures_from(values: Iterable[str]) -> None:
    """Add ``--allow-gestures-from`` identities (each may be comma-separated) to
    ``AVATARHUB_ALLOW_GESTURES_FROM``, which every avatar reads: in this process and in the job
    processes it starts."""
    import os

    given = [v for value in values for v in value.split(",")]
    if given:
        os.environ["AVATARHUB_ALLOW_GESTURES_FROM"] = ",".join(sorted(gesture_callers(given)))


_NOT_TEXT = ("agent_id", "allow_gestures_from", "max_session_seconds")


def session_limit(value: Any, where: str) -> float:
    """A requested session limit: seconds, more than 0 and at most a week."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 < value <= MAX_SECONDS
    ):
        raise ConfigurationError(
            f"max_session_seconds in {where} must be a number of seconds from 1 to "
            f"{MAX_SECONDS:g}; got {value!r}"
        )
    return float(value)


def limit_sessions(seconds: str) -> None:
    """``--max-session-seconds``: every avatar of this process and its job processes leaves
    after that long (``AVATARHUB_MAX_SESSION_SECONDS``, which they read)."""
    import os

    from ..config import seconds_setting

    limit = seconds_setting(seconds, "", "--max-session-seconds", default=None)
    if limit:
        os.environ["AVATARHUB_MAX_SESSION_SECONDS"] = f"{limit:g}"


@dataclass(frozen=True)
class AvatarJob:
    """What one dispatched avatar renders, for whom, and as whom."""

    agent_id: str
    model: str | None = None
    participant_identity: str = DEFAULT_IDENTITY
    participant_name: str | None = None
    publish_on_behalf: str | None = None
    listen_to: str | None = None
    #: identities besides the served one that may trigger gestures
    allow_gestures_from: tuple[str, ...] = ()
    #: the avatar leaves after this long (within the worker's own limit)
    max_session_seconds: float | None = None

    @classmethod
    def parse(cls, metadata: str | None) -> AvatarJob:
        """The job's metadata, checked; every problem is one ConfigurationError naming it."""
        try:
            raw = json.loads(metadata or "")
        except (ValueError, RecursionError):
            raise ConfigurationError(
                "the avatar job's metadata is not JSON; dispatch it with "
                '{"agent_id": "<agent code or demo>", ...}'
            ) from None
        if not isinstance(raw, dict):
            raise ConfigurationError("the avatar job's metadata must be a JSON object")
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigurationError(
                f"unknown fields in the avatar job: {', '.join(sorted(unknown))}"
            )
        try:
            agent_id = check_avatar(raw.get("agent_id"))
        except ValueError as err:
            raise ConfigurationError(f"the avatar job's agent_id: {err}") from None
        fields: dict[str, Any] = {"agent_id": agent_id}
        if raw.get("max_session_seconds") is not None:
            fields["max_session_seconds"] = session_limit(raw["max_session_seconds"], "the job")
        allowed = raw.get("allow_gestures_from")
        if allowed is not None:
            if (
                not isinstance(allowed, list)
                or len(allowed) > _MAX_ALLOWED
                or not all(
                    isinstance(a, str) and 0 < len(a.strip()) <= _TEXT_LIMIT for a in allowed
                )
            ):
                raise ConfigurationError(
                    f"allow_gestures_from in the avatar job must be a list of at most "
                    f"{_MAX_ALLOWED} participant identities"
                )
            fields["allow_gestures_from"] = tuple(allowed)
        for name in cls.__dataclass_fields__:
            if name in _NOT_TEXT or raw.get(name) is None:
                continue
            value = raw[name]
            if not isinstance(value, str) or not value.strip() or len(value) > _TEXT_LIMIT:
                raise ConfigurationError(
                    f"{name} in the avatar job must be a non-empty string of at most "
                    f"{_TEXT_LIMIT} characters"
                )
            fields[name] = value
        check_model(fields.get("model"))  # unknown names are refused here
        if fields.get("publish_on_behalf") and fields.get("listen_to"):
            raise ConfigurationError(
                "an avatar job takes its audio from one place: publish_on_behalf (an agent's "
                "speech) or listen_to (a microphone), not both"
            )
        return cls(**fields)

    def to_metadata(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v not in (None, ())})

    def participant_attributes(self) -> dict[str, str]:
        if not self.publish_on_behalf:
            return {}
        from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF

        return {ATTRIBUTE_PUBLISH_ON_BEHALF: self.publish_on_behalf}


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


def read_answer(raw: str | None) -> dict[str, Any]:
    """An answer as a dict (``{}`` when it is not JSON); ``status == "error"`` is a refusal."""
    try:
        answer = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


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
    try:
        await push(action, bool(request.get("force")))
    except AvatarHubError as err:  # e.g. the runtime is down: said in the answer
        return answer(action, error=str(err))
    return answer(action)
