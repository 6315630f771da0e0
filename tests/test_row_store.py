"""The CSV row store: converted once, mapped afterwards, re-converted when the CSV changes, built by
one process, and memory flat from 2 thousand to 200 thousand rows."""

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from component.training import row_store
from component.training.row_store import load_rows

REPO = Path(__file__).resolve().parent.parent


def write_csv(path: Path, rows: int, text: str = "一只猫") -> Path:
    with open(path, "w", encoding="utf-8") as file:
        file.write("text,filename\n")
        file.writelines(f"{text}{i},{i:08d}.jpg\n" for i in range(rows))
    return path


def test_second_load_maps_the_store_without_reading_the_csv(tmp_path, monkeypatch):
    csv = write_csv(tmp_path / "train.csv", 50)
    first = load_rows(csv, None, tmp_path / "fallback")
    monkeypatch.setattr(row_store, "read_image_text_csv", lambda *a: pytest.fail("the CSV was read again"))
    second = load_rows(csv, None, tmp_path / "fallback")
    assert second.texts.tolist() == first.texts.tolist() and second.filenames[49] == "00000049.jpg"
    assert len(list((tmp_path / "train.csv.rows").iterdir())) == 2  # the store and the lock


def test_a_changed_csv_is_converted_again_even_with_its_size_and_mtime(tmp_path):
    csv = write_csv(tmp_path / "train.csv", 20, text="一只猫")
    assert load_rows(csv, None, tmp_path).texts[0] == "一只猫0"
    stat = csv.stat()
    write_csv(csv, 20, text="一只狗")  # the same byte count
    os.utime(csv, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert load_rows(csv, None, tmp_path).texts[0] == "一只狗0"
    assert len([p for p in (tmp_path / "train.csv.rows").iterdir() if p.is_dir()]) == 2  # nothing deleted


def load_in_process(csv: str, fallback: str) -> None:
    load_rows(csv, None, Path(fallback))


def test_processes_racing_build_one_store(tmp_path):
    csv = write_csv(tmp_path / "train.csv", 5_000)
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=load_in_process, args=(str(csv), str(tmp_path))) for _ in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    entries = sorted(p.name for p in (tmp_path / "train.csv.rows").iterdir())
    assert len(entries) == 2 and not any(name.startswith(".building") for name in entries)


MEASURE = """
import json, sys
from pathlib import Path
from component.training.dataset import ImageTextDataset
from component.training.row_store import load_rows

def rss_kb():  # private resident memory: the store's pages are shared through the page cache
    resident, shared = Path("/proc/self/statm").read_text().split()[1:3]
    return (int(resident) - int(shared)) * 4

growth = []
for csv in sys.argv[2:]:
    before = rss_kb()
    dataset = ImageTextDataset(load_rows(csv, None, Path(sys.argv[1])), sys.argv[1], transform=None)
    texts = [dataset.source.caption(i) for i in range(0, len(dataset), 997)]
    growth.append(rss_kb() - before)
print(json.dumps(growth))
"""


def test_memory_is_flat_from_2_thousand_to_200_thousand_rows(tmp_path):
    csvs = [write_csv(tmp_path / f"{rows}.csv", rows) for rows in (2_000, 200_000)]
    for csv in csvs:
        load_rows(csv, None, tmp_path)  # the first run converts; the measured run maps
    command = [sys.executable, "-c", MEASURE, str(tmp_path), *map(str, csvs)]
    small, large = json.loads(
        subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO).stdout
    )
    # 200k rows as Python strings would take ~30 MB in each process; mapped, they take none.
    assert large - small < 2_000, (small, large)


def test_epoch_permutation_is_a_seeded_permutation_per_epoch():
    from component.training.loaders import EpochPermutation

    sampler = EpochPermutation(100_003, seed=5)
    first = list(sampler)
    assert sorted(first) == list(range(100_003)) and first == list(EpochPermutation(100_003, seed=5))
    sampler.set_epoch(1)
    assert list(sampler) != first
