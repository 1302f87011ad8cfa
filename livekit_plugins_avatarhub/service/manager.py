"""Workers by (agent, room): one each, idempotent joins, a capacity limit, crashes kept visible."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..log import logger
from .worker import AvatarWorker

WorkerFactory = Callable[..., AvatarWorker]


class CapacityError(Exception):
    """Every worker slot is taken."""


@dataclass
class WorkerInfo:
    agent_id: str
    room: str
    participant_id: str
    status: str  # connecting | connected | failed | stopped
    started_at: float
    error: str | None = None
    listen_to: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "room_name": self.room,
            "participant_id": self.participant_id,
            "status": self.status,
            "started_at": self.started_at,
            "error": self.error,
            "listen_to": self.listen_to,
        }


class WorkerManager:
    def __init__(self, worker_factory: WorkerFactory, *, max_workers: int = 4) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self._factory = worker_factory
        self.max_workers = max_workers
        self._workers: dict[tuple[str, str], tuple[WorkerInfo, AvatarWorker | None]] = {}
        self._lock = asyncio.Lock()

    def active(self) -> int:
        return sum(
            1 for info, _ in self._workers.values() if info.status in ("connecting", "connected")
        )

    def workers(self) -> list[WorkerInfo]:
        return [info for info, _ in self._workers.values()]

    def get(self, agent_id: str, room: str) -> WorkerInfo | None:
        entry = self._workers.get((agent_id, room))
        return entry[0] if entry else None

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
    ) -> tuple[WorkerInfo, bool]:
        """Start the avatar in ``room`` unless it already runs there; returns (info, created)."""
        key = (agent_id, room)
        async with self._lock:
            entry = self._workers.get(key)
            if entry is not None and entry[0].status in ("connecting", "connected"):
                return entry[0], False
            if self.active() >= self.max_workers:
                raise CapacityError(f"all {self.max_workers} avatar workers are busy")
            info = WorkerInfo(
                agent_id, room, participant_id, "connecting", time.time(), listen_to=listen_to
            )
            self._workers[key] = (info, None)
        worker = self._factory(
            agent_id=agent_id, room_url=room_url, token=token, model=model, listen_to=listen_to
        )
        try:
            await worker.start()
        except Exception as err:
            info.status, info.error = "failed", f"{type(err).__name__}: {err}"
            logger.error("avatar %s could not join room %s: %s", agent_id, room, info.error)
            raise
        info.status = "connected"
        self._workers[key] = (info, worker)
        worker.stopped.add_done_callback(lambda _: self._on_stopped(key, worker))
        logger.info("avatar %s joined room %s as %s", agent_id, room, participant_id)
        return info, True

    def _on_stopped(self, key: tuple[str, str], worker: AvatarWorker) -> None:
        entry = self._workers.get(key)
        if entry is None or entry[1] is not worker:
            return
        info = entry[0]
        if worker.error:
            info.status, info.error = "failed", worker.error  # kept, so callers can see it
        else:
            info.status = "stopped"
            del self._workers[key]

    async def leave(self, agent_id: str, room: str | None = None) -> list[WorkerInfo]:
        """Stop the agent's worker in ``room`` (or in every room); returns what was stopped."""
        stopped = []
        for (agent, name), (info, worker) in list(self._workers.items()):
            if agent != agent_id or (room is not None and name != room):
                continue
            if worker is not None:
                await worker.stop()
            self._workers.pop((agent, name), None)
            info.status = "stopped"
            stopped.append(info)
        return stopped

    async def aclose(self) -> None:
        for _, worker in list(self._workers.values()):
            if worker is not None:
                await worker.stop()
        self._workers.clear()
