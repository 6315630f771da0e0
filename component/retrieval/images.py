"""The images an index is built from, a folder or an image-text CSV, and their encoding in batches."""

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from component.cli import list_images
from component.encoding import encode_images
from component.errors import InputError
from component.processor import ImageTransform
from component.retrieval.store import EmbeddingDtype
from component.training.dataset import read_image_text_csv
from datatools.image_check import ImageRoot

_LOADING_THREADS = 8


@dataclass
class ImageSource:
    """The images to index: filenames relative to `root`, and one text per image from a CSV.

    `confined`: names must stay inside `root` (a CSV's names are refused when they escape it; a
    folder's own symbolic links are the user's choice, indexed but never served).
    `unreadable`: samples already found unreadable while the source was made ({"filename", "error"}),
    reported with those the encoding finds.
    """

    root: Path
    filenames: list[str]
    texts: list[str] | None = None
    confined: bool = False
    unreadable: list[dict[str, str]] = field(default_factory=list)


def images_in_directory(directory: str | Path) -> ImageSource:
    """Every image file (by suffix) under `directory` and its subdirectories, sorted."""
    root = Path(directory).absolute()
    return ImageSource(root, [path.relative_to(root).as_posix() for path in list_images(root)])


def images_in_csv(csv_path: str | Path, image_path: str | Path) -> ImageSource:
    """The distinct filenames of an image-text CSV (columns text and filename, as for training),
    relative to `image_path`, each with its first caption."""
    try:
        rows = read_image_text_csv(csv_path)
    except (OSError, ValueError) as error:
        raise InputError(str(error)) from error
    root = Path(image_path).absolute()
    if not root.is_dir():
        raise InputError(f"{image_path}: no such directory")
    first_texts: dict[str, str] = {}
    for name, text in zip(rows.filenames.tolist(), rows.texts.tolist(), strict=True):
        first_texts.setdefault(name, text)
    return ImageSource(root, list(first_texts), list(first_texts.values()), confined=True)


def _load_image(transform: ImageTransform, root: ImageRoot | Path, filename: str) -> Image.Image | str:
    # A decoder can raise many kinds of error on a corrupt file, and one bad file among a million
    # must not stop the run: any error makes the image "unreadable", with the error as the reason.
    # A name that escapes the root (absolute, "..", a symlink out) is refused before it is opened.
    try:
        path = root.path(filename) if isinstance(root, ImageRoot) else root / filename
        return transform.load(path, draft=True)
    except Exception as error:
        return f"{type(error).__name__}: {error}"


def _loaded_batches(
    source: ImageSource, filenames: list[str], transform: ImageTransform, batch_size: int
) -> Iterator[tuple[range, list[Image.Image | str]]]:
    # Decoding runs in threads, one batch ahead of the model.
    batches = [
        range(start, min(start + batch_size, len(filenames)))
        for start in range(0, len(filenames), batch_size)
    ]
    image_root = ImageRoot(source.root) if source.confined else source.root
    with ThreadPoolExecutor(_LOADING_THREADS) as pool:

        def submit(batch: range) -> list[Future]:
            return [pool.submit(_load_image, transform, image_root, filenames[index]) for index in batch]

        pending = submit(batches[0]) if batches else []
        for number, batch in enumerate(batches):
            loaded = [future.result() for future in pending]
            if number + 1 < len(batches):
                pending = submit(batches[number + 1])
            yield batch, loaded


def encode_image_files(
    model,
    processor,
    source: ImageSource,
    filenames: list[str],
    output: Path,
    dtype: EmbeddingDtype,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> tuple[list[str], list[dict[str, str]]]:
    """Encode image files with the shared helper, appending the embeddings to the raw file `output`.

    Returns the filenames encoded, in order, and the unreadable ones as {"filename", "error"}.
    """
    transform = ImageTransform.from_processor(processor)
    encoded, unreadable = [], []
    with (
        open(output, "wb") as sink,
        tqdm(total=len(filenames), desc="Indexing images", unit="image", disable=not progress) as bar,
    ):
        for batch, loaded in _loaded_batches(source, filenames, transform, batch_size):
            images = []
            for index, image in zip(batch, loaded, strict=True):
                if isinstance(image, str):
                    unreadable.append({"filename": filenames[index], "error": image})
                else:
                    images.append(image)
                    encoded.append(filenames[index])
            if images:
                embeds = encode_images(model, processor, images, batch_size=len(images), device=device)
                sink.write(embeds.numpy().astype(dtype).tobytes())  # [len(images), dim]
            bar.update(len(batch))
    return encoded, unreadable
