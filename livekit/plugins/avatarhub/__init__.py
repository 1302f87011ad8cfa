"""``from livekit.plugins import avatarhub``: the same package as ``livekit_plugins_avatarhub``."""

from livekit_plugins_avatarhub import *  # noqa: F403
from livekit_plugins_avatarhub import __all__, __getattr__, __version__  # noqa: F401
