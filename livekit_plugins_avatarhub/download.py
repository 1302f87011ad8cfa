"""Streaming a model file to disk: resumable, verified, and atomic.

The bytes go to a uniquely named ``.incomplete`` file beside the destination. They are gathered
into batches of about 1 MB, and each batch is hashed and written by one worker-thread job while
the event loop goes on receiving the next (one batch in flight: the network, the hash and the
disk overlap, and no byte is joined or copied). The file is checked against the announced size
and sha256, and only then gets the final name with ``os.replace``. A file whose
completeness cannot be established (neither a sha256 nor a length announced) is never kept.
A dropped connection resumes with ``Range`` when the server answers 206 with a matching
``Content-Range``; a 200 to a Range request, or a 416, starts over. A link that expires mid-way
(401/403) is renewed once through ``refresh`` and the download resumes. Every redirect hop is
checked like the first URL, and a download slower than ``min_rate`` over ``stall_window``
seconds fails. Any failure removes the partial file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import aiohttp
import httpx
from yarl import URL

from ._retry import RetryPolicy
from .cache import INCOMPLETE_SUFFIX, cache_error
from .exceptions import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    IntegrityError,
)
from .log import logger
from .settings import tls_context

CHUNK_SIZE = 1 << 20
MAX_REDIRECTS = 5
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_QUERY = re.compile(r"\?[^\s'\"<>]*")

Progress = Callable[[int, int | None], None]
#: a fresh download URL from the API, when the one in use has expired
Refresh = Callable[[], Awaitable[str]]


@dataclass(frozen=True)
class RateRule:
    """Fail a download that moves fewer than ``min_rate`` bytes/s over ``window`` seconds."""

    min_rate: float = 10 * 1024
    window: float = 30.0


def storage_client(timeout: float, rule: RateRule) -> aiohttp.ClientSession:
    """A session for the storage host: no credentials, and redirects followed by :func:`_get`,
    which checks every hop. aiohttp, not httpx, carries the model bytes: it hands over whatever
    the socket has buffered, at about half httpx's CPU per MB (``bench/bench_hub.py``)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=tls_context()),
        timeout=aiohttp.ClientTimeout(
            total=None, connect=timeout, sock_connect=timeout, sock_read=rule.window
        ),
        auto_decompress=False,
        read_bufsize=CHUNK_SIZE,  # fewer, larger reads; the socket is paused less often
        trust_env=True,  # HTTPS_PROXY and NO_PROXY, as httpx honours them
    )


@asynccontextmanager
async def _get(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], *, method: str = "GET"
) -> AsyncIterator[aiohttp.ClientResponse]:
    """A request whose redirects are followed here, each hop checked like the first URL."""
    for _ in range(MAX_REDIRECTS + 1):
        # encoded=True: a pre-signed URL goes out exactly as signed, never re-quoted
        response = await session.request(
            method, URL(url, encoded=True), headers=headers, allow_redirects=False
        )
        location = response.headers.get("location")
        if response.status not in _REDIRECTS or not location:
            try:
                yield response
            finally:
                response.release()
            return
        response.release()
        url = str(response.url.join(URL(location, encoded=True)))
        check_download_url(url)
    raise APIError(f"model storage redirected more than {MAX_REDIRECTS} times")


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


class _NoSignedQueries(logging.Filter):
    """httpx logs every request's URL at INFO; a pre-signed storage URL's query is a credential,
    so no URL in httpx's log lines keeps its query string."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                arg.copy_with(query=b"redacted")
                if isinstance(arg, httpx.URL) and arg.query
                else arg
                for arg in record.args
            )
        return True


logging.getLogger("httpx").addFilter(_NoSignedQueries())


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


def _described(err: BaseException) -> str:
    """An error's type and words, with any URL query (a storage signature) taken out."""
    return f"{type(err).__name__}: {_QUERY.sub('?redacted', str(err))}"


class _Expired(Exception):
    """The storage refused the link (401/403): it may have expired mid-download."""

    def __init__(self, error: APIStatusError) -> None:
        self.error = error


