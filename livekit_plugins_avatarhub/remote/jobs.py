"""Avatars as LiveKit agent jobs: LiveKit's own dispatch places them on machines with room.

``python -m livekit_plugins_avatarhub worker start|dev`` registers an agent worker with the
LiveKit server under an agent name (``--agent-name``, else ``AVATARHUB_AGENT_NAME``, else
``avatarhub-avatar``), for explicit dispatch only (``AgentDispatchService.CreateDispatch``).
The worker reports its load as active avatars over capacity, so LiveKit sends no job to a full
machine; SIGTERM drains it (LiveKit's drain).

A job's metadata says what to render (``protocol.AvatarJob``).
The job joins with LiveKit's own token (identity, name and ``lk.publish_on_behalf`` set when the
job is accepted), answers ``trigger_dynamics``, and leaves when the room empties or is left.
Malformed metadata or an unknown avatar fails that job, never the worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from ..config import env_or
from ..exceptions import ConfigurationError
from ..ids import is_demo
from ..log import logger
from . import protocol
from .protocol import AvatarJob

if TYPE_CHECKING:
    from livekit.agents import JobContext, JobProcess, JobRequest

    from ..rendering.loader import OpenedAvatar

_BYTES_PER_AVATAR = 4 << 30  # a bitHuman avatar takes 4-8 GB of memory
_REPORT_EVERY = 60.0
_METRICS_EVERY = 2.0


# -- the worker's side: accept, load, run ---------------------------------------------------


async def accept_job(request: JobRequest) -> None:
    """Accept as the participant the metadata asks for. A job with bad metadata is accepted
    too, and fails in its entrypoint with the reason: rejecting it would only send it on to the
    next worker, which would refuse it as well."""
    try:
        job = AvatarJob.parse(request.job.metadata)
    except ConfigurationError as err:
        logger.warning("avatar job %s: %s", request.job.id, err)
        await request.accept(identity=f"avatarhub-invalid-{request.job.id}")
        return
    await request.accept(
        identity=job.participant_identity,
        name=job.participant_name or "",
        attributes=job.participant_attributes(),
    )


async def join_room(ctx: JobContext) -> Any:
    """The job's room, connected (only the audio the avatar needs is subscribed)."""
    from livekit.agents import AutoSubscribe

    await ctx.connect(auto_subscribe=AutoSubscribe.AUDIO_ONLY)
    return ctx.room


async def run_job(ctx: JobContext) -> None:
    """The entrypoint of every avatar job. A job that cannot run (bad metadata, an avatar that
    cannot be loaded) logs why and ends itself, so it never holds a slot of the worker."""
    try:
        job = AvatarJob.parse(ctx.job.metadata)  # before joining: a bad job never enters a room
        first = await _first_dispatch(ctx, job)
        if first is not None:
            logger.info(
                "avatar job %s leaves: the dispatch %s put avatar %s into room %s first",
                ctx.job.id,
                first,
                job.agent_id,
                ctx.job.room.name,
            )
            ctx.shutdown(reason="another dispatch of this avatar came first")
            return
        worker = await _start_worker(ctx, job)
    except Exception as err:
        logger.error("avatar job %s failed: %s", ctx.job.id, err)
        ctx.shutdown(reason=f"avatar job failed: {err}")
        return
    report = asyncio.create_task(_report(worker, job.agent_id, _REPORT_EVERY))
    try:
        await worker.stopped
    finally:  # its last report counts the frames since the one before
        report.cancel()
        await asyncio.gather(report, return_exceptions=True)
    if worker.error:
        logger.error("avatar %s stopped: %s", job.agent_id, worker.error)
    ctx.shutdown(reason=worker.error or "the avatar left the room")


async def _first_dispatch(ctx: JobContext, job: AvatarJob) -> str | None:
    """An older dispatch of the same avatar in the room, if any: callers that dispatched it at
    the same moment keep the oldest (``AvatarDispatcher.ensure``), and so does the worker, so
    the room never has the avatar twice, even before the newer dispatch is withdrawn. A
    dispatch list that cannot be read lets the job run."""
    from .dispatcher import AvatarDispatcher, oldest

    try:
        dispatcher = AvatarDispatcher(agent_name=ctx.job.agent_name or None)
    except ConfigurationError:  # no LiveKit API credentials here
        return None
    try:
        found = await dispatcher.find(ctx.job.room.name, job.agent_id)
    except Exception as err:
        logger.debug("listing the dispatches of room %s: %s", ctx.job.room.name, err)
        return None
    finally:
        await dispatcher.aclose()
    first = oldest(found)  # (this job's own dispatch, unless it was withdrawn already)
    return None if first is None or first.id == ctx.job.dispatch_id else str(first.id)


