"""One async client for bitHuman's REST API (httpx), shared by the model hub, agents and gestures.

It owns the rules every call follows: the base URL (argument, ``BITHUMAN_API_BASE``, default),
the ``api-secret`` header sent to that host only, retries for 408/429/5xx and connection errors
(exponential backoff with full jitter, honouring ``Retry-After``), and typed errors read from
bitHuman's error envelope.
"""

from __future__ import annotations

import asyncio
import json as _json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from ._redact import redact, scrub
from ._retry import RetryPolicy, parse_retry_after, with_retries
from .config import (
    CERTIFICATE_HINT,
    api_deadline,
    bithuman_secret,
    tls_context,
    untrusted_certificate,
)
from .config import api_base as resolve_api_base
from .exceptions import (
    AgentGenerationFailedError,
    AgentNotReadyError,
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    AvatarNotFoundError,
    ConfigurationError,
    InsufficientBalanceError,
    MissingSecretError,
    ModelNotDownloadableError,
    ModelNotReadyError,
    RateLimitedError,
    ServiceUnavailableError,
)
from .ids import validate_avatar_id

_BY_CODE: dict[str, type[APIStatusError]] = {
    "MODEL_ARTIFACT_NOT_READY": ModelNotReadyError,
    "MODEL_NOT_DOWNLOADABLE": ModelNotDownloadableError,
    "MODEL_NOT_GENERATED": ModelNotDownloadableError,
    "INSUFFICIENT_BALANCE": InsufficientBalanceError,
    "RATE_LIMITED": RateLimitedError,
    "NOT_FOUND": AvatarNotFoundError,
}

_ADVICE: dict[type[APIStatusError], str] = {
    AuthenticationError: "check api_secret / BITHUMAN_API_SECRET (and that it belongs to the "
    "account that owns this avatar)",
    AvatarNotFoundError: "check the avatar id; bitHuman also answers 404 for agents of other "
    "accounts",
    ModelNotReadyError: "the model is still being built; try again in a few minutes",
    ModelNotDownloadableError: "this model renders only in bitHuman's cloud; use "
    "`from livekit.plugins import bithuman` for it, or pick a downloadable model "
    "(essence-1, essence-2, expression-2)",
    InsufficientBalanceError: "add credits to the bitHuman account",
    RateLimitedError: "too many requests; slow down or try again later",
    ServiceUnavailableError: "bitHuman's API failed on its side; try again later",
}


MAX_ANSWER_BYTES = 8 << 20  # an API answer is JSON of a few KB; anything far larger is refused


async def _read_capped(response: httpx.Response, limit: int, what: str) -> bytes:
    data = bytearray()
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) > limit:
            raise APIStatusError(
                f"{what}: the answer is larger than {limit >> 20} MB; refusing to read it",
                status_code=response.status_code,
            )
    return bytes(data)


def _is_error_envelope(body: Any) -> bool:
    return isinstance(body, dict) and (
        body.get("success") is False
        or body.get("status") == "error"
        or isinstance(body.get("error"), dict)
    )


def status_error(
    response: httpx.Response, what: str, raw: bytes | None = None, *, advise: bool = True
) -> APIStatusError:
    """Map an error response (bitHuman's envelope, or anything else) to a typed exception.

    An envelope in a 200 answer is an error too: its ``httpStatus`` (else 400) decides the type.
    ``advise=False`` for a server other than bitHuman's (its message says what to do).
    """
    status = response.status_code
    code = reason = message = None
    try:
        body = _json.loads(raw) if raw is not None else response.json()
    except ValueError:
        body = None
    if status < 300 and isinstance(body, dict):
        error = body.get("error")
        inner = error.get("httpStatus") if isinstance(error, dict) else None
        declared = inner if isinstance(inner, int) else body.get("status_code")
        status = declared if isinstance(declared, int) and declared >= 400 else 400
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            code, reason, message = error.get("code"), error.get("reason"), error.get("message")
        elif isinstance(error, str):
            message = error
        message = message or body.get("message")
    cls: type[APIStatusError]
    if status in (401, 403):
        cls = AuthenticationError
    elif isinstance(code, str) and code in _BY_CODE:
        cls = _BY_CODE[code]
    elif status == 404:
        cls = AvatarNotFoundError
    elif status == 402:
        cls = InsufficientBalanceError
    elif status == 429:
        cls = RateLimitedError
    elif status >= 500:
        cls = ServiceUnavailableError
    else:
        cls = APIStatusError
    detail = "; ".join(str(x) for x in (code, message, reason) if x)
    advice = _ADVICE.get(cls, "") if advise else ""
    text = (
        f"{what}: HTTP {status}"
        + (f" ({detail})" if detail else "")
        + (f". {advice}" if advice else "")
    )
    return cls(
        text,
        status_code=status,
        code=code if isinstance(code, str) else None,
        reason=reason if isinstance(reason, str) else None,
        retry_after=parse_retry_after(response.headers.get("retry-after")),
    )


