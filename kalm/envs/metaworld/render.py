"""Drawing bare 39-d Meta-World states without a simulator (imagined states).

A state says where the hand, the gripper opening, the object and the goal are, not
which scene it belongs to, so this is a schematic in two panels drawn with PIL: the
table from above (x right, y away from the robot) and from the side (y right, z up).
Hand: grey disc, its ring as wide as the gripper is open; object: orange square;
goal: red cross. Points off the panels are clipped at the border; non-finite ones are
skipped. Frames of real episodes come from :meth:`MetaWorldEnv.render` instead.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

_TOP_X = (-0.55, 0.55)
_TOP_Y = (0.3, 1.05)
_SIDE_Z = (0.0, 0.5)


def _point(draw_box, u_range, v_range, u, v):
    (left, top, right, bottom) = draw_box
    fu = (u - u_range[0]) / (u_range[1] - u_range[0])
    fv = (v - v_range[0]) / (v_range[1] - v_range[0])
    fu, fv = float(np.clip(fu, 0, 1)), float(np.clip(fv, 0, 1))
    return left + fu * (right - left), bottom - fv * (bottom - top)


def render_schematic(state: np.ndarray, size: int = 256, caption: str | None = None) -> np.ndarray:
    """An RGB image (size x size x 3, uint8) of a state: top view above, side view below."""
    s = np.asarray(state, dtype=np.float64).reshape(-1)
    image = Image.new("RGB", (size, size), (235, 235, 230))
    draw = ImageDraw.Draw(image)
    split = int(size * 0.62)
    caption_h = 14 if caption else 0
    top_box = (4, 4, size - 4, split - 4)
    side_box = (4, split + 2, size - 4, size - 4 - caption_h)
    for box in (top_box, side_box):
        draw.rectangle(box, fill=(200, 190, 170), outline=(120, 110, 100))
    r = max(2, size // 40)

    def mark(xyz, kind, opening=1.0):
        if len(xyz) < 3 or not np.all(np.isfinite(xyz)):
            return
        for box, (u, v), (ur, vr) in (
            (top_box, (xyz[0], xyz[1]), (_TOP_X, _TOP_Y)),
            (side_box, (xyz[1], xyz[2]), (_TOP_Y, _SIDE_Z)),
        ):
            px, py = _point(box, ur, vr, u, v)
            if kind == "goal":
                draw.line((px - r, py - r, px + r, py + r), fill=(220, 30, 30), width=2)
                draw.line((px - r, py + r, px + r, py - r), fill=(220, 30, 30), width=2)
            elif kind == "object":
                draw.rectangle((px - r, py - r, px + r, py + r), fill=(240, 140, 20))
            else:
                ring = 1 + int(3 * float(np.clip(opening, 0, 1))) if np.isfinite(opening) else 1
                outer = r + ring
                draw.ellipse((px - outer, py - outer, px + outer, py + outer), outline=(60, 60, 60), width=ring)
                draw.ellipse((px - r, py - r, px + r, py + r), fill=(110, 110, 110))

    if s.size >= 39:
        mark(s[36:39], "goal")
    if s.size >= 7:
        mark(s[4:7], "object")
    if s.size >= 4:
        mark(s[0:3], "hand", s[3])
    if caption:
        draw.text((4, size - caption_h), caption[: max(1, size // 6)], fill=(0, 0, 0))
    return np.asarray(image, dtype=np.uint8)
