"""Draw the bundled example dataset (examples/data): a dozen small pictures of simple shapes with
captions, covering every caption source and a few aspect ratios.

    python examples/make_example_data.py [--out examples/data]

The output is deterministic; the committed files were made with this script.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

Draw = Callable[[ImageDraw.ImageDraw, int, int], None]
DEFAULT_OUT = Path(__file__).resolve().parent / "data"
JPEG_QUALITY = 85


def circle(fill: str) -> Draw:
    def draw(canvas: ImageDraw.ImageDraw, w: int, h: int) -> None:
        r = min(w, h) * 0.35
        canvas.ellipse((w / 2 - r, h / 2 - r, w / 2 + r, h / 2 + r), fill=fill)

    return draw


def square(fill: str) -> Draw:
    def draw(canvas: ImageDraw.ImageDraw, w: int, h: int) -> None:
        r = min(w, h) * 0.3
        canvas.rectangle((w / 2 - r, h / 2 - r, w / 2 + r, h / 2 + r), fill=fill)

    return draw


def triangle(fill: str) -> Draw:
    def draw(canvas: ImageDraw.ImageDraw, w: int, h: int) -> None:
        canvas.polygon([(w / 2, h * 0.2), (w * 0.85, h * 0.8), (w * 0.15, h * 0.8)], fill=fill)

    return draw


def dots(fill: str) -> Draw:
    def draw(canvas: ImageDraw.ImageDraw, w: int, h: int) -> None:
        r = min(w, h) * 0.25
        for cx in (w * 0.3, w * 0.7):
            canvas.ellipse((cx - r, h / 2 - r, cx + r, h / 2 + r), fill=fill)

    return draw


def star(fill: str) -> Draw:
    def draw(canvas: ImageDraw.ImageDraw, w: int, h: int) -> None:
        points = []
        for k in range(10):
            radius = min(w, h) * (0.4 if k % 2 == 0 else 0.17)
            angle = math.pi / 2 + k * math.pi / 5
            points.append((w / 2 + radius * math.cos(angle), h / 2 - radius * math.sin(angle)))
        canvas.polygon(points, fill=fill)

    return draw


def cross(fill: str) -> Draw:
    def draw(canvas: ImageDraw.ImageDraw, w: int, h: int) -> None:
        t = min(w, h) * 0.12
        canvas.rectangle((w / 2 - t, h * 0.15, w / 2 + t, h * 0.85), fill=fill)
        canvas.rectangle((w * 0.15, h / 2 - t, w * 0.85, h / 2 + t), fill=fill)

    return draw


def moon(fill: str, sky: str) -> Draw:
    def draw(canvas: ImageDraw.ImageDraw, w: int, h: int) -> None:
        r = min(w, h) * 0.3
        cx, cy = w * 0.65, h * 0.4
        canvas.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        canvas.ellipse((cx - r * 0.5, cy - r * 1.1, cx + r * 1.3, cy + r * 0.7), fill=sky)
        for k in range(12):
            x, y = (k * 37) % w, (k * 23) % (h // 2)
            canvas.point((x, y), fill="white")

    return draw


def stripes(colours: tuple[str, str], diagonal: bool = False) -> Draw:
    def draw(canvas: ImageDraw.ImageDraw, w: int, h: int) -> None:
        band = 16
        for k, x in enumerate(range(-h, w + h, band)):
            fill = colours[k % 2]
            if diagonal:
                canvas.polygon([(x, 0), (x + band, 0), (x + band + h, h), (x + h, h)], fill=fill)
            else:
                canvas.rectangle((x, 0, x + band, h), fill=fill)

    return draw


# (relative path, size, background, drawing, caption sidecar text or None)
IMAGES: list[tuple[str, tuple[int, int], str, Draw, str | None]] = [
    ("a red circle on a white background_1.png", (128, 128), "white", circle("red"), None),
    ("a red circle on a white background_2.jpg", (160, 160), "white", circle("#d01010"), None),
    ("a blue square on a yellow background.jpg", (192, 128), "yellow", square("blue"), None),
    (
        "a night sky with a yellow moon_01.jpg",
        (224, 160),
        "#101840",
        moon("#f0e060", "#101840"),
        None,
    ),
    (
        "img_003.jpg",
        (128, 192),
        "#f0f0f0",
        triangle("green"),
        "a green triangle pointing up, flat colours, simple shapes",
    ),
    ("img_004.png", (256, 128), "#fff8e0", dots("purple"), "two purple dots side by side, wide"),
    ("img_005.png", (96, 192), "#d0d0d0", cross("black"), "a black cross on a grey background"),
    ("orange_star.png", (160, 160), "#202020", star("orange"), None),
    ("stripes/red and white stripes_1.png", (128, 128), "white", stripes(("red", "white")), None),
    ("stripes/blue and green stripes_2.png", (192, 128), "white", stripes(("blue", "green")), None),
    (
        "stripes/diagonal black and yellow stripes_3.png",
        (128, 224),
        "white",
        stripes(("black", "yellow"), diagonal=True),
        None,
    ),
    (
        "stripes/img_011.jpg",
        (160, 96),
        "white",
        stripes(("#2060c0", "#f0f0f0")),
        "thin blue stripes",
    ),
]

# The one yaml sidecar: main prompt plus tags, one with a weight (used by shuffle_tags).
STAR_YAML = """\
main_prompt: an orange star on a dark background
tags:
  - five points
  - tag: simple shapes
    weight: 1.5
"""

# Applies to the images of stripes/ only: one more tag, and a flip chance of its own.
LOCAL_YAML = """\
tags:
  - striped pattern
flip_p: 0.5
"""


def write_dataset(out: Path) -> None:
    """Draw every image and write the caption files under `out`."""
    for relative, size, background, draw, caption in IMAGES:
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", size, background)
        draw(ImageDraw.Draw(image), *size)
        if path.suffix == ".jpg":
            image.save(path, quality=JPEG_QUALITY)
        else:
            image.save(path, optimize=True)
        if caption is not None:
            sidecar = ".caption" if relative == "img_005.png" else ".txt"
            path.with_suffix(sidecar).write_text(caption + "\n", "utf-8")
    (out / "orange_star.yaml").write_text(STAR_YAML, "utf-8")
    (out / "stripes" / "local.yaml").write_text(LOCAL_YAML, "utf-8")
    logger.info("wrote %d images to %s", len(IMAGES), out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    write_dataset(args.out)


if __name__ == "__main__":
    main()
