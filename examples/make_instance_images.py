"""Draws the demo's bundled instance photos: one made-up subject (a round orange robot
with a teal visor) in five poses and backgrounds. Made by the project; no licence
questions. Run once; the PNGs are committed: `python examples/make_instance_images.py`."""

from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).parent / "instance-images"
SIZE = 96
POSES = [  # (background, body centre x, y, radius, visor tilt)
    ((200, 220, 240), 48, 50, 30, 0),
    ((225, 240, 205), 40, 54, 26, 4),
    ((245, 225, 210), 56, 46, 32, -4),
    ((215, 215, 215), 48, 56, 24, 2),
    ((235, 215, 245), 44, 48, 34, -2),
]


def draw(background, x, y, radius, tilt) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), background)
    pen = ImageDraw.Draw(image)
    pen.rectangle((0, SIZE * 3 // 4, SIZE, SIZE), fill=tuple(c - 40 for c in background))
    pen.ellipse((x - radius, y - radius, x + radius, y + radius), fill=(235, 120, 30), outline=(90, 40, 10), width=2)
    pen.polygon([(x - radius * 0.7, y - 6 + tilt), (x + radius * 0.7, y - 6 - tilt),
                 (x + radius * 0.7, y + 4 - tilt), (x - radius * 0.7, y + 4 + tilt)], fill=(20, 170, 170))
    pen.line((x, y - radius, x, y - radius - 10), fill=(90, 40, 10), width=2)
    pen.ellipse((x - 3, y - radius - 14, x + 3, y - radius - 8), fill=(220, 30, 30))
    return image


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for index, pose in enumerate(POSES):
        draw(*pose).save(OUT / f"robot-{index}.png", optimize=True)
