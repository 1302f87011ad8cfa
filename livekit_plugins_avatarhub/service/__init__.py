"""A self-hosted avatar service: avatars join LiveKit rooms as their own participants.

Two HTTP entry points start the same worker: the Flutter join-room flow's
``POST /v1/agents/{id}/join-room`` and the launch request LiveKit's bithuman plugin sends in
cloud mode (``POST /v1/runtime-tokens/request``). Needs the ``service`` extra (aiohttp).
"""

from .manager import WorkerInfo, WorkerManager
from .worker import AvatarWorker

__all__ = ["AvatarWorker", "WorkerInfo", "WorkerManager"]
