"""A PNG of a run's curves (training loss, evaluation recall) from the Trainer's log history.

Drawn with Pillow, which the toolkit already needs for images: two line charts do not justify
matplotlib as a dependency.
"""

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from datatools.atomic import atomic_file

WIDTH, PANEL_HEIGHT = 900, 360
MARGIN = {"left": 70, "right": 20, "top": 36, "bottom": 40}
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"]
RECALL_KEYS = ("eval_mean_recall", "eval_i2t_recall@1", "eval_t2i_recall@1")

Series = dict[str, list[tuple[float, float]]]


def curves(log_history: list[dict]) -> tuple[Series, Series]:
    """(loss curves, recall curves) as name -> [(step, value)] from `trainer.state.log_history`."""
    losses: Series = {"loss": [], "eval_loss": []}
    recalls: Series = {key: [] for key in RECALL_KEYS}
    for entry in log_history:
        step = entry.get("step")
        for series in (losses, recalls):
            for key in series:
                if step is not None and isinstance(entry.get(key), (int, float)):
                    series[key].append((float(step), float(entry[key])))
    return {k: v for k, v in losses.items() if v}, {k: v for k, v in recalls.items() if v}


def value_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """`count` evenly spaced tick values from `low` to `high`."""
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def step_ticks(low: float, high: float, count: int = 5) -> list[int]:
    """At most about `count` whole steps from `low` to `high`, evenly spaced."""
    stride = max(1, math.ceil((high - low) / (count - 1)))
    return list(range(int(low), int(high) + 1, stride))


def draw_panel(draw: ImageDraw.ImageDraw, top: int, title: str, series: Series, font) -> None:
    """One line chart in the horizontal band starting at `top`: axes, ticks, lines and a legend."""
    left, right = MARGIN["left"], WIDTH - MARGIN["right"]
    upper, lower = top + MARGIN["top"], top + PANEL_HEIGHT - MARGIN["bottom"]
    draw.text((left, top + 8), title, fill="black", font=font)
    points = [point for line in series.values() for point in line]
    if not points:
        draw.text((left, (upper + lower) // 2), "nothing logged", fill="gray", font=font)
        return
    x_low, x_high = min(p[0] for p in points), max(p[0] for p in points)
    y_low, y_high = min(p[1] for p in points), max(p[1] for p in points)
    x_high, y_high = max(x_high, x_low + 1), max(y_high, y_low + 1e-6)

    def position(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_low) / (x_high - x_low) * (right - left),
                lower - (y - y_low) / (y_high - y_low) * (lower - upper))  # fmt: skip

    for value in value_ticks(y_low, y_high):
        y = position(x_low, value)[1]
        draw.line((left - 4, y, right, y), fill="#dddddd")
        draw.text((4, y - 7), f"{value:.3g}", fill="black", font=font)
    for value in step_ticks(x_low, x_high):
        x = position(value, y_low)[0]
        draw.line((x, lower, x, lower + 4), fill="black")
        draw.text((x - 8, lower + 6), str(value), fill="black", font=font)
    draw.rectangle((left, upper, right, lower), outline="black")
    draw.text((right - 36, lower + 22), "step", fill="black", font=font)
    for number, (name, line) in enumerate(series.items()):
        colour = COLOURS[number % len(COLOURS)]
        xy = [position(x, y) for x, y in line]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        key_x = left + 200 + 190 * number  # the legend: a short line, then the name
        draw.line((key_x, top + 16, key_x + 20, top + 16), fill=colour, width=3)
        draw.text((key_x + 26, top + 8), name, fill=colour, font=font)


def write_training_plot(path: str | Path, log_history: list[dict]) -> None:
    """Training (and evaluation) loss above, evaluation recall below, as a PNG written atomically."""
    losses, recalls = curves(log_history)
    image = Image.new("RGB", (WIDTH, 2 * PANEL_HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    draw_panel(draw, 0, "loss", losses, font)
    draw_panel(draw, PANEL_HEIGHT, "evaluation recall", recalls, font)
    with atomic_file(path, "wb") as file:
        image.save(file, format="PNG")
