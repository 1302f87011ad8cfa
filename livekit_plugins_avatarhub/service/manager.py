"""Workers by (agent, room): one each, idempotent joins, a capacity limit, crashes kept visible.

A join for an (agent, room) whose worker is still starting waits for that start and gets its
real outcome. A leave (or shutdown) that arrives while a worker is starting stops it as soon as
its start returns. Failed workers stay listed, so callers can see why, but only the newest
``MAX_FAILED`` and none older than ``FAILED_TTL`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..exceptions import CapacityError
from ..log import logger
from ..remote.participant import AvatarWorker

if TYPE_CHECKING:
    from ..rendering.generator import FrameStats

WorkerFactory = Callable[..., AvatarWorker]
MAX_FAILED = 50
FAILED_TTL = 3600.0


@dataclass
class WorkerInfo:
    agent_id: str
    room: str
    participant_id: str
    status: str  # connecting | connected | reconnecting | failed | stopped
    started_at: float
    error: str | None = None
    listen_to: str | None = None
    participant_name: str | None = None
    warnings: list[str] = field(default_factory=list)
    worker: AvatarWorker | None = field(default=None, repr=False)
    dispatch_id: str | None = None  # with ``serve --dispatch``: LiveKit's dispatch

    def as_json(self) -> dict[str, Any]:
        status, worker = self.status, self.worker
        if status == "connected" and worker is not None and worker.reconnecting:
            status = "reconnecting"
        live = worker if status in ("connected", "reconnecting") else None
        stats = worker.frame_stats if worker is not None else None
        return {
            "agent_id": self.agent_id,
            "room_name": self.room,
            "participant_id": self.participant_id,
            "participant_name": self.participant_name,
            "status": status,
            "started_at": self.started_at,
            "error": self.error or (live.avatar_state_reason if live else None),
            # the avatar may be down while its participant speaks on as plain audio
            "avatar_state": live.avatar_state if live else None,
            # what bitHuman bills: the time its runtime rendered, idle frames included
            "rendered_seconds": round(stats.rendered_seconds, 2) if stats is not None else 0.0,
            **({"frames": frame_json(stats)} if stats is not None else {}),
            "listen_to": self.listen_to,
            "warnings": list(self.warnings),
            **({"dispatch_id": self.dispatch_id} if self.dispatch_id else {}),
        }


@dataclass
class _Start:
    """A start in flight: duplicates wait on ``done``; ``leave`` sets ``cancelled``."""

    info: WorkerInfo
    done: asyncio.Future[WorkerInfo]
    task: asyncio.Task[WorkerInfo] | None = None
    cancelled: bool = False


def _detached(err: BaseException) -> BaseException:
    """``err`` for the joins waiting on the same start, without its traceback: the traceback
    holds the failed worker's frames (its avatar, its frame buffers) in a reference cycle
    through this future, which only a full garbage collection would free, so a service whose
    joins keep failing grew by hundreds of MB between collections."""
    try:
        copy = type(err).__new__(type(err))
        copy.__dict__.update(err.__dict__)
        copy.args = err.args
    except Exception:  # an exception type that cannot be rebuilt: say what it said
        return RuntimeError(f"{type(err).__name__}: {err}")
    return copy


class AvatarManager(Protocol):
    """What the HTTP API needs: in-process workers (``WorkerManager``) or LiveKit's dispatch
    (``DispatchManager``)."""

    max_workers: int

    def active(self) -> int: ...
    def workers(self) -> list[WorkerInfo]: ...
    def get(self, agent_id: str, room: str) -> WorkerInfo | None: ...
    async def join(
        self,
        *,
        agent_id: str,
        room: str,
        participant_id: str,
        room_url: str,
        token: str,
        model: str | None = None,
        listen_to: str | None = None,
        participant_name: str | None = None,
        max_session_seconds: float | None = None,
    ) -> tuple[WorkerInfo, bool]: ...
    async def leave(self, agent_id: str, room: str | None = None) -> list[WorkerInfo]: ...
    async def aclose(self) -> None: ...


class WorkerManager:
    def __init__(
        self,
        worker_factory: WorkerFactory,
        *,
        max_workers: int = 4,
        on_avatar_gone: Callable[[], None] | None = None,
    ) -> None:
        """``on_avatar_gone`` runs once each avatar has stopped or failed to start (the
        service frees its memory there, see ``memory.collect_left_avatar``)."""
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self._factory = worker_factory
        self._on_avatar_gone = on_avatar_gone
        self.max_workers = max_workers
        self._workers: dict[tuple[str, str], WorkerInfo] = {}
        self._starting: dict[tuple[str, str], _Start] = {}
        self._closed = False

    def active(self) -> int:
        return sum(
            1
            for info in self._workers.values()
            if info.status in ("connecting", "connected", "reconnecting")
        )

    def workers(self) -> list[WorkerInfo]:
        self._forget_old_failures()
        return list(self._workers.values())

    def get(self, agent_id: str, room: str) -> WorkerInfo | None:
        return self._workers.get((agent_id, room))

    async def join(
        self,
        *,
        agent_id: str,
        room: str,
        participant_id: str,
        room_url: str,
        token: str,
        model: str | None = None,
        listen_to: str | None = None,
        participant_name: str | None = None,
        max_session_seconds: float | None = None,
    ) -> tuple[WorkerInfo, bool]:
        """Start the avatar in ``room`` unless it already runs there; returns (info, created).

        A duplicate of a join still in flight waits for it: it gets the same worker, or the
        same error.
        """
        if self._closed:
            raise CapacityError("the avatar service is shutting down")
        key = (agent_id, room)
        pending = self._starting.get(key)
        if pending is not None:
            return await asyncio.shield(pending.done), False
        existing = self._workers.get(key)
        if existing is not None and existing.status in ("connected", "reconnecting"):
            return existing, False
        if self.active() >= self.max_workers:
            raise CapacityError(f"all {self.max_workers} avatar workers are busy")
        info = WorkerInfo(
            agent_id,
            room,
            participant_id,
            "connecting",
            time.time(),
            listen_to=listen_to,
            participant_name=participant_name,
        )
        self._workers[key] = info
        start = _Start(info, asyncio.get_running_loop().create_future())
        self._starting[key] = start
        worker = self._factory(
            agent_id=agent_id,
            room_url=room_url,
            token=token,
            model=model,
            listen_to=listen_to,
            participant_name=participant_name,
            **({"max_session_seconds": max_session_seconds} if max_session_seconds else {}),
        )
        start.task = asyncio.current_task()
        try:
            await self._start(key, start, worker)
        finally:
            self._starting.pop(key, None)
            if not start.done.done():
                start.done.cancel()
            elif not start.done.cancelled():
                start.done.exception()  # retrieved: duplicates may not have been waiting
        return info, True

    async def _start(self, key: tuple[str, str], start: _Start, worker: AvatarWorker) -> None:
        info = start.info
        try:
            await worker.start()
        except BaseException as err:
            cancelled = isinstance(err, asyncio.CancelledError)
            info.status = "stopped" if cancelled else "failed"
            info.error = None if cancelled else f"{type(err).__name__}: {err}"
            if cancelled:
                self._workers.pop(key, None)
            else:
                logger.error("avatar %s could not join room %s: %s", *key, info.error)
                self._forget_old_failures()
            start.done.set_exception(
                _detached(err) if not cancelled else CapacityError("shutting down")
            )
            self._gone()
            raise
        if start.cancelled:  # a leave arrived while it was connecting: it goes now
            logger.info("avatar %s left room %s right after joining (leave-room)", *key)
            await worker.stop()
            info.status = "stopped"
            start.done.set_result(info)
            self._gone()
            return
        info.status = "connected"
        info.worker = worker
        if worker.participant_sid:
            info.participant_id = worker.participant_sid
        info.warnings.extend(worker.warnings)
        worker.stopped.add_done_callback(lambda _: self._on_stopped(key, worker))
        logger.info("avatar %s joined room %s as %s", key[0], key[1], info.participant_id)
        start.done.set_result(info)

    def _gone(self) -> None:
        if self._on_avatar_gone is not None:  # once the stopping code has unwound
            asyncio.get_running_loop().call_soon(self._on_avatar_gone)

    def _on_stopped(self, key: tuple[str, str], worker: AvatarWorker) -> None:
        self._gone()
        info = self._workers.get(key)
        if info is None or info.worker is not worker:
            return
        info.worker = None
        if worker.error:
            info.status, info.error = "failed", worker.error  # kept, so callers can see it
            self._forget_old_failures()
        else:
            info.status = "stopped"
            del self._workers[key]

    def _forget_old_failures(self) -> None:
        failed = sorted(
            (info.started_at, key) for key, info in self._workers.items() if info.status == "failed"
        )
        cutoff = time.time() - FAILED_TTL
        excess = len(failed) - MAX_FAILED
        for i, (started, key) in enumerate(failed):
            if i < excess or started < cutoff:
                del self._workers[key]

    async def leave(self, agent_id: str, room: str | None = None) -> list[WorkerInfo]:
        """Stop the agent's worker in ``room`` (or in every room); returns what was stopped.

        A worker still connecting is stopped as soon as its start returns.
        """
        stopped = []
        for (agent, name), info in list(self._workers.items()):
            if agent != agent_id or (room is not None and name != room):
                continue
            pending = self._starting.get((agent, name))
            if pending is not None:
                pending.cancelled = True
            elif info.worker is not None:
                await info.worker.stop()
                info.worker = None  # the info goes back to the caller; the avatar is let go
            self._workers.pop((agent, name), None)
            info.status = "stopped"
            stopped.append(info)
        return stopped

    async def aclose(self) -> None:
        """Stop every worker; joins still connecting are cancelled, not waited for."""
        self._closed = True
        tasks = [s.task for s in self._starting.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(task), 5.0)
        for info in list(self._workers.values()):
            if info.worker is not None:
                await info.worker.stop()
        self._workers.clear()


def frame_json(stats: FrameStats) -> dict[str, Any]:
    """One avatar's frames and timings as ``/v1/workers`` shows them (times in ms)."""

    def ms(seconds: float | None) -> float | None:
        return None if seconds is None else round(seconds * 1000, 1)

    return {
        "published": stats.frames,
        "late": stats.late,
        "dropped": stats.stale,
        "first_frame_ms": ms(stats.first_frame),
        "playback_latency_ms": ms(stats.playback_latency[-1] if stats.playback_latency else None),
        "av_offset_ms": ms(stats.av_offset),
    }
