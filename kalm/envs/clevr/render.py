"""Drawing CLEVR-Robot states without OpenGL, and writing episodes as GIFs.

MuJoCo's offscreen renderer needs an OpenGL platform (EGL or OSMesa). Headless CI
machines often have neither, so this module draws the same top-down view with PIL:
it is the dependable path, and the one used for imagined states, which have no
simulator behind them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from kalm.envs.clevr.tasks import BALL_RADIUS, COLOURS

_RGB = {
    "red": (255, 26, 26),
    "blue": (51, 128, 255),
    "green": (51, 255, 0),
    "purple": (204, 51, 255),
    "cyan": (51, 255, 255),
}
# The visible table: the walls' inner faces, x in [-0.6, 0.6], y in [-0.3, 0.7].
_VIEW_LOW = np.array([-0.6, -0.3])
_VIEW_HIGH = np.array([0.6, 0.7])


def render_top_down(state: np.ndarray, size: int = 256, caption: str | None = None) -> np.ndarray:
    """An RGB image (size x size x 3, uint8) of the balls seen from above; +y is up.

    States outside the table (as an imagined rollout may produce) are drawn where they
    are, clipped by the image border; non-finite coordinates are skipped.
    """
    image = Image.new("RGB", (size, size), (205, 205, 200))
    draw = ImageDraw.Draw(image)
    span = float(max(_VIEW_HIGH - _VIEW_LOW))
    scale = (size - 8) / span
    origin = (_VIEW_LOW + _VIEW_HIGH) / 2

    def to_pixels(xy: np.ndarray) -> tuple[float, float]:
        return size / 2 + (xy[0] - origin[0]) * scale, size / 2 - (xy[1] - origin[1]) * scale

    x0, y1 = to_pixels(_VIEW_LOW)
    x1, y0 = to_pixels(_VIEW_HIGH)
    draw.rectangle((x0, y0, x1, y1), outline=(90, 90, 90), width=2)
    radius = BALL_RADIUS * scale
    centres = np.asarray(state, dtype=np.float64).reshape(len(COLOURS), 2)
    for colour, centre in zip(COLOURS, centres):
        if not np.all(np.isfinite(centre)):
            continue
        cx, cy = to_pixels(centre)
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=_RGB[colour], outline=(40, 40, 40))
    if caption:
        draw.text((6, 4), caption, fill=(0, 0, 0))
    return np.asarray(image)


def save_gif(frames: Sequence[np.ndarray], path: str | Path, fps: float = 4.0) -> Path:
    """Write frames (H x W x 3 uint8) as a looping GIF, atomically."""
    if not frames:
        raise ValueError("save_gif needs at least one frame")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    tmp = path.with_name(path.name + ".tmp")
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    tmp.replace(path)
    return path


def render_episode(states: Sequence[np.ndarray], size: int = 256, caption: str | None = None) -> list[np.ndarray]:
    """One frame per state, each captioned with the step number (and ``caption``)."""
    return [
        render_top_down(s, size, f"{caption + '  ' if caption else ''}step {t}") for t, s in enumerate(states)
    ]
