"""Streaming a model file to disk: resumable, verified, atomic, and off the event loop.

Each download has two threads of its own. One receives the body with urllib3 (a read returns
what the socket holds, up to 1 MB) and hashes each piece; the other writes the pieces in order,
at most two waiting. The network, the hash and the disk overlap, no byte is copied or joined in
Python, and the event loop carries none of the model's bytes: an agent rendering avatars in the
same process keeps its loop while a model downloads. Cancelling the download shuts the socket,
so a blocked read ends at once.

The bytes go to a uniquely named ``.incomplete`` file beside the destination. The file is
checked against the announced size and sha256, and only then gets the final name with
``os.replace``. A file whose completeness cannot be established (neither a sha256 nor a length
announced) is never kept. A dropped connection resumes with ``Range`` when the server answers
206 with a matching ``Content-Range``; a 200 to a Range request, or a 416, starts over. A link
that expires mid-way (401/403) is renewed once through ``refresh`` and the download resumes.
Every redirect hop is checked like the first URL, and a download slower than ``min_rate`` over
``stall_window`` seconds fails. Any failure removes the partial file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import os
import re
import secrets
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar
from urllib.parse import urljoin

import httpx
import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import ReadTimeoutError

from .._redact import described
from .._retry import RetryPolicy
from ..config import CERTIFICATE_HINT, tls_context, untrusted_certificate
from ..exceptions import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    IntegrityError,
)
from ..log import logger
from .cache import INCOMPLETE_SUFFIX, cache_error

CHUNK_SIZE = 1 << 20
#: pieces handed to the writing thread and not yet on disk
IN_FLIGHT = 2
#: how long a cancelled download waits for its thread to stop before the task lets go
LET_GO_SECONDS = 0.5
MAX_REDIRECTS = 5
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})

Progress = Callable[[int, int | None], None]
#: a fresh download URL from the API, when the one in use has expired
Refresh = Callable[[], Awaitable[str]]
T = TypeVar("T")


@dataclass(frozen=True)
class RateRule:
    """Fail a download that moves fewer than ``min_rate`` bytes/s over ``window`` seconds."""

    min_rate: float = 10 * 1024
    window: float = 30.0


class Storage:
    """Connections to the storage hosts, used from worker threads.

    No credentials of the bitHuman API ever go through it. Proxies come from the environment
    (``HTTPS_PROXY``, ``NO_PROXY``) as httpx takes them; redirects are followed by :meth:`open`,
    which checks every hop. A read waits at most ``rule.window`` seconds for a byte.
    """

    def __init__(self, timeout: float, rule: RateRule) -> None:
        self.rule = rule
        self._options: dict[str, object] = {
            "ssl_context": tls_context(),
            "timeout": urllib3.Timeout(connect=timeout, read=rule.window),
            "retries": False,
        }
        self._direct = urllib3.PoolManager(**self._options)  # type: ignore[arg-type]
        self._env = urllib.request.getproxies_environment()
        self._proxied: dict[str, urllib3.ProxyManager] = {}
        self._lock = threading.Lock()

    def _manager(self, url: str) -> urllib3.PoolManager:
        parsed = urllib3.util.parse_url(url)
        proxy = self._env.get(parsed.scheme or "")
        if not proxy or urllib.request.proxy_bypass(parsed.host or ""):
            return self._direct
        with self._lock:
            manager = self._proxied.get(proxy)
            if manager is None:
                auth = urllib3.util.parse_url(proxy).auth
                headers = urllib3.make_headers(proxy_basic_auth=auth) if auth else None
                manager = urllib3.ProxyManager(proxy, proxy_headers=headers, **self._options)  # type: ignore[arg-type]
                self._proxied[proxy] = manager
        return manager

    def open(self, method: str, url: str, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
        """The response, body unread; redirects followed here, each hop checked like the first.

        Blocking: call it on a worker thread. A pre-signed URL goes out as signed."""
        for _ in range(MAX_REDIRECTS + 1):
            response = self._manager(url).urlopen(
                method,
                url,
                headers=headers,
                redirect=False,
                preload_content=False,
                decode_content=False,
            )
            location = response.headers.get("location")
            if response.status not in _REDIRECTS or not location:
                return response
            _discard(response)
            url = urljoin(url, location)
            check_download_url(url)
        raise APIError(f"model storage redirected more than {MAX_REDIRECTS} times")

    def close(self) -> None:
        self._direct.clear()
        for manager in self._proxied.values():
            manager.clear()

    async def __aenter__(self) -> Storage:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.close)


def storage_client(timeout: float, rule: RateRule) -> Storage:
    """Connections for the storage host: no credentials, every redirect hop checked."""
    return Storage(timeout, rule)


def _discard(response: urllib3.BaseHTTPResponse) -> None:
    """Close a response whose body may be unread: its connection is not reused."""
    response.close()
    response.release_conn()


@dataclass(frozen=True)
class Downloaded:
    path: Path
    size: int
    sha256: str
    etag: str | None
    last_modified: str | None


@dataclass(frozen=True)
class RemoteFile:
    size: int | None
    etag: str | None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_download_url(url: str) -> httpx.URL:
    """Only https, or plain http to this machine (for local test servers); never a query shown."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise APIError("the model download URL is not a valid URL") from None
    if parsed.scheme == "https" or (parsed.scheme == "http" and is_loopback(parsed.host)):
        return parsed
    raise APIError(
        f"refusing to download a model from {parsed.scheme}://{parsed.host}: only https is "
        "allowed (redirects included)"
    )


