"""The HTTP API (aiohttp): join-room / leave-room, the cloud launch request, and a worker list.

Every route but ``/health`` needs the service key, as ``Authorization: Bearer <key>`` or
``api-secret: <key>``. Errors use bitHuman's envelope:
``{"success": false, "error": {"code", "message", "httpStatus"}, "status": "error", ...}``.

The launch request comes in every shape LiveKit's bithuman plugin (1.0 … 1.8) sends: JSON
(``agent_id``, ``mode``, ``model``) or, for ``expression*`` models on a non-bitHuman host, a
form (urlencoded, or multipart with a photo) with ``avatar_id``, ``model`` and ``async_mode``.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
from typing import Any

from aiohttp import web

from ..exceptions import CLOUD_PLUGIN_HINT, AvatarHubError, CapacityError, ConfigurationError
from ..ids import check_avatar, check_model
from ..log import logger
from ..remote.protocol import DEFAULT_IDLE_TIMEOUT, session_limit
from ..remote.tokens import token_identity, token_room
from .manager import AvatarManager, WorkerInfo, WorkerManager
from .metrics import ServiceMetrics
from .readiness import Readiness

MANAGER: web.AppKey[AvatarManager] = web.AppKey("manager")
METRICS: web.AppKey[ServiceMetrics] = web.AppKey("metrics", ServiceMetrics)
BACKGROUND: web.AppKey[set[asyncio.Task[Any]]] = web.AppKey("background", set)
READINESS: web.AppKey[Readiness] = web.AppKey("readiness", Readiness)
_FIELD_LIMIT = 16 * 1024  # bytes of one form field
_PHOTO_FIELDS = ("image", "avatar_image", "avatar_image_url")
_PHOTO_REFUSAL = (
    "a photo avatar (image / avatar_image / avatar_image_url) renders only in bitHuman's cloud, "
    "and this service renders on the local runtime; launch an agent code (avatar_id / agent_id) "
    f"created from the photo. {CLOUD_PLUGIN_HINT}"
)
_URL = re.compile(r"^(wss?|https?)://[^\s/]+", re.IGNORECASE)


class _Invalid(Exception):
    def __init__(self, message: str, status: int = 400, code: str = "VALIDATION_ERROR") -> None:
        super().__init__(message)
        self.status, self.code = status, code


_LIVEKIT_RETRY_AFTER = 5  # seconds: a Redis blip of a multi-node LiveKit is over by then


def _livekit_unavailable(err: Exception) -> bool:
    """LiveKit's API saying "not now": its nodes cannot reach one another (503, e.g. their
    Redis is away), or none is registered yet (its nodes re-register within seconds after
    Redis restarts empty)."""
    message = str(getattr(err, "message", ""))
    return (
        getattr(err, "status", None) == 503 and getattr(err, "code", None) == "unavailable"
    ) or (getattr(err, "code", None) is not None and "could not find any available node" in message)


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = {
        "success": False,
        "error": {"code": code, "message": message, "httpStatus": status},
        "status": "error",
        "status_code": status,
    }
    return web.json_response(body, status=status, headers=headers)


def create_app(manager: AvatarManager, *, key: str) -> web.Application:
    if not key:
        raise ValueError("the service needs a key (AVATARHUB_SERVICE_KEY or --key)")
    expected = key.encode()

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path not in ("/health", "/ready", "/metrics"):
            auth = request.headers.get("authorization", "")
            given = (
                auth[7:]
                if auth.lower().startswith("bearer ")
                else request.headers.get("api-secret", "")
            )
            # headers may carry bytes that are not UTF-8: compare them as bytes, never crash
            if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected):
                return _error(401, "UNAUTHORIZED", "missing or wrong service key")
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except _Invalid as err:
            return _error(err.status, err.code, str(err))
        except CapacityError as err:
            return _error(
                503,
                "CAPACITY",
                f"{err}; try again later",
                {"Retry-After": str(max(1, round(err.retry_after)))},
            )
        except AvatarHubError as err:
            return _error(422, "AVATAR_UNAVAILABLE", str(err))
        except web.HTTPException as err:  # aiohttp's own: too large, no route, wrong method
            if err.status < 400:
                raise
            code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "REQUEST_TOO_LARGE"}
            return _error(err.status, code.get(err.status, "HTTP_ERROR"), err.text or err.reason)
        except Exception as err:  # the worker could not start (LiveKit unreachable, ...)
            if _livekit_unavailable(err):  # the client's retry is the cure
                said = getattr(err, "message", err)
                logger.warning(
                    "request %s %s: LiveKit is unavailable: %s", request.method, request.path, said
                )
                return _error(
                    503,
                    "LIVEKIT_UNAVAILABLE",
                    f"LiveKit could not take the avatar now ({said}); try again later",
                    {"Retry-After": str(_LIVEKIT_RETRY_AFTER)},
                )
            logger.error(
                "request %s %s failed: %s: %s",
                request.method,
                request.path,
                type(err).__name__,
                err,
            )
            return _error(
                502, "WORKER_FAILED", f"the avatar could not start: {type(err).__name__}: {err}"
            )

    app = web.Application(middlewares=[guard], client_max_size=64 * 1024)
    app[MANAGER] = manager
    app[METRICS] = ServiceMetrics(manager)
    app[BACKGROUND] = set()
    app[READINESS] = Readiness(manager, dispatch=hasattr(manager, "dispatcher"))
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/workers", list_workers)
    app.router.add_post("/v1/agents/{agent_id}/join-room", join_room)
    app.router.add_post("/v1/agents/{agent_id}/leave-room", leave_room)
    app.router.add_post("/v1/runtime-tokens/request", launch)

    async def close(_: web.Application) -> None:
        await manager.aclose()

    app.on_shutdown.append(close)
    return app


async def health(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    body: dict[str, Any] = {
        "status": "ok",
        "workers": manager.active(),
        "max_workers": manager.max_workers,
    }
    if hasattr(manager, "dispatcher"):
        body["dispatch"] = True
    return web.json_response(body)


async def ready(request: web.Request) -> web.Response:
    """200 when a join would work now, else 503 with the first reason (``/health``: alive)."""
    checks = await request.app[READINESS].checks()
    failed = [f"{name}: {c.detail}" for name, c in checks.items() if not c.ok]
    body: dict[str, Any] = {
        "ready": not failed,
        "checks": {name: {"ok": c.ok, "detail": c.detail} for name, c in checks.items()},
    }
    if failed:
        body["reason"] = failed[0]
    return web.json_response(body, status=503 if failed else 200)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text: workers by state, joins, join latency, frames, render lag."""
    return web.Response(
        body=request.app[METRICS].text(),
        headers={"content-type": "text/plain; version=0.0.4; charset=utf-8"},
    )


