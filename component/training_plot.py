"""A PNG of a run's curves (training loss, evaluation recall) from the Trainer's log history.

Drawn with Pillow, which the toolkit already needs for images: two line charts do not justify
matplotlib as a dependency.
"""

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


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` evenly spaced tick values covering [low, high]."""
    if high <= low:
        return [low]
    return [low + (high - low) * i / (count - 1) for i in range(count)]


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

    draw.rectangle((left, upper, right, lower), outline="black")
    for value in nice_ticks(y_low, y_high):
        y = position(x_low, value)[1]
        draw.line((left - 4, y, right, y), fill="#dddddd")
        draw.text((4, y - 6), f"{value:.3g}", fill="black", font=font)
    for value in nice_ticks(x_low, x_high):
        x = position(value, y_low)[0]
        draw.text((x - 10, lower + 6), f"{value:.0f}", fill="black", font=font)
    draw.text((right - 30, lower + 22), "step", fill="black", font=font)
    for number, (name, line) in enumerate(series.items()):
        colour = COLOURS[number % len(COLOURS)]
        xy = [position(x, y) for x, y in line]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        draw.text((left + 200 + 170 * number, top + 8), f"— {name}", fill=colour, font=font)


def write_training_plot(path: str | Path, log_history: list[dict]) -> None:
    """Training (and evaluation) loss above, evaluation recall below, as a PNG written atomically."""
    losses, recalls = curves(log_history)
    image = Image.new("RGB", (WIDTH, 2 * PANEL_HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw_panel(draw, 0, "loss", losses, font)
    draw_panel(draw, PANEL_HEIGHT, "evaluation recall", recalls, font)
    with atomic_file(path, "wb") as file:
        image.save(file, format="PNG")