async def _start_worker(ctx: JobContext, job: AvatarJob) -> Any:
    from .participant import AvatarWorker

    room = await join_room(ctx)
    worker = AvatarWorker(
        agent_id=job.agent_id,
        model=job.model,
        listen_to=job.listen_to,
        allow_gestures_from=job.allow_gestures_from,
        max_session_seconds=job.max_session_seconds,
        opener=_process_opener(ctx.proc.userdata),
        room_factory=lambda: room,
    )
    await worker.start()
    logger.info("avatar %s is rendering in room %s", job.agent_id, getattr(room, "name", "?"))
    return worker


class _JobMetrics:
    """This package's avatar metrics in the job's process, for LiveKit's Prometheus endpoint
    (``--prometheus-port``; job processes write through prometheus multiprocess mode)."""

    _made: dict[str, Any] = {}

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        from ..rendering.generator import FIRST_FRAME_BUCKETS, LATENCY_BUCKETS

        made = type(self)._made  # one set per process: prometheus refuses a second
        if not made:
            made["frames"] = Counter(
                "avatarhub_job_frames_published", "video frames published by avatar jobs"
            )
            made["late"] = Counter(
                "avatarhub_job_frames_late",
                "video frames more than one frame period behind the avatar's frame clock",
            )
            made["dropped"] = Counter(
                "avatarhub_job_frames_dropped",
                "pictures not sent to catch up after a stall (their audio was)",
            )
            made["rendered"] = Counter(
                "avatarhub_job_rendered_seconds",
                "time the avatar jobs' runtimes rendered, idle frames included (billed time)",
            )
            made["lag"] = Gauge(
                "avatarhub_job_render_lag_seconds",
                "render lag of avatar jobs",
                multiprocess_mode="max",
            )
            made["offset"] = Gauge(
                "avatarhub_job_av_offset_seconds",
                "lip sync at the publisher: how much later a spoken frame's picture leaves "
                "LiveKit's queues than its audio (< 0: the picture leads)",
                multiprocess_mode="max",
            )
            made["latency"] = Histogram(
                "avatarhub_job_playback_latency_seconds",
                "per reply: the agent's first audio in -> the first avatar frame carrying it out",
                buckets=LATENCY_BUCKETS,
            )
            made["first"] = Histogram(
                "avatarhub_job_first_frame_seconds",
                "per avatar job: dispatched -> its first frame out (model load included)",
                buckets=FIRST_FRAME_BUCKETS,
            )
        self._made = made
        self._seen = (0, 0, 0, 0.0, 0)  # frames, late, dropped, rendered, replies
        self._first_seen = False

    def update(self, stats: Any) -> None:
        made, (frames, late, dropped, rendered, replies) = self._made, self._seen
        made["frames"].inc(stats.frames - frames)
        made["late"].inc(stats.late - late)
        made["dropped"].inc(stats.stale - dropped)
        made["rendered"].inc(stats.rendered_seconds - rendered)
        made["lag"].set(stats.lag)
        made["offset"].set(stats.av_offset)
        for latency in stats.latencies_since(replies):
            made["latency"].observe(latency)
        if not self._first_seen and stats.first_frame is not None:
            self._first_seen = True
            made["first"].observe(stats.first_frame)
        self._seen = (stats.frames, stats.late, stats.stale, stats.rendered_seconds, stats.replies)


async def _report(worker: Any, agent_id: str, every: float) -> None:
    """The job's avatar metrics to Prometheus every few seconds, and to the log every minute."""
    try:
        metrics: _JobMetrics | None = _JobMetrics()
    except ImportError:  # prometheus-client comes with livekit-agents >= 1.x in most setups
        metrics = None
    ticks = 0
    held = None  # the counts outlive the stopped avatar, which lets go of them
    try:
        while True:
            await asyncio.sleep(_METRICS_EVERY)
            stats = held = worker.frame_stats or held
            if stats is None:
                continue
            if metrics is not None:
                metrics.update(stats)
            ticks += 1
            if ticks * _METRICS_EVERY >= every:
                ticks = 0
                logger.info(
                    "avatar %s: %d frames published, %d late, %d dropped, render lag %.0f ms, "
                    "lip sync at the publisher %+.0f ms",
                    agent_id,
                    stats.frames,
                    stats.late,
                    stats.stale,
                    stats.lag * 1000,
                    stats.av_offset * 1000,
                )
    finally:  # the job ends: what it published since the last report counts too
        stats = worker.frame_stats or held
        if metrics is not None and stats is not None:
            metrics.update(stats)