async def download(
    client: aiohttp.ClientSession,
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
    """Fetch ``url`` to ``dest``. ``client`` must carry no credentials of the bitHuman API
    (make it with :func:`storage_client`)."""
    check_download_url(url)
    retry = retry or RetryPolicy()
    rule = rule or RateRule()
    partial = dest.parent / f".{dest.name}.{secrets.token_hex(6)}{INCOMPLETE_SUFFIX}"
    try:
        try:
            f = await asyncio.to_thread(open, partial, "wb")
        except OSError as err:
            raise cache_error(err, dest.parent, "write the model") from err
        writer = _Writer(f, dest.parent)
        try:
            result = await _fetch(
                client, url, writer, expected_size, retry, progress, refresh, rule
            )
        finally:
            await writer.close()
        written, digest, etag, modified, announced = result
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
        return Downloaded(dest, written, digest, etag, modified)
    finally:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.unlink, partial)


async def _fetch(
    client: aiohttp.ClientSession,
    url: str,
    writer: _Writer,
    expected_size: int | None,
    retry: RetryPolicy,
    progress: Progress | None,
    refresh: Refresh | None,
    rule: RateRule,
) -> tuple[int, str, str | None, str | None, int | None]:
    written = 0
    total = expected_size
    etag = modified = None
    failures = 0
    loop = asyncio.get_running_loop()

    async def restart() -> None:
        nonlocal written
        await writer.restart()
        written = 0

    async def store(batch: list[bytes]) -> None:
        nonlocal written
        await writer.put(batch)
        written = writer.queued
        if progress is not None:
            progress(written, total)

    while True:
        headers = {"accept-encoding": "identity"}
        if written:
            headers["range"] = f"bytes={written}-"
        try:
            async with _get(client, url, headers) as response:
                status = response.status
                if status == 416:
                    logger.info("server refused to resume (416); restarting the download")
                    raise _Restart
                if status in (401, 403) and refresh is not None:
                    raise _Expired(_http_error(status))
                if status >= 400:
                    error = _http_error(status)
                    if not error.retryable:
                        raise error
                    raise _Interrupted(str(error))
                if written and status == 200:
                    logger.info("server ignored the Range request; restarting the download")
                    await restart()
                elif written and status == 206:
                    match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
                    if (
                        not match
                        or int(match.group(1)) != written
                        or (
                            total is not None
                            and match.group(3) != "*"
                            and int(match.group(3)) != total
                        )
                    ):
                        raise _Restart
                    logger.info("resuming the download at byte %d", written)
                if not written:
                    if status == 200 and total is None:
                        total = _length(response)
                    etag = response.headers.get("etag")
                    modified = response.headers.get("last-modified")
                # chunks are what the socket had buffered; they are written and hashed in
                # batches of about CHUNK_SIZE, one thread hop each, without joining
                batch: list[bytes] = []
                pending = 0
                window_start, window_bytes = loop.time(), 0
                try:
                    async for chunk in response.content.iter_any():
                        batch.append(chunk)
                        pending += len(chunk)
                        window_bytes += len(chunk)
                        now = loop.time()
                        if now - window_start >= rule.window:
                            if window_bytes < rule.min_rate * (now - window_start):
                                raise _too_slow(window_bytes, now - window_start, rule)
                            window_start, window_bytes = now, 0
                        if pending >= CHUNK_SIZE:
                            await store(batch)
                            batch, pending = [], 0
                finally:
                    # what arrived before a failure is good data: keep it for the resume
                    if batch:
                        await store(batch)
                    await writer.wait()  # on disk before anything counts on it
            if total is not None and written < total:
                raise _Interrupted(f"connection closed after {written} of {total} bytes")
            await writer.flush()
            return written, writer.hexdigest(), etag, modified, total
        except _Expired as expired:
            assert refresh is not None
            logger.info(
                "the download link was refused (%d); asking for a fresh one",
                expired.error.status_code,
            )
            url, refresh = await refresh(), None  # once: a second refusal is final
            check_download_url(url)
        except _Restart:
            await restart()
            failures += 1
        except aiohttp.SocketTimeoutError:  # no byte for a whole stall window
            raise _too_slow(0, rule.window, rule) from None
        except (aiohttp.ClientError, _Interrupted) as err:  # aiohttp's timeouts included
            failures += 1
            if failures >= retry.attempts:
                raise APIConnectionError(
                    f"model download failed after {failures} attempts: {_described(err)}"
                ) from None
            delay = retry.delay(failures - 1)
            logger.info(
                "model download interrupted at %d bytes (%s); retrying in %.1fs",
                written,
                type(err).__name__,
                delay,
            )
            await asyncio.sleep(delay)
            continue
        if failures >= retry.attempts:
            raise APIConnectionError(
                f"model download could not be restarted after {failures} tries"
            )


