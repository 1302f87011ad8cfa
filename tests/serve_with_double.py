"""``serve`` as a user starts it, with the runtime double in place of bithuman's AsyncBithuman.

    python tests/serve_with_double.py --port 8089 [serve's other options]

The demo avatar needs no model file and so holds no cache lease; an agent code served by
``tests/bithuman_server.py`` is downloaded, leased and rendered like a real one. bithuman's own
runtime cannot render here (its runtime token is signed only by bitHuman's servers).
"""

import collections
import sys

from livekit_plugins_avatarhub import _compat
from livekit_plugins_avatarhub.cli import main

from fakes import FakeBithuman

FakeBithuman.created = collections.deque(maxlen=1)  # type: ignore[assignment]  (a long run keeps none)
_compat.bithuman_runtime_class = lambda: FakeBithuman  # type: ignore[assignment]

sys.exit(main(["serve", *sys.argv[1:]]))