def _process_opener(userdata: dict[str, Any]) -> Any:
    """Load avatars once per process and reuse them for the next job there (new transaction id
    and token each time, as ``AvatarSession(runtime=...)`` does)."""
    from ..rendering.loader import OpenedAvatar, open_avatar
    from ..rendering.runtime import renew_for_job

    cache: dict[tuple[str, str | None], OpenedAvatar] = userdata.setdefault("avatarhub", {})

    class _Reused(OpenedAvatar):
        async def aclose(self) -> None:  # stays loaded for the next job of this process
            self.runtime.interrupt()

    async def opener(agent_id: str, model: str | None) -> OpenedAvatar:
        held = cache.get((agent_id, model))
        if held is not None:
            await renew_for_job(held.runtime)
            return _Reused(held.runtime, held.model_file)
        opened = await open_avatar(agent_id, model=model)
        cache[(agent_id, model)] = opened
        return _Reused(opened.runtime, opened.model_file)

    return opener


def prewarm(proc: JobProcess) -> None:
    """Fetch the avatars named in ``AVATARHUB_PREFETCH`` before any job arrives."""
    codes = [c for c in os.environ.get("AVATARHUB_PREFETCH", "").replace(",", " ").split() if c]
    codes = [c for c in codes if not is_demo(c)]
    if codes:
        from ..hub.resolver import prefetch

        proc.userdata["prefetched"] = prefetch(*codes)


