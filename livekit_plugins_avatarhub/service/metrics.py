"""What the avatar service exposes to watch it: Prometheus text at ``/metrics``, and the same
numbers in a periodic log line.

Counted as they happen: joins by result and join latency. Read at scrape time from the live
workers (so the video path pays nothing for metrics): workers by state, frames published,
frames later than one frame period ("dropped" for a real-time viewer), the render lag.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..log import logger

if TYPE_CHECKING:
    from .manager import AvatarManager

STATES = ("connecting", "connected", "reconnecting", "failed", "dispatched")


class ServiceMetrics:
    def __init__(self, manager: AvatarManager) -> None:
        self._manager = manager
        self.registry = CollectorRegistry(auto_describe=True)
        self.joins = Counter(
            "avatarhub_joins",
            "join-room and launch requests, by result",
            ["result"],
            registry=self.registry,
        )
        self.join_seconds = Histogram(
            "avatarhub_join_seconds",
            "time from a join request to the avatar in the room",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
            registry=self.registry,
        )
        # frames, late frames and rendered seconds of workers that have stopped
        self._retired = [0, 0, 0.0]
        self._seen: dict[int, tuple[int, int, float]] = {}
        self.registry.register(_WorkerCollector(self))

    def joined(self, created: bool, seconds: float) -> None:
        self.joins.labels("created" if created else "existing").inc()
        if created:
            self.join_seconds.observe(seconds)

    def failed(self) -> None:
        self.joins.labels("failed").inc()

    def frames(self) -> tuple[int, int, float, float]:
        """(published, late, worst current lag, rendered seconds) over every worker this
        service has run."""
        live: dict[int, tuple[int, int, float]] = {}
        lag = 0.0
        for info in self._manager.workers():
            stats = info.worker.frame_stats if info.worker is not None else None
            if stats is not None:
                live[id(stats)] = (stats.frames, stats.late, stats.rendered_seconds)
                lag = max(lag, stats.lag)
        for key, (frames, late, seconds) in self._seen.items():
            if key not in live:  # that worker has gone: keep what it published
                self._retired[0] += frames
                self._retired[1] += late
                self._retired[2] += seconds
        self._seen = live
        return (
            int(self._retired[0]) + sum(v[0] for v in live.values()),
            int(self._retired[1]) + sum(v[1] for v in live.values()),
            lag,
            self._retired[2] + sum(v[2] for v in live.values()),
        )

    def by_state(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for info in self._manager.workers():
            state = info.as_json()["status"]
            counts[state] = counts.get(state, 0) + 1
        return counts

    def text(self) -> bytes:
        return bytes(generate_latest(self.registry))

    def summary(self) -> str:
        states = ", ".join(f"{n} {s}" for s, n in self.by_state().items() if n)
        published, late, lag, _ = self.frames()
        joins = {
            s.labels["result"]: int(s.value)
            for m in self.joins.collect()
            for s in m.samples
            if s.name.endswith("_total")
        }
        return (
            f"avatars: {states or 'none'}; joins: {joins.get('created', 0)} new, "
            f"{joins.get('existing', 0)} existing, {joins.get('failed', 0)} failed; "
            f"frames: {published} published, {late} late; render lag {lag * 1000:.0f} ms"
        )

    async def log_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            logger.info("%s", self.summary())


class _WorkerCollector:
    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        states = GaugeMetricFamily(
            "avatarhub_workers", "avatar workers of this service, by state", labels=["state"]
        )
        for state, count in self._metrics.by_state().items():
            states.add_metric([state], count)
        yield states
        published, late, lag, rendered = self._metrics.frames()
        yield CounterMetricFamily(
            "avatarhub_frames_published", "video frames published", value=published
        )
        yield CounterMetricFamily(
            "avatarhub_rendered_seconds",
            "time the avatars' runtimes rendered, idle frames included (what bitHuman bills)",
            value=rendered,
        )
        yield CounterMetricFamily(
            "avatarhub_frames_dropped",
            "video frames more than one frame period late (lost to a real-time viewer)",
            value=late,
        )
        yield GaugeMetricFamily(
            "avatarhub_render_lag_seconds",
            "how far the slowest avatar is behind its frame clock",
            value=lag,
        )
