"""The demo avatar's face: drawn with OpenCV, its mouth following the audio level."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..runtime import check_output_size
from .engine import FrameState, PacedRuntime

#: the demo's size when none is asked for (bitHuman's runtime default, 720p landscape)
DEFAULT_SIZE = (1280, 720)

_SKIN = (150, 190, 235)
_SKIN_SHADE = (120, 160, 210)
_HAIR = (40, 50, 70)
_EYE_WHITE = (250, 250, 250)
_IRIS = (120, 80, 40)
_MOUTH = (40, 30, 110)
_LIPS = (80, 80, 190)
_TONGUE = (110, 110, 220)


class DemoRuntime(PacedRuntime):
    """A cartoon face whose mouth follows the audio, blinks when idle, and can gesture."""

    #: the gestures it performs for ``VideoControl(action=...)``, with their length in seconds
    ACTIONS = {"wave": 2.0, "wink": 0.8, "smile": 2.0, "surprised": 1.5, "nod": 1.2}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._cv2: Any = None
        self._base: np.ndarray | None = None
        self._canvas: np.ndarray | None = None
        w, h = check_output_size(tuple(self.output_size))
        u = h / 720.0  # every length is in units of a 720-pixel-high frame
        self._u = u
        self._center = (w // 2, int(h * 0.52))
        self._face_axes = (int(200 * u), int(260 * u))
        cx, cy = self._center
        fw, fh = self._face_axes
        # region redrawn every frame: the face, plus room for the hand on its right
        self._roi = (
            max(0, cx - fw - int(10 * u)),
            max(0, cy - fh - int(50 * u)),
            min(w, cx + fw + int(300 * u)),
            min(h, cy + fh + int(10 * u)),
        )

    @classmethod
    async def create(
        cls,
        *,
        model_path: str | None = None,
        output_size: tuple[int, int] = DEFAULT_SIZE,
        fps: int = 25,
        realtime: bool = True,
        **_: Any,
    ) -> DemoRuntime:
        """Same call shape as ``AsyncBithuman.create``; ``model_path`` and secrets are unused."""
        return cls(output_size=output_size, fps=fps, realtime=realtime)

    def mouth_box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the region the mouth can occupy, for measuring it."""
        cx, cy = self._center
        u = self._u
        my = cy + int(150 * u)
        return cx - int(75 * u), my - int(60 * u), cx + int(75 * u), my + int(60 * u)

    # -- drawing ----------------------------------------------------------------------------

    def _setup(self) -> None:
        import cv2

        self._cv2 = cv2
        w, h = self.output_size
        top = np.array([90, 60, 30], dtype=np.float32)
        bottom = np.array([160, 120, 70], dtype=np.float32)
        ramp = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
        column = (top * (1 - ramp) + bottom * ramp).astype(np.uint8)
        base = np.ascontiguousarray(np.broadcast_to(column[:, None, :], (h, w, 3)))
        cx, cy = self._center
        fw, fh = self._face_axes
        u = self._u
        aa = cv2.LINE_AA
        cv2.ellipse(
            base,
            (cx, cy + int(250 * u)),
            (int(260 * u), int(120 * u)),
            0,
            180,
            360,
            (70, 110, 60),
            -1,
            aa,
        )  # shoulders
        cv2.ellipse(
            base, (cx, cy - int(40 * u)), (fw + int(15 * u), fh), 0, 180, 360, _HAIR, -1, aa
        )
        cv2.ellipse(base, (cx, cy), (fw, fh), 0, 0, 360, _SKIN, -1, aa)
        cv2.ellipse(
            base, (cx, cy - int(150 * u)), (fw, int(110 * u)), 0, 180, 360, _HAIR, -1, aa
        )  # fringe
        cv2.ellipse(
            base,
            (cx, cy + int(40 * u)),
            (int(18 * u), int(40 * u)),
            0,
            0,
            180,
            _SKIN_SHADE,
            max(1, int(4 * u)),
            aa,
        )  # nose
        self._base = base
        self._canvas = base.copy()

    def render(self, state: FrameState) -> np.ndarray:
        if self._base is None:
            self._setup()
        assert self._base is not None and self._canvas is not None
        cv2 = self._cv2
        x0, y0, x1, y1 = self._roi
        canvas = self._canvas
        canvas[y0:y1, x0:x1] = self._base[y0:y1, x0:x1]
        u = self._u
        cx, cy = self._center
        fps = self.settings.FPS
        aa = cv2.LINE_AA
        action, p = state.action, state.action_progress
        envelope = math.sin(math.pi * p) if action else 0.0

        # idle life: a blink every ~4 s, eyes drifting slowly
        blink_phase = state.index % (4 * fps)
        blink = blink_phase < max(1, fps // 8)
        drift = int(6 * u * math.sin(state.index / fps * 0.9))
        brow_lift = int(25 * u * envelope) if action == "surprised" else 0
        nod = int(18 * u * math.sin(2 * math.pi * p)) if action == "nod" else 0

        for side in (-1, 1):
            ex, ey = cx + side * int(80 * u), cy - int(40 * u) + nod
            closed = blink or (action == "wink" and side == 1)
            wide = 1.3 if action == "surprised" else 1.0
            cv2.line(
                canvas,
                (ex - int(40 * u), ey - int(55 * u) - brow_lift),
                (ex + int(40 * u), ey - int(60 * u) - brow_lift),
                _HAIR,
                max(1, int(9 * u)),
                aa,
            )
            if closed:
                cv2.line(
                    canvas,
                    (ex - int(34 * u), ey),
                    (ex + int(34 * u), ey),
                    _HAIR,
                    max(1, int(5 * u)),
                    aa,
                )
            else:
                cv2.ellipse(
                    canvas,
                    (ex, ey),
                    (int(36 * u), int(24 * u * wide)),
                    0,
                    0,
                    360,
                    _EYE_WHITE,
                    -1,
                    aa,
                )
                cv2.circle(canvas, (ex + drift, ey), int(15 * u), _IRIS, -1, aa)
                cv2.circle(canvas, (ex + drift, ey), int(7 * u), (10, 10, 10), -1, aa)

        mx, my = cx, cy + int(150 * u) + nod
        smile = envelope if action in ("smile", "wave") else 0.0
        half_width = int((55 + 15 * smile) * u)
        opening = int(45 * u * state.mouth)
        if opening >= max(2, int(3 * u)):
            cv2.ellipse(canvas, (mx, my), (half_width, opening), 0, 0, 360, _MOUTH, -1, aa)
            cv2.ellipse(
                canvas,
                (mx, my + opening // 2),
                (half_width // 2, max(1, opening // 3)),
                0,
                180,
                360,
                _TONGUE,
                -1,
                aa,
            )
            cv2.ellipse(
                canvas, (mx, my), (half_width, opening), 0, 0, 360, _LIPS, max(1, int(5 * u)), aa
            )
        else:
            curve = int(25 * u * smile) + max(1, int(4 * u))
            cv2.ellipse(
                canvas,
                (mx, my - curve // 2),
                (half_width, curve),
                0,
                20,
                160,
                _LIPS,
                max(1, int(6 * u)),
                aa,
            )

        if action == "wave":
            swing = math.sin(p * 6 * math.pi) * 0.5
            base = (cx + int(330 * u), cy + int(230 * u))
            length = int(200 * u)
            hand = (
                base[0] + int(length * math.sin(swing)),
                base[1] - int(length * math.cos(swing)),
            )
            cv2.line(canvas, base, hand, _SKIN_SHADE, max(1, int(34 * u)), aa)
            cv2.circle(canvas, hand, int(42 * u), _SKIN, -1, aa)
        # a copy per frame: the caller may keep a frame while the next one is drawn
        frame: np.ndarray = canvas.copy()
        return frame