def default_capacity() -> int:
    """Avatars one machine holds: one per CPU, and one per 4 GB of available memory."""
    cpus = os.cpu_count() or 1
    try:
        import psutil

        memory = int(psutil.virtual_memory().available // _BYTES_PER_AVATAR)
    except Exception:  # psutil comes with livekit-agents; be safe where it does not
        memory = cpus
    return max(1, min(cpus, memory))


class Slots:
    """A worker's avatars against its capacity, for LiveKit's load report and for admission.

    LiveKit stops offering jobs to a worker only once a load report says it is full (every
    few seconds), and offers each job to one worker at a time, weighted by free capacity. A
    burst of requests between two reports would put a worker above ``max_avatars``, so a job
    is also refused here when every slot is taken or promised; LiveKit then offers it to the
    next worker. A promise (accepted, not yet running) lapses after ``promise_for`` seconds,
    in case LiveKit never assigns the job."""

    def __init__(self, capacity: int, promise_for: float = 10.0) -> None:
        self.capacity, self._promise_for = capacity, promise_for
        self._worker: Any = None
        self._promised: dict[str, float] = {}

    def taken(self) -> int:
        running = {info.job.id for info in self._worker.active_jobs} if self._worker else set()
        now = time.monotonic()
        self._promised = {
            job_id: at
            for job_id, at in self._promised.items()
            if job_id not in running and now - at < self._promise_for
        }
        return len(running) + len(self._promised)

    def load(self, worker: Any) -> float:
        self._worker = worker  # LiveKit's worker calls this from its start on
        return min(1.0, self.taken() / self.capacity)

    def claim(self, job_id: str) -> bool:
        if self.taken() >= self.capacity:
            return False
        self._promised[job_id] = time.monotonic()
        return True

    async def admit(self, request: JobRequest) -> None:
        """LiveKit's ``request_fnc``: refuse when full, else accept as the job asks."""
        if not self.claim(request.job.id):
            logger.info(
                "avatar job %s refused: this worker is full (%d avatars)",
                request.job.id,
                self.capacity,
            )
            await request.reject()
            return
        await accept_job(request)


def worker_options(
    *, agent_name: str | None = None, max_avatars: int | None = None, **options: Any
) -> Any:
    """LiveKit ``WorkerOptions`` for an avatar worker: explicit dispatch under ``agent_name``,
    load = avatars / ``max_avatars`` (full at capacity), no job above it (:class:`Slots`)."""
    from livekit.agents import WorkerOptions

    capacity = max_avatars or default_capacity()
    if capacity < 1:
        raise ConfigurationError("max_avatars must be at least 1")
    slots = Slots(capacity)

    return WorkerOptions(
        entrypoint_fnc=run_job,
        request_fnc=slots.admit,
        prewarm_fnc=prewarm,
        agent_name=protocol.agent_name(agent_name),
        load_fnc=slots.load,
        # full with `capacity` jobs, available below (LiveKit wants a threshold under 1)
        load_threshold=(capacity - 0.5) / capacity,
        **options,
    )


def main(argv: list[str]) -> int:
    """``worker [--agent-name NAME] [--max-avatars N] [--prometheus-port P] [--http-port P]
    [--allow-gestures-from IDENTITY] [--max-session-seconds S] start|dev|...``:
    LiveKit's worker CLI, with LiveKit's own Prometheus metrics where it has them."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m livekit_plugins_avatarhub worker", add_help=False
    )
    parser.add_argument("--agent-name", default=None)  # protocol.agent_name() decides
    parser.add_argument("--max-avatars", type=int, default=None)
    parser.add_argument("--prometheus-port", type=int, default=None)
    # LiveKit's health-check server (8081 by default): a second worker on one machine needs another
    parser.add_argument("--http-port", type=int, default=None)
    parser.add_argument("--allow-gestures-from", action="append", default=[])
    parser.add_argument("--max-session-seconds", default=None)
    ours, rest = parser.parse_known_args(argv)
    if ours.max_session_seconds is not None:
        try:  # job processes read it from the environment
            protocol.limit_sessions(ours.max_session_seconds)
        except ConfigurationError as err:
            print(f"error: --max-session-seconds: {err}", file=sys.stderr)
            return 2
    if ours.max_avatars is not None and ours.max_avatars < 1:
        print("error: --max-avatars must be at least 1", file=sys.stderr)
        return 2
    from livekit.agents import WorkerOptions, cli

    extra: dict[str, Any] = {}
    if ours.prometheus_port is not None:
        if "prometheus_port" not in getattr(WorkerOptions, "__dataclass_fields__", {}):
            print("error: this livekit-agents has no Prometheus option", file=sys.stderr)
            return 2
        extra["prometheus_port"] = ours.prometheus_port
        if "prometheus_multiproc_dir" in WorkerOptions.__dataclass_fields__:
            extra["prometheus_multiproc_dir"] = _count_every_process()
    if ours.http_port is not None:
        if not 0 <= ours.http_port <= 65535:
            print("error: --http-port must be from 0 to 65535", file=sys.stderr)
            return 2
        extra["port"] = ours.http_port
    protocol.allow_gestures_from(
        ours.allow_gestures_from
    )  # job processes read it from the environment
    options = worker_options(agent_name=ours.agent_name, max_avatars=ours.max_avatars, **extra)
    sys.argv = ["worker", *rest]  # LiveKit's CLI: start | dev | connect ..., --url, ...
    refused = _LiveKitConnection()
    logging.getLogger("livekit.agents").addFilter(refused)
    try:
        cli.run_app(options)
    except SystemExit:  # LiveKit's CLI exits by itself
        if not refused.said:
            raise
    return 1 if refused.said else 0


def _count_every_process() -> str:
    """Prometheus multiprocess mode for the worker and its job processes: each writes its
    numbers to files in one folder (``PROMETHEUS_MULTIPROC_DIR``, else a new one), and LiveKit's
    endpoint adds them up. prometheus_client picks its mode when it is first imported, which
    livekit-agents does before it sets the variable, so the worker's own numbers (LiveKit's
    ``lk_agents_active_job_count`` and load) stayed in its memory and out of the sum: the mode
    is picked again here, before any of them is made."""
    import tempfile

    from prometheus_client import values

    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(
        prefix="avatarhub-metrics-"
    )
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    return folder


class _LiveKitConnection(logging.Filter):
    """The worker's connection to LiveKit, in as few lines as say it. LiveKit's worker logs
    every failed try (16 tries, 2 s longer each, at most 10 s apart).

    Keys LiveKit refuses (HTTP 401): no retry can help, so it is said once and the worker
    stops. A server that cannot be reached (not up yet, restarting, a wrong URL): said once,
    with the URL, while LiveKit's backoff goes on quietly; reaching it again is said too."""

    said = False  # the keys were refused
    tries = 0  # failed tries since the worker last reached LiveKit

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("registered worker") and self.tries:
            logger.info("reached LiveKit at %s after %d failed tries", self._url(), self.tries)
            self.tries = 0
            return True
        if not message.startswith("failed to connect to livekit, retrying"):
            return True
        raised = record.exc_info[1] if record.exc_info else None  # livekit-agents 1.0
        error = getattr(record, "error", None) or raised
        if getattr(raised, "status", None) == 401 or "401" in str(error or ""):
            if not self.said:
                self.said = True
                logger.error(
                    "LiveKit at %s refused the worker's API key and secret (HTTP 401); check "
                    "LIVEKIT_API_KEY and LIVEKIT_API_SECRET",
                    self._url(),
                )
                os.kill(os.getpid(), signal.SIGTERM)  # LiveKit's own clean shutdown
            return False
        self.tries += 1
        if self.tries == 1:
            logger.warning(
                "cannot reach LiveKit at %s (%s); retrying with backoff (LiveKit's worker "
                "tries 16 times, at most 10 s apart, then exits)",
                self._url(),
                error,
            )
        return False

    @staticmethod
    def _url() -> str:
        return env_or(None, "LIVEKIT_URL") or "LIVEKIT_URL"
