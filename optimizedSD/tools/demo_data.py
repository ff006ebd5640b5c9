"""The demo model's synthetic world: one coloured shape on a plain background, and its caption.

"a red circle on a blue background, top left": a shape (circle, square, triangle) of one colour,
centred in one of five places (the four quadrants or the center), on a background of another
colour, drawn at 64x64 with a little jitter of size and position. `train_demo.py` learns from these
scenes; the tests judge the demo model's images against them (`tests/test_demo.py`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SIZE = 64  # pixels per side of a training image (latents 8x8)
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
           "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
# position -> centre of the shape as a fraction of the width and height
POSITIONS = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
             "bottom right": (0.75, 0.75), "center": (0.5, 0.5)}
RADIUS = 0.19  # half the shape's extent, as a fraction of the side
JITTER = 0.03  # of the side: position and size vary by up to this much


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    position: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background, {self.position}"


def all_scenes() -> list[Scene]:
    """Every scene: 3 shapes x 6 colours x 5 other background colours x 5 positions = 450."""
    return [Scene(shape, colour, background, position) for shape in SHAPES for colour in COLOURS
            for background in COLOURS if background != colour for position in POSITIONS]


def render(scene: Scene, rng: random.Random | None = None, size: int = SIZE) -> Image.Image:
    """The scene as an RGB image; `rng` jitters the shape's centre and size (None: no jitter)."""
    jitter = (lambda: rng.uniform(-JITTER, JITTER) * size) if rng else (lambda: 0.0)
    fx, fy = POSITIONS[scene.position]
    cx, cy = fx * size + jitter(), fy * size + jitter()
    r = RADIUS * size + jitter()
    im = Image.new("RGB", (size, size), COLOURS[scene.background])
    draw = ImageDraw.Draw(im)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        s = r * 0.85  # a square of the same area as the circle, about
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    return im
