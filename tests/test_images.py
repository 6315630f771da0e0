"""datatools.images: the one image opener every part of the toolkit uses."""

import os
import threading

import numpy as np
import pytest
from PIL import Image

from datatools.images import RejectedError, load_rgb, open_image, to_rgb


def _in_thread(function, *args):
    """Run `function(*args)` in a thread; fail the test instead of hanging if it blocks."""
    outcome = {}

    def target():
        try:
            outcome["value"] = function(*args)
        except Exception as error:
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), f"{function.__name__} blocked"
    return outcome


@pytest.mark.parametrize("function", [open_image, load_rgb])
def test_a_fifo_is_refused_at_once_instead_of_blocking(tmp_path, function):
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    outcome = _in_thread(function, fifo)
    assert isinstance(outcome["error"], RejectedError) and outcome["error"].reason == "not_a_file"


def test_a_directory_and_a_missing_file_are_refused_with_their_reasons(tmp_path):
    with pytest.raises(RejectedError) as directory:
        load_rgb(tmp_path)
    with pytest.raises(RejectedError) as missing:
        load_rgb(tmp_path / "nothing.png")
    assert (directory.value.reason, missing.value.reason) == ("not_a_file", "missing_file")


def test_transparency_is_composited_onto_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    rgb = np.asarray(to_rgb(image))
    assert rgb[0, 0].tolist() == [255, 0, 0] and rgb[3, 3].tolist() == [255, 255, 255]


def test_sixteen_bit_grey_is_scaled_to_eight_bits():
    image = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert np.asarray(to_rgb(image))[0, 0].tolist() == [255, 255, 255]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_the_pixel_limit_is_ours_and_checked_before_decoding(tmp_path, monkeypatch):
    Image.new("RGB", (200, 100)).save(tmp_path / "wide.png")
    # Pillow's global only warns below twice its value: ours is what decides
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 15_000)
    assert load_rgb(tmp_path / "wide.png").size == (200, 100)
    with pytest.raises(RejectedError, match="decompression_bomb: 200 x 100 pixels, the limit is 19999"):
        open_image(tmp_path / "wide.png", max_pixels=19_999)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise
    Image.new("RGB", (60, 30), "green").save(tmp_path / "turned.jpg", exif=exif)
    assert load_rgb(tmp_path / "turned.jpg").size == (30, 60)


def test_files_are_closed_after_loading_and_after_refusals(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        load_rgb(tmp_path / "ok.png")
        with open_image(tmp_path / "ok.png"):
            pass
        with pytest.raises(RejectedError, match="not_an_image"):
            load_rgb(tmp_path / "bad.png")
    assert len(os.listdir("/proc/self/fd")) <= before + 1


def test_postscript_is_never_handed_to_ghostscript(tmp_path):
    # Pillow would run Ghostscript on an EPS file to decode it, even one named .jpg
    (tmp_path / "photo.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(RejectedError, match="not_an_image"):
        open_image(tmp_path / "photo.jpg")


def test_a_transparent_png_embeds_the_same_from_a_folder_and_downloaded(tmp_path, tiny_checkpoint):
    from component.encoding import encode_images, load_model_and_processor
    from datatools.download import to_training_jpeg

    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # transparent black: white once composited
    image.paste((200, 30, 30, 255), (16, 16, 48, 48))
    image.save(tmp_path / "logo.png")
    (tmp_path / "downloaded.jpg").write_bytes(to_training_jpeg((tmp_path / "logo.png").read_bytes()))
    indexed, downloaded = load_rgb(tmp_path / "logo.png"), load_rgb(tmp_path / "downloaded.jpg")
    assert np.abs(np.asarray(indexed, float) - np.asarray(downloaded, float)).mean() < 2  # JPEG noise only
    assert np.asarray(indexed)[0, 0].tolist() == [255, 255, 255]
    model, processor = load_model_and_processor(tiny_checkpoint, "cpu")
    folder, download = encode_images(model, processor, [tmp_path / "logo.png", tmp_path / "downloaded.jpg"])
    assert float(folder @ download) > 0.999
