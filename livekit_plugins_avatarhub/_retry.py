"""Retrying transient failures: one policy for the REST client, downloads and the avatar service.

Only connection errors, 408, 429 and 5xx are retried, with exponential backoff and full jitter;
a ``Retry-After`` (seconds or an HTTP date) is honoured up to ``max_retry_after``.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from .exceptions import APIConnectionError, APIStatusError
from .log import logger

if TYPE_CHECKING:
    from livekit.agents import APIConnectOptions

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Retries for transient failures only: connection errors, 408, 429 and 5xx."""

    attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 20.0
    max_retry_after: float = 60.0

    @classmethod
    def from_conn_options(cls, options: APIConnectOptions) -> RetryPolicy:
        """LiveKit's ``conn_options`` (max_retry, retry_interval) as a policy."""
        return cls(
            attempts=max(1, options.max_retry + 1), base_delay=max(0.1, options.retry_interval)
        )

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


async def with_retries(call: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str) -> T:
    """Run ``call`` until it succeeds, fails permanently, or the attempts run out."""
    for attempt in range(policy.attempts):
        try:
            return await call()
        except (APIConnectionError, APIStatusError) as err:
            retryable = err.retryable  # a connection error is, unless it says otherwise
            if not retryable or attempt == policy.attempts - 1:
                raise
            retry_after = err.retry_after if isinstance(err, APIStatusError) else None
            if retry_after is not None and retry_after > policy.max_retry_after:
                raise _wait_too_long(err, retry_after, policy) from None
            delay = policy.delay(attempt, retry_after)
            logger.info("%s failed (%s); retrying in %.1fs", what, err, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def _wait_too_long(err: Exception, seconds: float, policy: RetryPolicy) -> Exception:
    """The server asks for a longer wait than we hold a lock and a caller for: fail now."""
    when = time.strftime("%H:%M:%S", time.localtime(time.time() + seconds))
    message = (
        f"{err}; the server asks to retry after {seconds:.0f}s (at {when}), longer than the "
        f"{policy.max_retry_after:.0f}s this call waits, so it gives up now"
    )
    assert isinstance(err, APIStatusError)
    return type(err)(
        message,
        status_code=err.status_code,
        code=err.code,
        reason=err.reason,
        retry_after=err.retry_after,
    )


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