def public_location(url: str) -> str:
    """The URL without its query: pre-signed queries are credentials and are never stored."""
    parsed = httpx.URL(url)
    return str(parsed.copy_with(query=None, fragment=None))


class _Restart(Exception):
    """The server cannot continue the partial download; start from byte zero."""


class _Interrupted(Exception):
    """The body ended early."""


def _http_error(status: int) -> APIStatusError:
    return APIStatusError(
        f"model storage answered HTTP {status}"
        + (
            " (the download link expired or was refused; resolving again fetches a new one)"
            if status in (401, 403)
            else ""
        ),
        status_code=status,
    )


def _raise_if_untrusted(err: BaseException) -> None:
    """A certificate refused is final: no retry can change it, and the fix is named."""
    refused = untrusted_certificate(err)
    if refused is not None:
        raise APIConnectionError(
            f"the model storage's TLS certificate is not trusted ({refused}); {CERTIFICATE_HINT}",
            retryable=False,
        ) from None


class _Expired(Exception):
    """The storage refused the link (401/403): it may have expired mid-download."""

    def __init__(self, error: APIStatusError) -> None:
        self.error = error


class _Stopped(Exception):
    """The download was cancelled from the event loop."""


class _Finished(Protocol):
    def cancelled(self) -> bool: ...
    def exception(self) -> BaseException | None: ...


def _retrieved(future: _Finished) -> None:
    """Marks a stopped job's error as seen: it is expected, and not worth a warning."""
    if not future.cancelled():
        future.exception()


async def download(
    storage: Storage,
    url: str,
    dest: Path,
    *,
    expected_size: int | None = None,
    sha256: str | None = None,
    retry: RetryPolicy | None = None,
    progress: Progress | None = None,
    refresh: Refresh | None = None,
    rule: RateRule | None = None,
) -> Downloaded:
    """Fetch ``url`` to ``dest``. ``storage`` carries no credentials of the bitHuman API (make
    it with :func:`storage_client`); ``progress`` is called on the event loop."""
    check_download_url(url)
    retry = retry or RetryPolicy()
    partial = dest.parent / f".{dest.name}.{secrets.token_hex(6)}{INCOMPLETE_SUFFIX}"
    transfer = _Transfer(storage, rule or storage.rule, expected_size, progress)
    try:
        try:
            await transfer.run(transfer.create, partial)
        except OSError as err:
            raise cache_error(err, dest.parent, "write the model") from err
        try:
            await _fetch(transfer, url, retry, refresh)
        finally:
            if transfer.stopped:  # cancelled: the thread closes the file when it lets go
                transfer.close_soon()
            else:
                await transfer.run(transfer.close)
        written, digest, announced = transfer.written, transfer.hexdigest(), transfer.total
        if sha256 is None and expected_size is None and announced is None:
            raise IntegrityError(
                f"{dest.name}: the storage announced neither a sha256 nor a length, so a cut-off "
                "download cannot be told from a whole one; the file was not kept"
            )
        if expected_size is not None and written != expected_size:
            raise IntegrityError(
                f"{dest.name}: received {written} bytes, the service announced {expected_size}"
            )
        if sha256 is not None and digest != sha256.lower():
            raise IntegrityError(
                f"{dest.name}: sha256 {digest} does not match the announced {sha256}; "
                "the file was discarded"
            )
        try:
            await asyncio.to_thread(os.replace, partial, dest)
        except OSError as err:
            raise cache_error(err, dest.parent, "move the model into place") from err
        return Downloaded(dest, written, digest, transfer.etag, transfer.modified)
    finally:
        transfer.shutdown()
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.unlink, partial)


