"""Draw README's first picture with the package itself: ``render demo``, then a strip of frames.

Run from the repository root: ``python docs/make_demo_strip.py`` (writes docs/demo-strip.png).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import av
import cv2
import numpy as np

FRAMES = (0, 40, 58, 75, 96, 140)  # the first frame, then mouth shapes from the bundled sample
SIDE = 200  # each tile: the square around the face


def main() -> None:
    out = Path(__file__).with_name("demo-strip.png")
    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "demo.mp4"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "livekit_plugins_avatarhub",
                "render",
                "demo",
                "-o",
                str(video),
                "--size",
                "640x360",
            ],
            check=True,
        )
        tiles = []
        with av.open(str(video)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index in FRAMES:
                    image = frame.to_ndarray(format="bgr24")
                    h, w = image.shape[:2]
                    square = image[:, (w - h) // 2 : (w + h) // 2]
                    tiles.append(cv2.resize(square, (SIDE, SIDE), interpolation=cv2.INTER_AREA))
    cv2.imwrite(str(out), np.hstack(tiles), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"{out}: {len(tiles)} frames")


if __name__ == "__main__":
    main()
