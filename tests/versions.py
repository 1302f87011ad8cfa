"""Print the versions a test environment resolved (tox runs this before the tests)."""

import importlib.metadata
import sys

for dist in ("livekit-agents", "livekit", "livekit-plugins-bithuman", "bithuman", "numpy"):
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = "not installed"
    print(f"{dist}: {version}")
print(f"python: {sys.version.split()[0]}")
