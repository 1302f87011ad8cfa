"""``mode="participant"``: the avatar renders in the avatar service, not here.

The session mints a LiveKit token for the avatar participant, asks the service to launch it
(the request shape of LiveKit's bithuman plugin in cloud mode), and streams the agent's speech
to it over LiveKit's DataStream avatar protocol. The avatar then is a separate participant, as
with bitHuman's cloud: ``wait_for_join()`` and RPCs to it behave the same. Unlike that plugin,
no bitHuman secret goes into the participant's attributes: the service holds its own.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import httpx

from livekit import rtc

from .._retry import RetryPolicy, with_retries
from ..api import status_error
from ..config import livekit_credentials, tls_context
from ..exceptions import APIConnectionError
from ..log import logger
from ..rendering.failover import AvatarState, OnStateChanged
from .base import (
    LIMIT_BACKSTOP,
    Attach,
    LiveKitKeys,
    RemoteAvatar,
    end_at_limit,
    push_gesture,
    route_audio_to,
    stop_speaking_to_avatar,
)
from .relay import AvatarRelay

if TYPE_CHECKING:
    from bithuman import VideoControl
    from livekit.agents import AgentSession


class ServiceBackend:
    """Launch the avatar on the service, send it the agent's speech, tell the service on close."""

    own_participant = True

    def __init__(
        self,
        *,
        avatar: RemoteAvatar,
        service_url: str,
        service_key: str | None,
        retry: RetryPolicy,
        max_session_seconds: float | None = None,
    ) -> None:
        self.avatar = avatar
        self._limit = max_session_seconds
        self._guard: asyncio.Task[None] | None = None
        self.service_url, self._service_key = service_url, service_key
        self._retry = retry
        self._room: rtc.Room | None = None
        self._relay: AvatarRelay | None = None
        self.on_state_changed: OnStateChanged | None = None

    @property
    def avatar_state(self) -> AvatarState:
        return self._relay.state if self._relay is not None else "rendering"

    def identity(self, room: rtc.Room | None) -> str:
        return self.avatar.identity

    async def start(
        self, agent_session: AgentSession[Any], room: rtc.Room, keys: LiveKitKeys, attach: Attach
    ) -> None:
        """Mint the avatar's token, have the service launch it, send the agent's speech to it."""
        lk_url, lk_key, lk_secret = livekit_credentials(
            keys.url,
            keys.api_key,
            keys.api_secret,
            needed_for="mode='participant' mints a token for the avatar",
        )
        avatar = self.avatar

        async def launch() -> None:
            token = avatar_token(
                api_key=lk_key,
                api_secret=lk_secret,
                room=room.name,
                identity=avatar.identity,
                name=avatar.name,
                on_behalf_of=room.local_participant.identity,
            )
            await launch_avatar(
                service_url=self.service_url,
                service_key=self._service_key,
                agent_id=avatar.agent_id,
                model=avatar.model,
                livekit_url=lk_url,
                livekit_token=token,
                room_name=room.name,
                retry=self._retry,
                max_session_seconds=self._limit + LIMIT_BACKSTOP if self._limit else None,
            )

        await launch()
        self._room = room
        await attach()
        self._relay = route_audio_to(
            agent_session,
            room,
            avatar.identity,
            relaunch=launch,
            on_state_changed=self.on_state_changed,
        )
        if self._limit:
            self._guard = asyncio.create_task(end_at_limit(self._limit, self._relay, self._leave))
        logger.info("avatar %s renders remotely as %s", avatar.agent_id, avatar.identity)

    async def push(self, control: VideoControl) -> None:
        await push_gesture(self._room, self.avatar.identity, control, "participant")

    async def _leave(self) -> None:
        if self._room is not None:
            await leave(
                service_url=self.service_url,
                service_key=self._service_key,
                agent_id=self.avatar.agent_id,
                room_name=self._room.name,
            )

    async def aclose(self) -> None:
        guard, self._guard = self._guard, None
        relay, self._relay = self._relay, None
        await stop_speaking_to_avatar(guard, relay)
        await self._leave()
        self._room = None


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
    max_session_seconds: float | None = None,
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
    if max_session_seconds:
        body["max_session_seconds"] = max_session_seconds
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
