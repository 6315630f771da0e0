"""An offline demo set: coloured shapes at positions, captioned in Chinese, plus tiny local towers."""

import csv
import random
from pathlib import Path

from PIL import Image, ImageDraw

from component.testing.tiny import write_tiny_bert, write_tiny_clip

COLORS = {"红色": (220, 40, 40), "绿色": (40, 170, 60), "蓝色": (40, 80, 220),
          "黄色": (235, 200, 30), "紫色": (140, 60, 180), "黑色": (20, 20, 20)}  # fmt: skip
SHAPES = ("圆形", "正方形", "三角形")
POSITIONS = {"左上角": (0.27, 0.27), "右上角": (0.73, 0.27), "左下角": (0.27, 0.73),
             "右下角": (0.73, 0.73), "中间": (0.5, 0.5)}  # fmt: skip
TEMPLATES = (
    "{position}有一个{color}的{shape}",
    "一个{color}的{shape}在{position}",
    "{position}是{color}{shape}",
)
IMAGE_SIDE = 64


def draw_shape(color: str, shape: str, position: str, rng: random.Random) -> Image.Image:
    """A light, slightly noisy background with one shape, jittered in place and size."""
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), background)
    draw = ImageDraw.Draw(image)
    cx, cy = (c * IMAGE_SIDE + rng.uniform(-3, 3) for c in POSITIONS[position])
    r = rng.uniform(0.13, 0.19) * IMAGE_SIDE
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLORS[color])
    if shape == "圆形":
        draw.ellipse(box, fill=fill)
    elif shape == "正方形":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def all_combinations() -> list[tuple[str, str, str]]:
    return [(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS]


def write_split(directory: Path, name: str, items: list, rng: random.Random, vary_template: bool) -> Path:
    """Draw one image per item and write `<name>.csv` with text,url,filename rows."""
    (directory / "images").mkdir(parents=True, exist_ok=True)
    csv_path = directory / f"{name}.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "url", "filename"])
        for number, (color, shape, position) in enumerate(items):
            filename = f"{name}-{number}.jpg"
            draw_shape(color, shape, position, rng).save(directory / "images" / filename, quality=92)
            template = rng.choice(TEMPLATES) if vary_template else TEMPLATES[0]
            writer.writerow([template.format(color=color, shape=shape, position=position), "", filename])
    return csv_path


def make_demo(directory: str | Path, train_size: int = 1800, seed: int = 0) -> Path:
    """Write the demo data (train.csv, test.csv, images/) and tiny towers (pretrained/clip, pretrained/bert).

    The test split holds each of the 90 colour-shape-position combinations once, drawn afresh.
    """
    directory = Path(directory)
    rng = random.Random(seed)
    combinations = all_combinations()
    train_items = [rng.choice(combinations) for _ in range(train_size)]
    write_split(directory, "train", train_items, rng, vary_template=True)
    write_split(directory, "test", combinations, rng, vary_template=False)
    write_tiny_clip(directory / "pretrained" / "clip", image_size=32, patch_size=8, hidden_size=64, layers=2,
                    projection_dim=64)  # fmt: skip
    write_tiny_bert(directory / "pretrained" / "bert", hidden_size=64, layers=2)
    return directory
