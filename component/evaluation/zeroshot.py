"""Zero-shot top-1/top-5 accuracy over prompt templates, as Chinese-CLIP's zeroshot_evaluation.py has it.

Labelled images come from an ImageNet-style folder (one subfolder per class; class i is the i-th
subfolder in sorted order, as torchvision's ImageFolder numbers them, and the i-th line of the
label file names it) or from a CSV with columns filename and label (a label is a line of the label
file, or its 0-based line number).
"""

import importlib
import importlib.util
import os
from pathlib import Path

import torch

from component.encoding import ZERO_SHOT_TEMPLATES, check_templates, class_embeddings, encode_images
from component.errors import InputError
from datatools.csv_rows import CsvTable
from datatools.csv_rows import InputError as CsvInputError
from datatools.image_check import ImageRoot
from datatools.images import RejectedError

# The extensions torchvision's ImageFolder takes, so that a folder gives the images cn_clip counts.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CN_CLIP_TEMPLATES = "cn_clip"
TOP_K = (1, 5)


def read_labels(path: str | Path) -> list[str]:
    """Class names, one per line (label_cn.txt); blank lines at the end are ignored."""
    path = Path(path)
    try:
        labels = path.read_text(encoding="utf-8").rstrip("\n").split("\n")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read the labels ({error})") from None
    labels = [label.strip() for label in labels]
    if not labels or any(not label for label in labels):
        raise InputError(f"{path}: one class name per line, none blank")
    return labels


def read_templates(spec: str | None) -> list[str]:
    """Prompt templates with "{}" for the class name: the toolkit's own (None), Chinese-CLIP's
    ("cn_clip", from the installed cn_clip package), or a file with one template per line."""
    if spec is None:
        return list(ZERO_SHOT_TEMPLATES)
    if spec == CN_CLIP_TEMPLATES:
        if importlib.util.find_spec("cn_clip") is None:
            raise InputError("--templates cn_clip needs the cn_clip package (pip install --no-deps cn_clip)")
        module = importlib.import_module("cn_clip.eval.cvinw_zeroshot_templates")
        # Its templates are functions of the class name; given "{}" they give the template back.
        templates = [template("{}") for template in module.openai_templates]
    else:
        try:
            templates = [t for t in Path(spec).read_text(encoding="utf-8").splitlines() if t.strip()]
        except (OSError, UnicodeDecodeError) as error:
            raise InputError(f"{spec}: cannot read the templates ({error})") from None
    check_templates(templates)
    return templates


def folder_images(folder: Path, labels: list[str]) -> tuple[list[Path], list[int]]:
    """The images of an ImageNet-style folder and their class numbers (sorted subfolder order)."""
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if len(classes) != len(labels):
        raise InputError(
            f"{folder}: {len(classes)} class subfolders but {len(labels)} labels; they must match"
        )
    paths, targets = [], []
    for number, name in enumerate(classes):
        for root, _, files in sorted(os.walk(folder / name, followlinks=True)):
            for file in sorted(files):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(Path(root) / file)
                    targets.append(number)
    if not paths:
        raise InputError(f"{folder}: no images in its class subfolders")
    return paths, targets


def csv_images(csv_path: Path, image_path: Path, labels: list[str]) -> tuple[list[Path], list[int]]:
    """The images of a filename,label CSV (filenames under `image_path`) and their class numbers."""
    number_of = {label: number for number, label in enumerate(labels)}
    root = ImageRoot(image_path)
    paths, targets = [], []
    try:
        table = CsvTable.open(csv_path, ("filename", "label"))
        for row, (filename, label) in enumerate(table.columns("filename", "label"), start=1):
            target = number_of.get(label.strip())
            if target is None and label.strip().isdigit() and int(label) < len(labels):
                target = int(label)
            if target is None:
                raise InputError(f"{csv_path}, data row {row}: label {label!r} is not in the label file")
            paths.append(root.path(filename))
            targets.append(target)
    except CsvInputError as error:
        raise InputError(str(error)) from None
    except RejectedError as error:
        raise InputError(f"{csv_path}: image filename cannot be used ({error})") from None
    if not paths:
        raise InputError(f"{csv_path}: no labelled images")
    return paths, targets


def labelled_images(images: str | Path, labels: list[str], image_path: str | Path | None = None):
    """(image paths, class numbers) from a class-folder directory or a filename,label CSV."""
    images = Path(images)
    if images.is_dir():
        return folder_images(images, labels)
    if images.is_file():
        return csv_images(images, Path(image_path) if image_path else images.parent, labels)
    raise InputError(f"{images}: no such folder of class subfolders or CSV of labelled images")


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent (as Chinese-CLIP reports it); k is capped at the classes."""
    ranked = logits.topk(min(max(TOP_K), logits.shape[1]), dim=1).indices  # [n_images, k]
    hits = ranked == targets.unsqueeze(1)
    return {f"zeroshot_top{k}": 100.0 * hits[:, :k].any(dim=1).double().mean().item() for k in TOP_K}


def zeroshot_accuracy(model, processor, labels: list[str], images: list, targets: list[int],
                      templates: list[str], batch_size: int = 64, max_length: int = 64,
                      progress: bool = True) -> dict[str, float]:  # fmt: skip
    """Classify each image by its most similar class embedding (mean over the templates' prompts)."""
    classifier = class_embeddings(model, processor, labels, templates, batch_size=batch_size,
                                  max_length=max_length, progress=progress)  # fmt: skip
    image_embeds = encode_images(model, processor, images, batch_size, progress=progress)
    metrics = topk_accuracy(image_embeds @ classifier.T, torch.tensor(targets))
    metrics.update(
        zeroshot_images=len(images), zeroshot_classes=len(labels), zeroshot_templates=len(templates)
    )
    return metrics
