"""What the avatar service exposes to watch it: Prometheus text at ``/metrics``, and the same
numbers in a periodic log line.

Counted as they happen: joins by result and join latency. Read at scrape time from the live
workers (so the video path pays nothing for metrics): workers by state, frames published,
late and dropped, the render lag, lip sync at the publisher, and into histograms each reply's
playback latency and each avatar's time to first frame.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..log import logger
from ..rendering.generator import FIRST_FRAME_BUCKETS, LATENCY_BUCKETS

if TYPE_CHECKING:
    from ..rendering.generator import FrameStats
    from .manager import AvatarManager

STATES = ("connecting", "connected", "reconnecting", "failed", "dispatched")


@dataclass
class Frames:
    """Frame counts over every worker the service has run, the live ones' worst state."""

    published: int = 0
    late: int = 0
    dropped: int = 0
    rendered: float = 0.0
    lag: float = 0.0
    av_offset: float = 0.0  # the live avatar furthest out of lip sync, signed

    def add(self, stats: FrameStats) -> None:
        self.published += stats.frames
        self.late += stats.late
        self.dropped += stats.stale
        self.rendered += stats.rendered_seconds


class _Seen:
    """One worker's stats as the metrics last read them."""

    __slots__ = ("first_frame", "replies", "stats")

    def __init__(self, stats: FrameStats) -> None:
        self.stats, self.replies, self.first_frame = stats, 0, False


class ServiceMetrics:
    def __init__(self, manager: AvatarManager) -> None:
        self._manager = manager
        self.registry = CollectorRegistry(auto_describe=True)
        self._retired = Frames()  # what workers that have stopped published
        self._seen: dict[int, _Seen] = {}
        # first, so that a scrape's histograms hold what this collector observes in it
        self.registry.register(_WorkerCollector(self))
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
        self.playback_latency = Histogram(
            "avatarhub_playback_latency_seconds",
            "per reply: the agent's first audio in -> the first avatar frame carrying it out",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.first_frame = Histogram(
            "avatarhub_first_frame_seconds",
            "per avatar: asked for -> its first frame out (model load included)",
            buckets=FIRST_FRAME_BUCKETS,
            registry=self.registry,
        )

    def joined(self, created: bool, seconds: float) -> None:
        self.joins.labels("created" if created else "existing").inc()
        if created:
            self.join_seconds.observe(seconds)

    def failed(self) -> None:
        self.joins.labels("failed").inc()

    def frames(self) -> Frames:
        """Every worker's frames so far, read off the live workers (the video path pays
        nothing for metrics); the replies and first frames since the last read go into the
        histograms, a stopped worker's last ones too."""
        live: dict[int, _Seen] = {}
        for info in self._manager.workers():
            stats = info.worker.frame_stats if info.worker is not None else None
            if stats is not None:
                live[id(stats)] = self._seen.get(id(stats)) or _Seen(stats)
        retired = self._retired
        for key, seen in self._seen.items():
            if key not in live:  # that worker has gone: keep what it published
                self._observe(seen)
                retired.add(seen.stats)
        self._seen = live
        out = Frames(retired.published, retired.late, retired.dropped, retired.rendered)
        for seen in live.values():
            self._observe(seen)
            stats = seen.stats
            out.add(stats)
            out.lag = max(out.lag, stats.lag)
            if abs(stats.av_offset) > abs(out.av_offset):
                out.av_offset = stats.av_offset
        return out

    def _observe(self, seen: _Seen) -> None:
        stats = seen.stats
        for latency in stats.latencies_since(seen.replies):
            self.playback_latency.observe(latency)
        seen.replies = stats.replies
        if not seen.first_frame and stats.first_frame is not None:
            seen.first_frame = True
            self.first_frame.observe(stats.first_frame)

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
        frames = self.frames()
        joins = {
            s.labels["result"]: int(s.value)
            for m in self.joins.collect()
            for s in m.samples
            if s.name.endswith("_total")
        }
        return (
            f"avatars: {states or 'none'}; joins: {joins.get('created', 0)} new, "
            f"{joins.get('existing', 0)} existing, {joins.get('failed', 0)} failed; "
            f"frames: {frames.published} published, {frames.late} late, {frames.dropped} "
            f"dropped; render lag {frames.lag * 1000:.0f} ms; lip sync at the publisher "
            f"{frames.av_offset * 1000:+.0f} ms"
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
        frames = self._metrics.frames()
        yield CounterMetricFamily(
            "avatarhub_frames_published", "video frames published", value=frames.published
        )
        yield CounterMetricFamily(
            "avatarhub_rendered_seconds",
            "time the avatars' runtimes rendered, idle frames included (what bitHuman bills)",
            value=frames.rendered,
        )
        yield CounterMetricFamily(
            "avatarhub_frames_late",
            "video frames more than one frame period behind the avatar's frame clock",
            value=frames.late,
        )
        yield CounterMetricFamily(
            "avatarhub_frames_dropped",
            "pictures not sent to catch up after a stall (their audio was)",
            value=frames.dropped,
        )
        yield GaugeMetricFamily(
            "avatarhub_render_lag_seconds",
            "how far the slowest avatar is behind its frame clock",
            value=frames.lag,
        )
        yield GaugeMetricFamily(
            "avatarhub_av_offset_seconds",
            "lip sync at the publisher, the avatar furthest out: how much later a spoken "
            "frame's picture leaves LiveKit's queues than its audio (< 0: the picture leads)",
            value=frames.av_offset,
        )
