"""The avatar runtime contract: the slice of ``bithuman.AsyncBithuman`` this package calls.

Nothing else is ever called on a runtime, so anything implementing this renders anywhere the
package renders (the LiveKit session, the render command, the avatar service).
``bithuman.AsyncBithuman`` (0.8.1 and 2.x) satisfies it, and so does the demo avatar.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..exceptions import ConfigurationError

if TYPE_CHECKING:
    import numpy as np
    from bithuman import VideoControl, VideoFrame


@runtime_checkable
class AvatarRuntime(Protocol):
    """What this package needs from a runtime (``bithuman.AsyncBithuman`` satisfies it)."""

    settings: Any
    transaction_id: str

    async def push_audio(self, data: bytes, sample_rate: int, last_chunk: bool = True) -> None: ...
    async def flush(self) -> None: ...
    async def push(self, control: VideoControl) -> None: ...
    async def stop(self) -> None: ...
    def interrupt(self) -> None: ...
    def cleanup(self) -> None: ...
    def get_first_frame(self) -> np.ndarray | None: ...
    def run(self) -> AsyncIterator[VideoFrame]: ...

    # called on a runtime that is reused for another job (``AvatarSession(runtime=...)``)
    def _regenerate_transaction_id(self) -> None: ...
    def _initialize_token(self) -> Any: ...


async def renew_for_job(runtime: AvatarRuntime) -> None:
    """Make a runtime reused across jobs ready for the next one, as bitHuman's plugin does:
    a new transaction id (billing and logs tell sessions apart) and a fresh runtime token."""
    runtime._regenerate_transaction_id()
    result = runtime._initialize_token()
    if result is not None:
        await result


def check_output_size(size: object) -> tuple[int, int]:
    """``(width, height)``: even whole numbers from 64 to 4096 (H.264 and I420 halve both)."""
    if (
        not isinstance(size, tuple)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)
        or not all(64 <= v <= 4096 and v % 2 == 0 for v in size)
    ):
        raise ConfigurationError(
            "output_size must be (width, height) in pixels, even numbers from 64 to 4096; "
            f"got {size!r}"
        )
    return size
