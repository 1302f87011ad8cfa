"""The built-in demo avatar: a procedural face that needs no account, model file or network.

It implements the same runtime contract as ``bithuman.AsyncBithuman`` (``runtime.py``), so
everything that works with it (the LiveKit session, the render command, gestures, the avatar
service) works the same way with a real bitHuman model. ``AvatarSession(avatar_id="demo")``
selects it. ``engine`` paces the frames; ``face`` draws them.
"""

from .engine import FrameState, PacedRuntime, RuntimeSettings
from .face import DEFAULT_SIZE, DemoRuntime

__all__ = ["DEFAULT_SIZE", "DemoRuntime", "FrameState", "PacedRuntime", "RuntimeSettings"]