async def _fetch(
    transfer: _Transfer, url: str, retry: RetryPolicy, refresh: Refresh | None
) -> None:
    """Attempts until the body is whole: resumes, restarts, a renewed link, backoff."""
    failures = 0
    while True:
        try:
            await transfer.run(transfer.attempt, url, refresh is not None)
            return
        except _Expired as expired:
            assert refresh is not None
            logger.info(
                "the download link was refused (%d); asking for a fresh one",
                expired.error.status_code,
            )
            url, refresh = await refresh(), None  # once: a second refusal is final
            check_download_url(url)
        except _Restart:
            await transfer.run(transfer.restart)
            failures += 1
        except ReadTimeoutError:  # no byte for a whole stall window
            raise _too_slow(0, transfer.rule.window, transfer.rule) from None
        except (Urllib3Error, _Interrupted) as err:
            _raise_if_untrusted(err)
            failures += 1
            if failures >= retry.attempts:
                raise APIConnectionError(
                    f"model download failed after {failures} attempts: {described(err)}"
                ) from None
            delay = retry.delay(failures - 1)
            logger.info(
                "model download interrupted at %d bytes (%s); retrying in %.1fs",
                transfer.written,
                type(err).__name__,
                delay,
            )
            await asyncio.sleep(delay)
            continue
        if failures >= retry.attempts:
            raise APIConnectionError(
                f"model download could not be restarted after {failures} tries"
            )