async def _join(request: web.Request, **fields: Any) -> tuple[WorkerInfo, bool]:
    """The manager's join for ``fields``, counted (and timed) for /metrics."""
    started = time.monotonic()
    try:
        info, created = await request.app[MANAGER].join(**fields)
    except Exception:
        request.app[METRICS].failed()
        raise
    request.app[METRICS].joined(created, time.monotonic() - started)
    return info, created


async def list_workers(request: web.Request) -> web.Response:
    workers = [w.as_json() for w in request.app[MANAGER].workers()]
    return web.json_response({"success": True, "data": workers})


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise _Invalid("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise _Invalid("the body must be a JSON object")
    return body


def _agent(value: Any) -> str:
    try:
        return check_avatar(value)
    except ValueError as err:
        raise _Invalid(f"agent_id: {err}") from None


def _text(
    body: dict[str, Any], name: str, *, required: bool = True, limit: int = 256
) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(f"{name} is required and must be a non-empty string")
    if len(value) > limit:
        raise _Invalid(f"{name} is longer than {limit} characters")
    return value


def _url(body: dict[str, Any], name: str) -> str:
    value = _text(body, name, limit=2048)
    assert value is not None
    if not _URL.match(value):
        raise _Invalid(f"{name} must be a ws://, wss://, http:// or https:// URL")
    return value


def _model(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Invalid("model must be a string")
    try:
        return check_model(value)
    except ValueError as err:
        raise _Invalid(str(err)) from None


async def join_room(request: web.Request) -> web.Response:
    """The Flutter join-room flow: ``{"room_url", "room_token", "participant_name"}``."""
    agent_id = _agent(request.match_info["agent_id"])
    body = await _body(request)
    room_url = _url(body, "room_url")
    token = _text(body, "room_token", limit=8192)
    assert token is not None
    name = _text(body, "participant_name", required=False, limit=128)
    listen_to = _text(body, "listen_to", required=False, limit=128)
    room = token_room(token)
    if room is None:
        raise _Invalid(
            "room_token has no room grant: mint it with VideoGrants(room_join=True, room=...)"
        )
    participant = token_identity(token) or name or f"avatar-{agent_id}"
    info, created = await _join(
        request,
        agent_id=agent_id,
        room=room,
        participant_id=participant,
        room_url=room_url,
        token=token,
        model=_model(body.get("model")),
        listen_to=listen_to,
        participant_name=name,
        **_limit(body),
    )
    return _joined(info, created)


def _limit(body: dict[str, Any]) -> dict[str, float]:
    """The request's ``max_session_seconds``, checked (the workers' own limit still holds)."""
    value = body.get("max_session_seconds")
    if value is None:
        return {}
    try:
        return {"max_session_seconds": session_limit(value, "the request")}
    except ConfigurationError as err:
        raise _Invalid(str(err)) from None


def _joined(info: WorkerInfo, created: bool) -> web.Response:
    """200 for a new and an existing worker alike (clients check for 200); ``created`` says."""
    body: dict[str, Any] = {
        "success": True,
        "participant_id": info.participant_id,
        "status": "dispatched" if info.dispatch_id else "connected",
        "created": created,
    }
    if info.dispatch_id:
        body["dispatch_id"] = info.dispatch_id
    if info.participant_name is not None:
        body["participant_name"] = info.participant_name
    if info.warnings:
        body["warnings"] = list(info.warnings)
    return web.json_response(body, status=200)


async def leave_room(request: web.Request) -> web.Response:
    agent_id = _agent(request.match_info["agent_id"])
    body = await _body(request) if request.can_read_body else {}
    room = _text(body, "room_name", required=False, limit=256)
    token = _text(body, "room_token", required=False, limit=8192)
    if room is None and token is not None:
        room = token_room(token)
    stopped = await request.app[MANAGER].leave(agent_id, room)
    if not stopped:
        raise _Invalid(f"avatar {agent_id} is not in {room or 'any room'}", 404, "NOT_FOUND")
    return web.json_response(
        {
            "success": True,
            "status": "disconnected",
            "participant_ids": [w.participant_id for w in stopped],
        }
    )


async def launch(request: web.Request) -> web.Response:
    """LiveKit's bithuman plugin in cloud mode, pointed at this service, in any of its shapes."""
    body = await _launch_body(request)
    if any(body.get(name) for name in _PHOTO_FIELDS):
        raise _Invalid(_PHOTO_REFUSAL, 422, "CLOUD_ONLY")
    agent_id = _agent(body.get("agent_id") or body.get("avatar_id"))
    mode = body.get("mode")
    if mode is not None and mode not in ("cpu", "gpu"):
        raise _Invalid("mode must be 'cpu' or 'gpu'")
    background = _flag(body.get("async_mode"), "async_mode")
    room_url = _url(body, "livekit_url")
    token = _text(body, "livekit_token", limit=8192)
    room = _text(body, "room_name", limit=256)
    assert token is not None and room is not None
    participant = token_identity(token) or f"avatar-{agent_id}"
    join = _join(
        request,
        agent_id=agent_id,
        room=room,
        participant_id=participant,
        room_url=room_url,
        token=token,
        model=_model(body.get("model")),
        **_limit(body),
    )
    if background:  # async_mode=true: answer now; the worker list shows how the start went
        task = asyncio.get_running_loop().create_task(join)
        request.app[BACKGROUND].add(task)
        task.add_done_callback(_background_done(request.app[BACKGROUND]))
        return web.json_response(
            {"success": True, "status": "connecting", "participant_id": participant}, status=202
        )
    info, created = await join
    logger.debug("launch for %s in %s (created=%s)", agent_id, room, created)
    return _joined(info, created)


def _background_done(tasks: set[asyncio.Task[Any]]) -> Any:
    def done(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.debug("background launch failed: %s", task.exception())

    return done


async def _launch_body(request: web.Request) -> dict[str, Any]:
    """JSON, urlencoded or multipart, as one dict of fields. A photo part ends the read at once
    (it cannot be rendered here, so there is no reason to receive it)."""
    kind = request.content_type
    if kind == "multipart/form-data":
        fields: dict[str, Any] = {}
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            name = getattr(part, "name", None) or ""
            if name in _PHOTO_FIELDS:
                raise _Invalid(_PHOTO_REFUSAL, 422, "CLOUD_ONLY")
            data = bytearray()
            while chunk := await part.read_chunk(4096):  # type: ignore[union-attr]
                data += chunk
                if len(data) > _FIELD_LIMIT:
                    raise _Invalid(f"form field {name!r} is larger than {_FIELD_LIMIT} bytes")
            try:
                fields[name] = data.decode()
            except UnicodeDecodeError:
                raise _Invalid(f"form field {name!r} is not UTF-8 text") from None
        return fields
    if kind == "application/x-www-form-urlencoded":
        form = await request.post()
        return {k: v for k, v in form.items() if isinstance(v, str)}
    return await _body(request)


def _flag(value: Any, name: str) -> bool:
    if value is None or value is False or value == "false":
        return False
    if value is True or value == "true":
        return True
    raise _Invalid(f"{name} must be 'true' or 'false'")


def default_manager(
    *,
    api_secret: str | None,
    max_workers: int,
    room_factory: Any = None,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
) -> WorkerManager:
    """Workers that load avatars like ``AvatarSession`` does (``loader.open_avatar``: the hub,
    the cloud-only fallback, the cache lease) and connect real LiveKit rooms."""
    from ..remote.participant import AvatarWorker
    from ..rendering.loader import OpenedAvatar, open_avatar

    async def opener(agent_id: str, model: str | None) -> OpenedAvatar:
        return await open_avatar(agent_id, model=model, api_secret=api_secret)

    def factory(**kwargs: Any) -> AvatarWorker:
        if room_factory is not None:
            kwargs["room_factory"] = room_factory
        return AvatarWorker(opener=opener, idle_timeout=idle_timeout, **kwargs)

    from .memory import collect_left_avatar

    return WorkerManager(factory, max_workers=max_workers, on_avatar_gone=collect_left_avatar)


async def serve(
    *,
    host: str,
    port: int,
    key: str,
    api_secret: str | None,
    max_workers: int,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    dispatch: bool = False,
    agent_name: str | None = None,
    log_every: float = 60.0,
) -> None:
    """Run until SIGINT/SIGTERM, then stop every worker (or, with ``dispatch``, just stop)."""
    import signal

    manager: AvatarManager
    if dispatch:
        from ..remote.dispatcher import AvatarDispatcher
        from .dispatched import DispatchManager

        manager = DispatchManager(AvatarDispatcher(agent_name=agent_name))
        what = f"dispatching to LiveKit agent {manager.dispatcher.agent_name!r}"
    else:
        from .memory import import_avatar_modules

        manager = default_manager(
            api_secret=api_secret, max_workers=max_workers, idle_timeout=idle_timeout
        )
        what = f"{max_workers} workers max"
        await asyncio.to_thread(import_avatar_modules)
    app = create_app(manager, key=key)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    from .memory import freeze_startup_objects

    freeze_startup_objects()
    logger.warning("avatar service listening on http://%s:%d (%s)", host, port, what)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except NotImplementedError:  # pragma: no cover - Windows
            pass
    summary = asyncio.create_task(app[METRICS].log_every(log_every))
    try:
        await stop.wait()
    finally:
        summary.cancel()
        await runner.cleanup()
