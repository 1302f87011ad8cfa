"""``AvatarSession(mode="participant")``: the avatar runs in an avatar service, not here.

The session mints a LiveKit token for the avatar participant, asks the service to launch it
(the request shape of LiveKit's bithuman plugin in cloud mode), and streams the agent's speech
to it over LiveKit's DataStream avatar protocol. The avatar then is a separate participant, as
with bitHuman's cloud: ``wait_for_join()`` and RPCs to it behave the same. Unlike that plugin,
no bitHuman secret goes into the participant's attributes: the service holds its own.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import httpx

from livekit import rtc

from .. import _compat
from .._retry import RetryPolicy, with_retries
from ..api import status_error
from ..config import livekit_credentials, tls_context
from ..exceptions import APIConnectionError, AvatarHubError
from ..log import logger
from ..remote.protocol import RPC_TRIGGER_DYNAMICS, read_answer

if TYPE_CHECKING:
    from livekit.agents import AgentSession


class ServiceAvatar:
    """The participant-mode half of ``AvatarSession``: launch, route speech, leave.

    (:class:`DispatchedAvatar` is the same with LiveKit's dispatch in place of the service.)
    """

    def __init__(
        self,
        *,
        service_url: str,
        service_key: str | None,
        agent_id: str,
        model: str | None,
        identity: str,
        name: str,
        retry: RetryPolicy,
    ) -> None:
        self.service_url, self._service_key = service_url, service_key
        self.agent_id, self.model = agent_id, model
        self.identity, self.name = identity, name
        self._retry = retry
        self._room: rtc.Room | None = None
        self._room_name: str | None = None

    async def start(
        self,
        room: rtc.Room,
        *,
        livekit_url: str | None,
        livekit_api_key: str | None,
        livekit_api_secret: str | None,
    ) -> None:
        """Mint the avatar's token, have the service launch it, send the agent's speech to it."""
        lk_url, lk_key, lk_secret = livekit_credentials(
            livekit_url,
            livekit_api_key,
            livekit_api_secret,
            needed_for="mode='participant' mints a token for the avatar",
        )
        token = avatar_token(
            api_key=lk_key,
            api_secret=lk_secret,
            room=room.name,
            identity=self.identity,
            name=self.name,
            on_behalf_of=room.local_participant.identity,
        )
        await launch_avatar(
            service_url=self.service_url,
            service_key=self._service_key,
            agent_id=self.agent_id,
            model=self.model,
            livekit_url=lk_url,
            livekit_token=token,
            room_name=room.name,
            retry=self._retry,
        )
        self._room, self._room_name = room, room.name

    async def trigger(self, action: str, *, force: bool = False) -> None:
        """bitHuman's cloud dynamics RPC to the avatar participant; its error answer raises."""
        assert self._room is not None
        me = self._room.local_participant
        payload = {"action": action, "identity": me.identity, "timestamp": time.time()}
        if force:
            payload["force"] = True
        try:
            raw = await me.perform_rpc(
                destination_identity=self.identity,
                method=RPC_TRIGGER_DYNAMICS,
                payload=json.dumps(payload),
            )
        except rtc.RpcError as err:
            raise AvatarHubError(
                f"the avatar {self.identity} did not take the gesture {action!r}: {err.message}"
            ) from None
        answer = read_answer(raw)
        if answer.get("status") == "error":
            raise AvatarHubError(
                f"the avatar refused the gesture {action!r}: {answer.get('message') or answer}"
            )

    def route_speech(self, agent_session: AgentSession[Any], room: rtc.Room) -> None:
        route_audio_to(agent_session, room, self.identity)
        logger.info("avatar %s renders remotely as %s", self.agent_id, self.identity)

    async def aclose(self) -> None:
        if self._room_name is not None:
            await leave(
                service_url=self.service_url,
                service_key=self._service_key,
                agent_id=self.agent_id,
                room_name=self._room_name,
            )


class DispatchedAvatar(ServiceAvatar):
    """``mode="dispatch"``: the agent dispatches an avatar worker into its own room with its
    LiveKit credentials (no service in between), waits for it, and speaks to it."""

    def __init__(
        self,
        *,
        agent_id: str,
        model: str | None,
        identity: str,
        name: str,
        agent_name: str,
        join_timeout: float,
    ) -> None:
        super().__init__(
            service_url="",
            service_key=None,
            agent_id=agent_id,
            model=model,
            identity=identity,
            name=name,
            retry=RetryPolicy(),
        )
        self.agent_name, self.join_timeout = agent_name, join_timeout
        self._dispatcher: Any = None

    async def start(
        self,
        room: rtc.Room,
        *,
        livekit_url: str | None,
        livekit_api_key: str | None,
        livekit_api_secret: str | None,
    ) -> None:
        import asyncio

        from ..remote.dispatcher import AvatarDispatcher
        from ..remote.protocol import AvatarJob

        self._dispatcher = AvatarDispatcher(
            url=livekit_url,
            api_key=livekit_api_key,
            api_secret=livekit_api_secret,
            agent_name=self.agent_name,
        )
        job = AvatarJob(
            agent_id=self.agent_id,
            model=self.model,
            participant_identity=self.identity,
            participant_name=self.name,
            publish_on_behalf=room.local_participant.identity,
        )
        try:
            await self._dispatcher.ensure(room.name, job)
        except Exception as err:
            dispatcher, self._dispatcher = self._dispatcher, None
            await dispatcher.aclose()
            raise livekit_refusal(err, dispatcher.url) from None
        self._room, self._room_name = room, room.name
        try:
            await asyncio.wait_for(_avatar_joined(room, self.identity), self.join_timeout)
        except asyncio.TimeoutError:
            await self.aclose()
            raise AvatarHubError(
                f"no avatar worker took the avatar {self.agent_id} within "
                f"{self.join_timeout:.0f}s; is `python -m livekit_plugins_avatarhub worker "
                f"start` running with agent name {self.agent_name!r}, with room for another?"
            ) from None

    async def aclose(self) -> None:
        if self._dispatcher is None:
            return
        dispatcher, self._dispatcher = self._dispatcher, None
        try:
            if self._room_name is not None:
                await dispatcher.remove(self._room_name, self.agent_id)
        except Exception as err:  # the job ends with the room anyway
            logger.debug("removing the avatar dispatch failed: %s", err)
        finally:
            await dispatcher.aclose()


def livekit_refusal(err: Exception, url: str | None) -> Exception:
    """LiveKit's own answer to a server API call, in one line that says what to check."""
    import asyncio

    import aiohttp

    from ..exceptions import ConfigurationError

    status = getattr(err, "status", None)
    if status in (401, 403):
        code = getattr(err, "code", None)
        detail = f", {code}" if code and code != "unknown" else ""
        return ConfigurationError(
            f"LiveKit at {url} refused the API key and secret (HTTP {status}{detail}); check "
            "LIVEKIT_API_KEY and LIVEKIT_API_SECRET"
        )
    if isinstance(err, (aiohttp.ClientError, asyncio.TimeoutError, OSError)):
        return APIConnectionError(
            f"LiveKit at {url} is unreachable ({type(err).__name__}: {err}); check LIVEKIT_URL"
        )
    return err


async def _avatar_joined(room: rtc.Room, identity: str) -> None:
    """Until ``identity`` is in the room (the avatar worker publishing on our behalf)."""
    import asyncio

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


def avatar_token(
    *, api_key: str, api_secret: str, room: str, identity: str, name: str, on_behalf_of: str
) -> str:
    from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF

    from livekit import api

    return (
        api.AccessToken(api_key=api_key, api_secret=api_secret)
        .with_kind("agent")
        .with_identity(identity)
        .with_name(name)
        .with_grants(api.VideoGrants(room_join=True, room=room))
        .with_attributes({ATTRIBUTE_PUBLISH_ON_BEHALF: on_behalf_of})
        .to_jwt()
    )


async def launch_avatar(
    *,
    service_url: str,
    service_key: str | None,
    agent_id: str,
    model: str | None,
    livekit_url: str,
    livekit_token: str,
    room_name: str,
    retry: RetryPolicy,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """POST the launch request; retries transient failures, raises typed errors otherwise."""
    body: dict[str, Any] = {
        "mode": "cpu",
        "agent_id": agent_id,
        "livekit_url": livekit_url,
        "livekit_token": livekit_token,
        "room_name": room_name,
    }
    if model:
        body["model"] = model
    headers = {"authorization": f"Bearer {service_key}"} if service_key else {}
    url = service_url.rstrip("/") + "/v1/runtime-tokens/request"

    async with httpx.AsyncClient(timeout=timeout, verify=tls_context()) as client:

        async def once() -> dict[str, Any]:
            try:
                response = await client.post(url, json=body, headers=headers)
            except httpx.TransportError as err:
                raise APIConnectionError(
                    f"avatar service {service_url} unreachable ({type(err).__name__}); "
                    "check service_url / AVATARHUB_SERVICE_URL"
                ) from None
            if response.status_code >= 400:
                raise status_error(response, f"avatar service launch of {agent_id}", advise=False)
            data = response.json()
            return data if isinstance(data, dict) else {}

        return await with_retries(once, retry, f"launch of avatar {agent_id}")


async def leave(
    *, service_url: str, service_key: str | None, agent_id: str, room_name: str
) -> None:
    """Best effort: tell the service the avatar can go (LiveKit also removes the participant)."""
    headers = {"authorization": f"Bearer {service_key}"} if service_key else {}
    url = service_url.rstrip("/") + f"/v1/agents/{agent_id}/leave-room"
    try:
        async with httpx.AsyncClient(timeout=10.0, verify=tls_context()) as client:
            await client.post(url, json={"room_name": room_name}, headers=headers)
    except httpx.HTTPError as err:
        logger.debug("leave-room on the avatar service failed: %s", type(err).__name__)


def route_audio_to(agent_session: AgentSession[Any], room: rtc.Room, identity: str) -> None:
    from livekit.agents.voice.avatar import DataStreamAudioOutput

    try:  # wait_remote_track (1.1+): hold the audio until the avatar publishes video
        sink = DataStreamAudioOutput(
            room, destination_identity=identity, wait_remote_track=rtc.TrackKind.KIND_VIDEO
        )  # type: ignore[call-arg]
    except TypeError:  # livekit-agents 1.0
        sink = DataStreamAudioOutput(room, destination_identity=identity)
    _compat.replace_audio_output(agent_session, sink)