class _Transfer:
    """One download: its state, and the thread that receives and hashes the body.

    Every method but :meth:`run`, :meth:`cancel` and :meth:`shutdown` runs on that thread.
    ``written`` counts bytes hashed and handed to the writer; when a method returns they are on
    disk, which is what a resume relies on.
    """

    def __init__(
        self, storage: Storage, rule: RateRule, total: int | None, progress: Progress | None
    ) -> None:
        self.storage, self.rule, self.total = storage, rule, total
        self.written = 0
        self.etag: str | None = None
        self.modified: str | None = None
        self._hasher = hashlib.sha256()
        self._writer: _Writer | None = None
        self._progress = progress
        self._loop = asyncio.get_running_loop()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="avatarhub-download")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._response: urllib3.BaseHTTPResponse | None = None

    # --- on the event loop

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn`` on the receiving thread. Cancelled, it stops the thread's work and waits for
        it to let go of the file before the caller removes it."""
        future = asyncio.wrap_future(self._thread.submit(fn, *args))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            self.cancel()
            # a read shut down returns at once; a connect or a wait for the headers ends on
            # its own within the storage's timeouts, and writes nothing once stopped
            await asyncio.wait([future], timeout=LET_GO_SECONDS)
            future.add_done_callback(_retrieved)
            raise

    def cancel(self) -> None:
        self._stop.set()
        with self._lock:
            response = self._response
        if response is not None:
            with contextlib.suppress(Exception):
                response.shutdown()  # a read blocked on the socket returns now

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def close_soon(self) -> None:
        self._thread.submit(self.close).add_done_callback(_retrieved)

    def shutdown(self) -> None:
        self._thread.shutdown(wait=False)

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()

    # --- on the receiving thread

    def create(self, path: Path) -> None:
        if self._stop.is_set():
            raise _Stopped
        self._writer = _Writer(open(path, "wb", buffering=0), path.parent)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def restart(self) -> None:
        assert self._writer is not None
        self._writer.rewind()
        self._hasher, self.written = hashlib.sha256(), 0

    def attempt(self, url: str, refreshable: bool) -> None:
        """One request: the body from where the file ends, received, hashed and written."""
        assert self._writer is not None
        if self._stop.is_set():
            raise _Stopped
        headers = {"accept-encoding": "identity"}
        if self.written:
            headers["range"] = f"bytes={self.written}-"
        response = self.storage.open("GET", url, headers)
        with self._lock:
            self._response = response
        whole = False
        try:
            if self._stop.is_set():
                raise _Stopped
            self._begin(response, refreshable)
            self._receive(response)
            whole = True
        except Urllib3Error:
            if self._stop.is_set():
                raise _Stopped from None
            raise
        finally:
            with self._lock:
                self._response = None
            if whole:
                response.release_conn()
            else:
                _discard(response)
            self._writer.wait()  # what arrived before a failure is good data: kept for a resume

    def _begin(self, response: urllib3.BaseHTTPResponse, refreshable: bool) -> None:
        """Whether the answer continues the file, starts it over, or is an error."""
        status = response.status
        if status == 416:
            logger.info("server refused to resume (416); restarting the download")
            raise _Restart
        if status in (401, 403) and refreshable:
            raise _Expired(_http_error(status))
        if status >= 400:
            error = _http_error(status)
            if not error.retryable:
                raise error
            raise _Interrupted(str(error))
        if self.written and status == 200:
            logger.info("server ignored the Range request; restarting the download")
            self.restart()
        elif self.written and status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
            if (
                not match
                or int(match.group(1)) != self.written
                or (
                    self.total is not None
                    and match.group(3) != "*"
                    and int(match.group(3)) != self.total
                )
            ):
                raise _Restart
            logger.info("resuming the download at byte %d", self.written)
        if not self.written:
            if status == 200 and self.total is None:
                self.total = _length(response)
            self.etag = response.headers.get("etag")
            self.modified = response.headers.get("last-modified")

    def _receive(self, response: urllib3.BaseHTTPResponse) -> None:
        """Each read is what the socket holds (up to CHUNK_SIZE), so the rate is checked as
        bytes come, however slowly they do."""
        assert self._writer is not None
        rule, put, progress = self.rule, self._writer.put, self._progress
        window_start, window_bytes = time.monotonic(), 0
        while chunk := response.read1(CHUNK_SIZE, decode_content=False):
            if self._stop.is_set():
                raise _Stopped
            self._hasher.update(chunk)  # releases the GIL on large pieces, as do the writes
            put(chunk)
            self.written += len(chunk)
            window_bytes += len(chunk)
            if progress is not None:
                self._loop.call_soon_threadsafe(progress, self.written, self.total)
            now = time.monotonic()
            if now - window_start >= rule.window:
                if window_bytes < rule.min_rate * (now - window_start):
                    raise _too_slow(window_bytes, now - window_start, rule)
                window_start, window_bytes = now, 0
        if self.total is not None and self.written < self.total:
            raise _Interrupted(f"connection closed after {self.written} of {self.total} bytes")


def _too_slow(received: int, seconds: float, rule: RateRule) -> APITimeoutError:
    return APITimeoutError(
        f"model download stalled: {received} bytes in {seconds:.0f}s, below the minimum of "
        f"{rule.min_rate / 1024:.0f} KB/s (AVATARHUB_MIN_DOWNLOAD_RATE, in bytes/s, over "
        f"AVATARHUB_STALL_SECONDS={rule.window:g})"
    )


class _Writer:
    """Writes pieces in order on a thread of its own, at most ``IN_FLIGHT`` waiting: the
    receiving thread goes back to the socket while the disk takes the last piece."""

    def __init__(self, f: BinaryIO, directory: Path) -> None:
        self._f, self._directory = f, directory
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="avatarhub-write")
        self._pending: deque[Future[None]] = deque()

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # an unbuffered write may take only part of it
            view = view[self._f.write(view) :]

    def put(self, data: bytes) -> None:
        if len(self._pending) >= IN_FLIGHT:
            self._settle(1)
        self._pending.append(self._thread.submit(self._write, data))

    def wait(self) -> None:
        self._settle(0)

    def _settle(self, keep: int) -> None:
        """Wait until at most ``keep`` writes are pending; a failed one cancels the rest."""
        try:
            while len(self._pending) > keep:
                self._pending.popleft().result()
        except OSError as err:
            for future in self._pending:
                future.cancel()
            self._pending.clear()
            raise cache_error(err, self._directory, "write the model") from err

    def rewind(self) -> None:
        self.wait()
        self._f.seek(0)
        self._f.truncate()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._thread.shutdown(wait=True, cancel_futures=True)
            self._f.close()


async def probe(storage: Storage, url: str) -> RemoteFile:
    """Size and ETag of ``url`` without its body: HEAD, else a one-byte ranged GET.

    Pre-signed storage URLs are often signed for GET only, so HEAD may be refused.
    """
    check_download_url(url)
    try:
        return await asyncio.to_thread(_probe, storage, url)
    except Urllib3Error as err:
        _raise_if_untrusted(err)
        raise APIConnectionError(f"model storage unreachable: {type(err).__name__}") from None


def _probe(storage: Storage, url: str) -> RemoteFile:
    response = storage.open("HEAD", url, {})
    try:
        if response.status < 400:
            return RemoteFile(_length(response), response.headers.get("etag"))
    finally:
        _discard(response)
    response = storage.open("GET", url, {"range": "bytes=0-0"})
    try:
        if response.status >= 400:
            raise _http_error(response.status)
        etag = response.headers.get("etag")
        match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
        if response.status == 206 and match and match.group(3) != "*":
            return RemoteFile(int(match.group(3)), etag)
        return RemoteFile(_length(response) if response.status == 200 else None, etag)
    finally:
        _discard(response)


def _length(response: urllib3.BaseHTTPResponse) -> int | None:
    length = response.headers.get("content-length")
    return int(length) if length and length.isdigit() else None