def _too_slow(received: int, seconds: float, rule: RateRule) -> APITimeoutError:
    return APITimeoutError(
        f"model download stalled: {received} bytes in {seconds:.0f}s, below the minimum of "
        f"{rule.min_rate / 1024:.0f} KB/s (AVATARHUB_MIN_DOWNLOAD_RATE, in bytes/s, over "
        f"AVATARHUB_STALL_SECONDS={rule.window:g})"
    )


class _Writer:
    """Hashes and writes batches on one worker-thread job each, with one batch in flight.

    ``put`` waits for the previous batch, then hands this one over and returns: the caller goes
    back to the network while the thread hashes and writes. ``queued`` counts what was handed
    over; after :meth:`wait` it is all on disk, which is what a resume relies on.
    """

    def __init__(self, f: BinaryIO, directory: Path) -> None:
        self._f, self._directory = f, directory
        self._hasher = hashlib.sha256()
        self._inflight: asyncio.Future[None] | None = None
        self.queued = 0

    def _write(self, batch: list[bytes]) -> None:
        for chunk in batch:  # hashlib and file writes release the GIL on large buffers
            self._hasher.update(chunk)
            self._f.write(chunk)

    async def put(self, batch: list[bytes]) -> None:
        await self.wait()
        loop = asyncio.get_running_loop()
        self._inflight = loop.run_in_executor(None, self._write, batch)
        self.queued += sum(len(c) for c in batch)

    async def wait(self) -> None:
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            try:
                await inflight
            except OSError as err:
                raise cache_error(err, self._directory, "write the model") from err

    async def restart(self) -> None:
        await self.wait()

        def rewind() -> None:
            self._f.seek(0)
            self._f.truncate()

        await asyncio.to_thread(rewind)
        self._hasher, self.queued = hashlib.sha256(), 0

    async def flush(self) -> None:
        await self.wait()
        try:
            await asyncio.to_thread(self._f.flush)
        except OSError as err:
            raise cache_error(err, self._directory, "write the model") from err

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()

    async def close(self) -> None:
        try:
            await self.wait()
        finally:
            await asyncio.to_thread(self._f.close)


async def probe(client: aiohttp.ClientSession, url: str) -> RemoteFile:
    """Size and ETag of ``url`` without its body: HEAD, else a one-byte ranged GET.

    Pre-signed storage URLs are often signed for GET only, so HEAD may be refused.
    """
    check_download_url(url)
    try:
        async with _get(client, url, {}, method="HEAD") as response:
            if response.status < 400:
                return RemoteFile(_length(response), response.headers.get("etag"))
        async with _get(client, url, {"range": "bytes=0-0"}) as response:
            if response.status >= 400:
                raise _http_error(response.status)
            etag = response.headers.get("etag")
            match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
            if response.status == 206 and match and match.group(3) != "*":
                return RemoteFile(int(match.group(3)), etag)
            return RemoteFile(_length(response) if response.status == 200 else None, etag)
    except aiohttp.ClientError as err:
        raise APIConnectionError(f"model storage unreachable: {type(err).__name__}") from None


def _length(response: aiohttp.ClientResponse) -> int | None:
    length = response.headers.get("content-length")
    return int(length) if length and length.isdigit() else None