@dataclass(frozen=True)
class ModelDownload:
    """``GET /v1/agent/{code}/model/download?redirect=false``'s answer."""

    code: str
    model: str | None
    filename: str | None
    url: str
    expires_in: float | None
    sha256: str | None


ProgressCallback = Callable[[float, str], None]


class BithumanAPI:
    """Async client for ``{base}/v1/...``. Use as an async context manager or call aclose()."""

    def __init__(
        self,
        *,
        api_secret: str | None = None,
        api_base: str | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        deadline: float | None = None,
    ) -> None:
        self._secret = bithuman_secret(api_secret)
        self.base_url = resolve_api_base(api_base)
        self.retry = retry or RetryPolicy()
        self.deadline = api_deadline(deadline)
        # no default auth header: the secret is added per request, to this host only
        self._client = httpx.AsyncClient(
            verify=tls_context(),
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            follow_redirects=False,
            transport=transport,
            headers={"user-agent": _user_agent()},
        )

    def __repr__(self) -> str:
        return f"BithumanAPI(base_url={self.base_url!r}, api_secret={redact(self._secret)})"

    async def __aenter__(self) -> BithumanAPI:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    @property
    def has_secret(self) -> bool:
        return bool(self._secret)

    async def request(
        self,
        method: str,
        path: str,
        *,
        what: str,
        params: dict[str, Any] | None = None,
        json: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """One API call with retries; returns the decoded JSON body."""
        if not self._secret:
            raise MissingSecretError(
                f"{what} needs a bitHuman API secret: pass api_secret= or set BITHUMAN_API_SECRET"
            )
        all_headers = {"api-secret": self._secret, **(headers or {})}

        async def once() -> Any:
            try:
                async with self._client.stream(
                    method, path, params=params, json=json, headers=all_headers
                ) as response:
                    body = await _read_capped(response, MAX_ANSWER_BYTES, what)
            except httpx.TransportError as err:
                refused = untrusted_certificate(err)
                if refused is not None:
                    raise APIConnectionError(
                        f"{what}: the TLS certificate of {self.base_url} is not trusted "
                        f"({refused}); {CERTIFICATE_HINT}",
                        retryable=False,
                    ) from None
                raise APIConnectionError(
                    f"{what}: cannot reach {self.base_url} ({scrub(str(err), self._secret)}); "
                    f"check the network or BITHUMAN_API_BASE"
                ) from None
            if response.status_code >= 400 or response.status_code in (301, 302, 303, 307, 308):
                raise status_error(response, what, body)
            try:
                decoded = _json.loads(body)
            except ValueError:
                raise APIStatusError(
                    f"{what}: HTTP {response.status_code} with a body that is not JSON",
                    status_code=response.status_code,
                ) from None
            if _is_error_envelope(decoded):  # an error answered with 200
                raise status_error(response, what, body)
            return decoded

        try:
            return await asyncio.wait_for(with_retries(once, self.retry, what), self.deadline)
        except asyncio.TimeoutError:
            raise APITimeoutError(
                f"{what}: bitHuman's API did not answer within {self.deadline:g}s "
                "(AVATARHUB_API_DEADLINE)"
            ) from None

    # -- models -----------------------------------------------------------------------------

    async def model_download(self, code: str, model: str | None = None) -> ModelDownload:
        code = validate_avatar_id(code)
        params: dict[str, str] = {"redirect": "false"}
        if model:
            params["model"] = model
        body = await self.request(
            "GET",
            f"/v1/agent/{code}/model/download",
            params=params,
            what=f"model download for {code}",
        )
        data = _data(body, f"model download for {code}")
        url = data.get("url")
        if not isinstance(url, str) or not url:
            raise APIStatusError(
                f"model download for {code}: the answer has no url", status_code=200
            )
        expires = data.get("expires_in")
        sha = data.get("sha256")
        return ModelDownload(
            code=code,
            model=data.get("model") if isinstance(data.get("model"), str) else model,
            filename=data.get("filename") if isinstance(data.get("filename"), str) else None,
            url=url,
            expires_in=float(expires) if isinstance(expires, (int, float)) else None,
            sha256=sha.lower() if isinstance(sha, str) and len(sha) == 64 else None,
        )

    # -- agents -----------------------------------------------------------------------------

    async def get_agent(self, code: str) -> dict[str, Any]:
        code = validate_avatar_id(code)
        body = await self.request("GET", f"/v1/agent/{code}", what=f"agent {code}")
        return _data(body, f"agent {code}")

    async def list_agents(
        self, *, status: str | None = None, page_size: int = 100
    ) -> list[dict[str, Any]]:
        """Every agent of the account, following pagination."""
        if not 1 <= page_size <= 100:
            raise ConfigurationError("page_size must be between 1 and 100")
        agents: list[dict[str, Any]] = []
        offset = 0
        while True:
            params: dict[str, Any] = {"limit": page_size, "offset": offset}
            if status:
                params["status"] = status
            body = await self.request("GET", "/v1/agents", params=params, what="agent list")
            page = body.get("data") if isinstance(body, dict) else None
            if not isinstance(page, list):
                raise APIStatusError("agent list: the answer has no data list", status_code=200)
            agents.extend(a for a in page if isinstance(a, dict))
            pagination = body.get("pagination") or {}
            has_more = pagination.get("has_more")
            if has_more is None:
                total = pagination.get("total")
                has_more = isinstance(total, int) and offset + len(page) < total
            if not has_more or not page:
                return agents
            offset += len(page)

    async def generate_agent(
        self,
        *,
        prompt: str | None = None,
        image: str | None = None,
        audio: str | None = None,
        aspect_ratio: str | None = None,
        transparency: bool | None = None,
        framing: str | None = None,
        agent_id: str | None = None,
        model: str | None = None,
        version: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Start building an agent; returns ``{"agent_id", "status", ...}``.

        The idempotency key (generated when not given) is reused by retries, so a retried
        request after a lost answer does not build (and bill) a second agent.
        """
        if aspect_ratio is not None and aspect_ratio not in ("16:9", "9:16", "1:1"):
            raise ConfigurationError("aspect_ratio must be one of 16:9, 9:16, 1:1")
        if framing is not None and framing not in ("portrait", "full_body"):
            raise ConfigurationError("framing must be 'portrait' or 'full_body'")
        for name, url in (("image", image), ("audio", audio)):
            if url is not None and not url.startswith(("https://", "http://")):
                raise ConfigurationError(f"{name} must be an http(s) URL")
        if not any((prompt, image, audio)):
            raise ConfigurationError("give at least one of prompt, image or audio")
        payload = _given(
            prompt=prompt,
            image=image,
            audio=audio,
            aspect_ratio=aspect_ratio,
            transparency=transparency,
            framing=framing,
            agent_id=agent_id,
            model=model,
            version=version,
        )
        key = idempotency_key or str(uuid.uuid4())
        body = await self.request(
            "POST",
            "/v1/agent/generate",
            json=payload,
            headers={"Idempotency-Key": key},
            what="agent generation",
        )
        if not isinstance(body, dict) or not body.get("agent_id"):
            raise APIStatusError("agent generation: the answer has no agent_id", status_code=200)
        return body

    async def agent_status(self, agent_id: str) -> dict[str, Any]:
        body = await self.request(
            "GET", f"/v1/agent/status/{_path_segment(agent_id)}", what=f"status of {agent_id}"
        )
        return _data(body, f"status of {agent_id}")

    async def wait_until_ready(
        self,
        agent_id: str,
        *,
        timeout: float = 3600.0,
        interval: float = 5.0,
        on_progress: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        """Poll the agent's status until ``ready``; ``failed`` raises with the server's reason."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            status = await self.agent_status(agent_id)
            state = str(status.get("status", "")).lower()
            if on_progress is not None:
                progress = status.get("progress")
                on_progress(
                    float(progress) if isinstance(progress, (int, float)) else 0.0,
                    str(status.get("progress_msg") or state),
                )
            if state == "ready":
                return status
            if state == "failed":
                reason = status.get("error_message") or "no reason given"
                raise AgentGenerationFailedError(f"agent {agent_id} failed to build: {reason}")
            if loop.time() + interval > deadline:
                raise AgentNotReadyError(
                    f"agent {agent_id} was not ready after {timeout:.0f}s (last status {state!r})"
                )
            await asyncio.sleep(interval)

    # -- dynamics (gestures) ------------------------------------------------------------------

    async def get_dynamics(self, agent_id: str) -> dict[str, Any]:
        body = await self.request(
            "GET", f"/v1/dynamics/{_path_segment(agent_id)}", what=f"gestures of {agent_id}"
        )
        return _data(body, f"gestures of {agent_id}")

    async def gestures(self, agent_id: str) -> dict[str, str]:
        """Action name → preview URL; the names are what ``VideoControl(action=...)`` takes."""
        data = await self.get_dynamics(agent_id)
        gestures = data.get("gestures") or {}
        return {str(k): str(v) for k, v in gestures.items()} if isinstance(gestures, dict) else {}

    async def generate_dynamics(
        self,
        agent_id: str,
        *,
        image_url: str | None = None,
        duration: float | None = None,
        model: str | None = None,
    ) -> dict[str, Any]:
        payload = _given(
            agent_id=agent_id,
            image_url=image_url,
            duration=duration,
            model=model,
        )
        body = await self.request(
            "POST", "/v1/dynamics/generate", json=payload, what=f"gesture generation for {agent_id}"
        )
        return body if isinstance(body, dict) else {}


def _given(**fields: Any) -> dict[str, Any]:
    """The fields that were given: bitHuman reads a missing field and a null differently."""
    return {k: v for k, v in fields.items() if v is not None}


def _data(body: Any, what: str) -> dict[str, Any]:
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        raise APIStatusError(f"{what}: the answer has no data object", status_code=200)
    return data


def _path_segment(value: str) -> str:
    if not value or "/" in value or value in (".", "..") or any(c.isspace() for c in value):
        raise ConfigurationError(f"{value!r} is not a valid agent id")
    return value


def _user_agent() -> str:
    from .version import __version__

    return f"livekit-plugins-avatarhub/{__version__}"
