"""Resolve one avatar in a separate process: ``python resolve_worker.py API_BASE CODE``.

Prints the model path and its sha256; used by the multi-process and SIGKILL tests.
"""

import asyncio
import hashlib
import sys

from livekit_plugins_avatarhub import RetryPolicy
from livekit_plugins_avatarhub.hub.resolver import ModelHub

SECRET = "sk-test-0123456789abcdef"


async def main() -> None:
    print("ready", flush=True)
    hub = ModelHub(api_secret=SECRET, api_base=sys.argv[1], retry=RetryPolicy(base_delay=0.05))
    path = await hub.resolve(sys.argv[2])
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    print(path, digest, flush=True)


asyncio.run(main())
