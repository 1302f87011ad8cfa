"""Memory of a service that hosts avatar after avatar: a left avatar's memory goes at once, and
Python's collector never stalls the live avatars' frames.

Measured in ``serve`` with livekit-agents 1.8 (``bench/soak_service.py``):

- a left avatar is freed by reference counting only if nothing of it is in a reference cycle,
  and LiveKit's avatar runner keeps several (its cancelled tasks' tracebacks, its receiver's
  event handlers). They waited for Python's full collection, and RSS swung by 250 MB;
- that full collection walked every object the process ever imported (about 175,000) and
  held the event loop for 114–137 ms (``bench/bench_gc.py``: 0.6–1.7 ms frozen), three frames
  of every avatar in the process.

So the service imports the avatar's modules when it starts, then moves everything that exists
by then out of the collector's sight (:func:`gc.freeze`), and collects once when an avatar
has left: a walk over the live avatars' objects only.
"""

from __future__ import annotations

import gc
import importlib

from ..log import logger

#: what the first avatar imports lazily (loaded at start, so that it is frozen with the rest)
AVATAR_MODULES = (
    "livekit.agents.voice.avatar",
    "livekit_plugins_avatarhub.remote.microphone",
    "livekit_plugins_avatarhub.rendering.demo",
    "bithuman",
)


def import_avatar_modules() -> None:
    """Import what hosting an avatar needs (blocking: run it in a thread)."""
    for name in AVATAR_MODULES:
        try:
            importlib.import_module(name)
        except Exception as err:  # bithuman missing: the demo still runs; /ready reports it
            logger.debug("not importing %s at start: %s", name, err)


def freeze_startup_objects() -> None:
    """Collect once, then keep everything alive now out of every later collection."""
    gc.collect()
    gc.freeze()


def collect_left_avatar() -> None:
    """Free a left avatar's reference cycles now rather than at the next full collection."""
    gc.collect()
