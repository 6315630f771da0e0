"""download_image.py end to end against a loopback server, and its fetch/convert pieces one by one."""

import csv
import errno
import io
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest
from _full_disk import SmallDisk, leftovers, tmpfs
from _http_server import (
    BLUE,
    RED,
    LoopbackServer,
    Route,
    encode,
    heavy_modules_after_help,
    png_claiming,
    two_tone,
)
from PIL import Image

import datatools.atomic
import datatools.csv_rows
import datatools.download
import download_image
from benchmarks import bench_download
from datatools import resolve
from datatools.download import (
    ConvertedImage,
    ImageDownloader,
    plan_downloads,
    raise_open_file_limit,
    store_image,
    to_training_jpeg,
)
from datatools.fetch import (
    DownloadOptions,
    HttpPools,
    check_url,
    fetch_image,
    keepalive_hosts_per_thread,
    parse_retry_after,
)
from datatools.image_check import RejectedError, safe_image_path

FAST = ["--timeout", "0.5", "--deadline", "1.5", "--retries", "2", "--backoff", "0.05", "--threads", "16"]
SHORT_SIDE = 40
JPEG_HEADERS = {"Content-Type": "image/jpeg"}
LONG_NAME = "猫" * 90 + ".jpg"  # 274 bytes of UTF-8: more than a file name may have


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (120, 80), RED), Image.new("RGB", (120, 80), BLUE)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated_jpeg() -> bytes:
    """Stored 160x80 on its side, with EXIF orientation 6: upright it is 80x160, red on top."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(two_tone((80, 160)).transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif)


def rgba_png() -> bytes:
    image = two_tone((120, 80), "RGBA")
    image.paste((0, 0, 0, 0), (0, 0, 120, 40))  # a transparent top half must come out white
    return encode(image, "PNG")


def closed_port() -> int:
    """A loopback port that nothing listens on (connections are refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


JPEG = encode(two_tone((120, 80)), "JPEG", quality=95)
GOOD = {  # filename: (route path, route, size expected after download)
    "jpeg.jpg": ("/jpeg.jpg", Route(body=JPEG), (60, 40)),
    "png.jpg": ("/png", Route(body=encode(two_tone((120, 80)), "PNG")), (60, 40)),
    "webp.jpg": ("/webp", Route(body=encode(two_tone((120, 80)), "WEBP", quality=95)), (60, 40)),
    "gif.jpg": ("/anim.gif", Route(body=animated_gif()), (60, 40)),
    "gray.jpg": ("/gray.png", Route(body=encode(two_tone((80, 120), "L"), "PNG")), (40, 60)),
    "cmyk.jpg": ("/cmyk.jpg", Route(body=encode(two_tone((120, 80), "CMYK"), "JPEG")), (60, 40)),
    "rgba.jpg": ("/rgba.png", Route(body=rgba_png()), (60, 40)),
    "rotated.jpg": ("/rotated.jpg", Route(body=exif_rotated_jpeg()), (40, 80)),
    "small.jpg": ("/small.jpg", Route(body=encode(two_tone((30, 20)), "JPEG")), (30, 20)),
    "中文/猫.jpg": ("/图片/猫 咪.jpg", Route(body=JPEG), (60, 40)),
    "redirected.jpg": ("/redirect", Route(status=302, headers={"Location": "/jpeg.jpg"}), (60, 40)),
    "flaky.jpg": ("/flaky", Route(responses=[(500, {}, b"oops"), (200, JPEG_HEADERS, JPEG)]), (60, 40)),
    "limited.jpg": (
        "/limited",
        Route(responses=[(429, {"Retry-After": "1"}, b""), (200, JPEG_HEADERS, JPEG)]),
        (60, 40),
    ),
}
BAD = {  # filename: (url or route path, route or None, reason)
    "404.jpg": ("/missing", None, "http_404"),
    "500.jpg": ("/broken", Route(status=500), "http_500"),
    "slow.jpg": ("/slow", Route(body=JPEG, delay=3), "timeout"),
    "drip.jpg": ("/drip", Route(body=JPEG, drip=0.01), "deadline"),
    "drip_headers.jpg": ("/drip-headers", Route(body=JPEG, header_drip=0.2), "deadline"),
    "huge.jpg": ("/huge", Route(body=b"\xff" * 30_000), "too_large"),
    "huge_unannounced.jpg": ("/huge-stream", Route(body=b"\xff" * 30_000, send_length=False), "too_large"),
    "html.jpg": ("/html", Route(body=b"<html><body>Sorry</body></html>"), "not_an_image"),
    "truncated.jpg": ("/truncated.jpg", Route(body=JPEG[: len(JPEG) // 2]), "truncated"),
    "cut_off.jpg": ("/cut-off", Route(body=JPEG[:500], content_length=len(JPEG)), "incomplete_body"),
    "empty.jpg": ("/empty", Route(body=b""), "empty"),
    "loop.jpg": ("/loop", Route(status=302, headers={"Location": "/loop"}), "too_many_redirects"),
    "to_ftp.jpg": (
        "/to-ftp",
        Route(status=301, headers={"Location": "ftp://127.0.0.1/x.jpg"}),
        "bad_redirect",
    ),
    "bomb.jpg": ("/bomb.png", Route(body=png_claiming(30_000, 30_000)), "decompression_bomb"),
    "over_limit.jpg": (
        "/over-limit.png",
        Route(body=encode(Image.new("L", (1200, 1000)), "PNG")),
        "decompression_bomb",
    ),
    "refused.jpg": (f"http://127.0.0.1:{closed_port()}/x.jpg", None, "connection_error"),
    "ftp.jpg": ("ftp://127.0.0.1/x.jpg", None, "bad_url"),
    "file.jpg": ("file:///etc/passwd", None, "bad_url"),
    "javascript.jpg": ("javascript:alert(1)", None, "bad_url"),
    "no_url.jpg": ("", None, "bad_url"),
    "../escape.jpg": ("/jpeg.jpg", None, "unsafe_filename"),
    "a/../../escape2.jpg": ("/jpeg.jpg", None, "unsafe_filename"),
    "ABSOLUTE": ("/jpeg.jpg", None, "unsafe_filename"),  # replaced by an absolute path in the fixture
    "link/escape3.jpg": ("/jpeg.jpg", None, "unsafe_filename"),  # link/ points outside the output
    "download_report.json": ("/jpeg.jpg", None, "unsafe_filename"),
    "": ("/jpeg.jpg", None, "missing_filename"),
    LONG_NAME: ("/jpeg.jpg", None, "filename_too_long"),
    f"{LONG_NAME}/a.jpg": ("/jpeg.jpg", None, "filename_too_long"),
}


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, ["text", "url", "filename"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def server():
    """The loopback server with every route of GOOD and BAD."""
    loopback = LoopbackServer()
    for path, route, _ in [*GOOD.values(), *BAD.values()]:
        if route is not None:
            loopback.routes[path] = route
    with loopback.running():
        yield loopback


@pytest.fixture(scope="module")
def first_run(server, tmp_path_factory):
    """One download of every GOOD and BAD row; its outputs and the requests it made."""
    root = tmp_path_factory.mktemp("download")
    output = root / "images"
    (root / "outside").mkdir()
    output.mkdir()
    (output / "link").symlink_to(root / "outside")
    rows = []
    for filename, (url, _, _) in [*GOOD.items(), *BAD.items()]:
        filename = str(root / "absolute.jpg") if filename == "ABSOLUTE" else filename
        rows.append(
            {"text": "一只猫", "url": server.url(url) if url.startswith("/") else url, "filename": filename}
        )
    csv_path = write_csv(root / "train.csv", rows)
    argv = ["--input", str(csv_path), "--output", str(output), "--short_side", str(SHORT_SIDE)]
    argv += ["--max_bytes", "20000", "--max_pixels", "1000000", *FAST]
    started = time.monotonic()
    exit_code = download_image.main(argv)
    return {
        "argv": argv,
        "exit_code": exit_code,
        "seconds": time.monotonic() - started,
        "root": root,
        "output": output,
        "report": json.loads((output / "download_report.json").read_text()),
        "failed": {row["filename"]: row["reason"] for row in read_rows(output / "download_failed.csv")},
        "requests": dict(server.requests),
    }


def test_run_completes_with_exit_0_despite_failures(first_run):
    assert first_run["exit_code"] == 0
    assert first_run["seconds"] < 10


@pytest.mark.parametrize("filename", sorted(GOOD))
def test_good_row_is_stored_as_rgb_jpeg_of_the_right_size(first_run, filename):
    with Image.open(first_run["output"] / filename) as image:
        image.load()
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", GOOD[filename][2])


@pytest.mark.parametrize("filename", ["jpeg.jpg", "rotated.jpg", "gray.jpg", "cmyk.jpg"])
def test_stored_image_is_upright(first_run, filename):
    with Image.open(first_run["output"] / filename) as image:
        top, bottom = (
            image.getpixel((image.width // 2, 2)),
            image.getpixel((image.width // 2, image.height - 3)),
        )
    if filename == "gray.jpg":
        assert top[0] > bottom[0]  # red is the lighter grey
    else:
        assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]


def test_animated_gif_keeps_its_first_frame(first_run):
    with Image.open(first_run["output"] / "gif.jpg") as image:
        assert image.getpixel((10, 10))[0] > 150


def test_transparency_becomes_white(first_run):
    with Image.open(first_run["output"] / "rgba.jpg") as image:
        assert min(image.getpixel((10, 5))) > 240


@pytest.mark.parametrize("filename", sorted(BAD))
def test_bad_row_is_reported_with_its_reason_and_leaves_no_file(first_run, filename):
    expected_reason = BAD[filename][2]
    if filename == "ABSOLUTE":
        filename = str(first_run["root"] / "absolute.jpg")
    assert first_run["failed"][filename] == expected_reason
    assert not (first_run["output"] / "escape.jpg").exists()
    assert not (first_run["root"] / "escape.jpg").exists()
    if (
        filename
        and not filename.startswith("/")
        and ".." not in filename
        and filename != "download_report.json"
        and expected_reason != "filename_too_long"  # cannot even be looked up
    ):
        assert not (first_run["output"] / filename).exists()


def test_no_temp_files_are_left(first_run):
    assert not [path for path in first_run["root"].rglob(".*") if path.suffix in (".part", ".tmp")]
    assert not list((first_run["root"] / "outside").iterdir())


def test_report_has_totals_and_a_reason_histogram(first_run):
    report = first_run["report"]
    assert (report["total"], report["ok"], report["skipped"]) == (len(GOOD) + len(BAD), len(GOOD), 0)
    assert report["failed"] == len(BAD)
    expected = {}
    for _, _, reason in BAD.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert report["failure_reasons"] == expected


def test_rows_refused_before_fetching_make_no_request(first_run):
    assert first_run["requests"]["/jpeg.jpg"] == 2  # its own row and the redirect, not the unsafe rows


def test_retries_follow_transient_failures_and_give_up_on_permanent_ones(first_run):
    requests_made = first_run["requests"]
    assert (requests_made["/flaky"], requests_made["/limited"]) == (2, 2)
    assert requests_made["/broken"] == 3  # --retries 2
    assert requests_made["/missing"] == 1  # a 404 is not retried
    assert requests_made["/loop"] == 6  # the first request and 5 redirects


def test_rerun_skips_finished_rows_without_a_request(first_run, server):
    before = dict(server.requests)
    assert download_image.main(first_run["argv"]) == 0
    report = json.loads((first_run["output"] / "download_report.json").read_text())
    assert (report["ok"], report["skipped"]) == (0, len(GOOD))
    for path, _, _ in GOOD.values():
        assert server.requests[path] == before[path], path


def test_retry_failed_retries_only_the_failure_list(server, tmp_path):
    server.routes["/later.jpg"] = Route(status=404)
    rows = [
        {"text": "a", "url": server.url("/jpeg.jpg"), "filename": "ok.jpg"},
        {"text": "b", "url": server.url("/later.jpg"), "filename": "later.jpg"},
    ]
    argv = [
        "--input",
        str(write_csv(tmp_path / "train.csv", rows)),
        "--output",
        str(tmp_path / "images"),
        *FAST,
    ]
    assert download_image.main(argv) == 0
    (tmp_path / "images" / "ok.jpg").unlink()  # not in the failure list, so a retry must not fetch it
    server.routes["/later.jpg"] = Route(body=JPEG)
    before = dict(server.requests)
    assert download_image.main([*argv, "--retry_failed"]) == 0
    assert server.requests["/jpeg.jpg"] == before["/jpeg.jpg"]
    assert (tmp_path / "images" / "later.jpg").is_file() and not (tmp_path / "images" / "ok.jpg").exists()
    assert read_rows(tmp_path / "images" / "download_failed.csv") == []


def test_ctrl_c_leaves_complete_images_and_a_report(server, tmp_path, monkeypatch):
    rows = [{"text": "x", "url": server.url("/jpeg.jpg"), "filename": f"{index}.jpg"} for index in range(20)]
    planned = download_image.plan_downloads

    def interrupted_after_five(rows, output):
        for index, task in enumerate(planned(rows, output)):
            if index == 5:
                raise KeyboardInterrupt
            yield task

    monkeypatch.setattr(download_image, "plan_downloads", interrupted_after_five)
    output = tmp_path / "images"
    argv = ["--input", str(write_csv(tmp_path / "train.csv", rows)), "--output", str(output), *FAST]
    assert download_image.main(argv) == 130
    report = json.loads((output / "download_report.json").read_text())
    stored = sorted(path.name for path in output.glob("*.jpg"))
    assert report["interrupted"] and report["ok"] == len(stored) <= 5
    assert not [path for path in output.glob(".*") if path.suffix in (".part", ".tmp")]
    for path in output.glob("*.jpg"):
        Image.open(path).load()


def test_a_server_dripping_its_headers_is_cut_off_at_the_deadline(server):
    server.routes["/drip-headers-alone"] = Route(body=JPEG, header_drip=0.2)
    options = DownloadOptions(timeout=0.5, deadline=1.0, retries=2, backoff=0.05)
    started = time.monotonic()
    result = fetch_image(server.url("/drip-headers-alone"), HttpPools(), options, threading.Event())
    assert result.reason == "deadline"
    assert time.monotonic() - started < options.deadline + 0.5


def test_ctrl_c_ends_a_download_stuck_in_dripping_headers_at_once(server, tmp_path, monkeypatch):
    server.routes["/drip-headers-slowly"] = Route(body=JPEG, header_drip=0.2)
    rows = [{"text": "x", "url": server.url("/drip-headers-slowly"), "filename": "x.jpg"}]
    planned = download_image.plan_downloads

    def interrupted_while_downloading(rows, output):
        yield from planned(rows, output)
        time.sleep(0.5)  # the download is waiting on the headers now
        raise KeyboardInterrupt

    monkeypatch.setattr(download_image, "plan_downloads", interrupted_while_downloading)
    argv = ["--input", str(write_csv(tmp_path / "train.csv", rows)), "--output", str(tmp_path / "images")]
    started = time.monotonic()
    assert download_image.main([*argv, "--timeout", "0.5", "--deadline", "30"]) == 130
    assert time.monotonic() - started < 1.5
    report = json.loads((tmp_path / "images" / "download_report.json").read_text())
    assert (report["total"], report["interrupted"]) == (0, True)


@pytest.mark.parametrize(
    ("threads", "open_file_limit", "hosts"), [(256, 1024, 1), (16, 1024, 16), (64, 2**20, 64), (4, 64, 4)]
)
def test_idle_connections_of_all_threads_stay_within_a_quarter_of_the_open_file_limit(
    threads, open_file_limit, hosts
):
    assert keepalive_hosts_per_thread(threads, open_file_limit) == hosts


def test_a_thread_keeps_idle_connections_to_at_most_hosts_per_thread_hosts():
    servers = [LoopbackServer() for _ in range(4)]
    with ExitStack() as stack:
        for loopback in servers:
            loopback.routes["/a.jpg"] = Route(body=JPEG)
            stack.enter_context(loopback.running())
        pools = HttpPools(hosts_per_thread=2)
        for loopback in servers:
            assert fetch_image(loopback.url("/a.jpg"), pools, DownloadOptions(timeout=1)).reason is None
        waited_until = time.monotonic() + 2
        while sum(loopback.open_connections for loopback in servers) > 2 and time.monotonic() < waited_until:
            time.sleep(0.01)
        assert [loopback.open_connections for loopback in servers] == [0, 0, 1, 1]


@pytest.mark.parametrize("where", ["connect", "store"])
def test_running_out_of_file_descriptors_stops_the_run_with_a_clear_message(
    server, tmp_path, monkeypatch, capsys, where
):
    def out_of_descriptors(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    if where == "connect":
        monkeypatch.setattr(resolve, "connect", out_of_descriptors)
    else:
        monkeypatch.setattr(datatools.download, "store_image", out_of_descriptors)
    rows = [{"text": "x", "url": server.url("/jpeg.jpg"), "filename": f"{index}.jpg"} for index in range(4)]
    argv = ["--input", str(write_csv(tmp_path / "train.csv", rows)), "--output", str(tmp_path / "images")]
    assert download_image.main([*argv, *FAST]) == 1
    assert "out of file descriptors" in capsys.readouterr().err
    assert not (tmp_path / "images" / "download_report.json").exists()


def test_the_open_file_limit_is_raised_to_the_hard_limit():
    resource = pytest.importorskip("resource")
    limit = raise_open_file_limit()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert limit == soft and (soft == hard or hard == resource.RLIM_INFINITY)


def test_at_most_max_conversions_images_are_converted_at_once(server, tmp_path, monkeypatch):
    lock = threading.Lock()
    running, most = 0, 0

    def slow_conversion(data: bytes, *args: object) -> ConvertedImage:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return ConvertedImage(data, 1, 1, 1, 1)

    monkeypatch.setattr(datatools.download, "convert_image", slow_conversion)
    downloader = ImageDownloader(DownloadOptions(timeout=1), max_conversions=2)
    with ThreadPoolExecutor(8) as executor:
        outcomes = list(
            executor.map(
                lambda index: downloader.download(server.url("/jpeg.jpg"), tmp_path / f"{index}.jpg"),
                range(16),
            )
        )
    assert outcomes == ["ok"] * 16 and most == 2


def test_short_side_0_keeps_the_size(server, tmp_path):
    rows = [{"text": "x", "url": server.url("/jpeg.jpg"), "filename": "full.jpg"}]
    argv = ["--input", str(write_csv(tmp_path / "train.csv", rows)), "--output", str(tmp_path / "images")]
    assert download_image.main([*argv, "--short_side", "0", *FAST]) == 0
    assert Image.open(tmp_path / "images" / "full.jpg").size == (120, 80)


def test_missing_input_exits_2_naming_the_file(tmp_path, capsys):
    assert (
        download_image.main(["--input", str(tmp_path / "nope.csv"), "--output", str(tmp_path / "out")]) == 2
    )
    assert "nope.csv" in capsys.readouterr().err


def test_missing_column_exits_2_naming_it(tmp_path, capsys):
    (tmp_path / "train.csv").write_text("text,link,filename\na,b,c\n")
    assert (
        download_image.main(["--input", str(tmp_path / "train.csv"), "--output", str(tmp_path / "out")]) == 2
    )
    assert "url" in capsys.readouterr().err


def test_bad_option_exits_2(tmp_path, capsys):
    write_csv(tmp_path / "train.csv", [])
    argv = ["--input", str(tmp_path / "train.csv"), "--output", str(tmp_path / "out"), "--timeout", "0"]
    assert download_image.main(argv) == 2
    assert "timeout" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--timeout", "nan"),
        ("--deadline", "nan"),
        ("--deadline", "inf"),
        ("--backoff", "nan"),
        ("--retries", "-1"),
    ],
)
def test_an_option_that_is_not_a_finite_number_in_range_exits_2_naming_it(tmp_path, capsys, option, value):
    write_csv(tmp_path / "train.csv", [])
    argv = ["--input", str(tmp_path / "train.csv"), "--output", str(tmp_path / "out"), option, value]
    assert download_image.main(argv) == 2
    assert option.lstrip("-") in capsys.readouterr().err


def test_429_waits_as_long_as_retry_after_asks(server):
    server.routes["/wait"] = Route(responses=[(429, {"Retry-After": "1"}, b""), (200, JPEG_HEADERS, JPEG)])
    started = time.monotonic()
    result = fetch_image(server.url("/wait"), HttpPools(), DownloadOptions(timeout=1, backoff=0.01))
    assert result.reason is None and result.attempts == 2
    assert time.monotonic() - started >= 1.0


def test_retry_after_longer_than_the_deadline_gives_up_at_once(server):
    server.routes["/wait-long"] = Route(status=503, headers={"Retry-After": "120"})
    started = time.monotonic()
    result = fetch_image(server.url("/wait-long"), HttpPools(), DownloadOptions(timeout=1, deadline=5))
    assert (result.reason, result.attempts) == ("http_503", 1)
    assert time.monotonic() - started < 1


def test_proxy_from_the_environment_is_used(server, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", server.url(""))  # the loopback server answers proxy requests too
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    result = fetch_image("http://images.example.invalid/jpeg.jpg", HttpPools(), DownloadOptions(timeout=1))
    assert (result.reason, result.data) == (None, JPEG)


@pytest.fixture
def no_proxy(monkeypatch):
    """No proxy from the environment: host names are looked up here."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)


def loopback_lookup(host: str, port: int) -> list:
    """A stand-in for the system lookup: every name is 127.0.0.1."""
    return socket.getaddrinfo("127.0.0.1", port, socket.AF_INET, socket.SOCK_STREAM)


def test_hanging_name_lookup_fails_its_row_within_the_timeout_and_the_run_goes_on(
    server, tmp_path, monkeypatch, no_proxy
):
    released = threading.Event()

    def lookup_host(host: str, port: int) -> list:
        if host == "hangs.invalid":
            released.wait(30)  # a resolver that never answers
        return loopback_lookup(host, port)

    monkeypatch.setattr(resolve, "lookup_host", lookup_host)
    rows = [
        {"text": "a", "url": f"http://hangs.invalid:{server.port}/jpeg.jpg", "filename": "hangs.jpg"},
        {"text": "b", "url": f"http://answers.invalid:{server.port}/jpeg.jpg", "filename": "ok.jpg"},
    ]
    output = tmp_path / "images"
    argv = ["--input", str(write_csv(tmp_path / "train.csv", rows)), "--output", str(output)]
    argv += ["--timeout", "0.5", "--deadline", "10", "--retries", "2", "--threads", "2"]
    try:
        started = time.monotonic()
        assert download_image.main(argv) == 0
        seconds = time.monotonic() - started
    finally:
        released.set()
    assert read_rows(output / "download_failed.csv") == [
        {"text": "a", "url": rows[0]["url"], "filename": "hangs.jpg", "reason": "dns_timeout"}
    ]
    assert (output / "ok.jpg").is_file()
    assert 0.5 <= seconds < 2.0


def test_unknown_host_name_is_a_dns_error(monkeypatch, no_proxy):
    def lookup_host(host: str, port: int) -> list:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(resolve, "lookup_host", lookup_host)
    result = fetch_image("http://nowhere.invalid/x.jpg", HttpPools(), DownloadOptions(timeout=1))
    assert (result.reason, result.attempts) == ("dns_error", 1)


def test_concurrent_lookups_of_one_host_share_one_system_lookup(monkeypatch):
    calls = []
    released = threading.Event()

    def lookup_host(host: str, port: int) -> list:
        calls.append(host)
        released.wait(5)
        return loopback_lookup(host, port)

    monkeypatch.setattr(resolve, "lookup_host", lookup_host)
    resolver = resolve.Resolver()
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(resolver.resolve("shared.invalid", 80, 5)))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.1)
    released.set()
    for thread in threads:
        thread.join()
    assert calls == ["shared.invalid"] and len(results) == 8


@pytest.mark.parametrize(
    ("value", "expected"),
    [("3", 3.0), ("0", 0.0), (None, None), ("soon", None), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0)],
)
def test_parse_retry_after(value, expected):
    assert parse_retry_after(value) == expected


@pytest.mark.parametrize(
    "url", ["ftp://host/x.jpg", "file:///etc/passwd", "//host/x.jpg", "http://", "data:,x", " "]
)
def test_check_url_refuses_non_http_urls(url):
    with pytest.raises(RejectedError, match="bad_url"):
        check_url(url)


@pytest.mark.parametrize(
    "filename", ["/etc/passwd", "../x.jpg", "a/../../x.jpg", "a\\..\\x.jpg", ".", "a\x00.jpg"]
)
def test_safe_image_path_refuses_escaping_names(tmp_path, filename):
    with pytest.raises(RejectedError, match="unsafe_filename"):
        safe_image_path(tmp_path, filename)


def test_safe_image_path_refuses_a_symlinked_file_pointing_outside(tmp_path):
    (tmp_path / "outside.jpg").write_bytes(JPEG)
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link.jpg").symlink_to(tmp_path / "outside.jpg")
    with pytest.raises(RejectedError, match="unsafe_filename"):
        safe_image_path(tmp_path / "root", "link.jpg")


@pytest.mark.parametrize(
    "filename", ["a.jpg", "00/12/a.jpg", "./a.jpg", "a..b.jpg", "猫.jpg", "猫" * 85, f"{'猫' * 85}/a.jpg"]
)
def test_safe_image_path_accepts_names_inside(tmp_path, filename):
    assert safe_image_path(tmp_path, filename).resolve().is_relative_to(tmp_path.resolve())


@pytest.mark.parametrize("filename", [LONG_NAME, f"{LONG_NAME}/a.jpg", f"a/{'x' * 256}"])
def test_safe_image_path_refuses_a_part_longer_than_the_file_system_takes(tmp_path, filename):
    with pytest.raises(RejectedError, match="filename_too_long"):
        safe_image_path(tmp_path, filename)


def test_a_path_that_cannot_be_examined_fails_only_its_row(tmp_path, monkeypatch):
    def is_symlink(path: Path) -> bool:
        if path.name == "broken.jpg":
            raise OSError(errno.EIO, "Input/output error", str(path))
        return False

    monkeypatch.setattr(Path, "is_symlink", is_symlink)
    rows = [{"url": "http://127.0.0.1/x.jpg", "filename": name} for name in ("broken.jpg", "fine.jpg")]
    planned = [target for _, _, target in plan_downloads(rows, tmp_path)]
    assert planned == ["unreadable", tmp_path / "fine.jpg"]


def test_large_jpeg_is_shrunk_with_draft_decoding_to_the_exact_size():
    jpeg = to_training_jpeg(encode(two_tone((1000, 600)), "JPEG"), short_side=256)
    with Image.open(io.BytesIO(jpeg)) as image:
        assert image.size == (427, 256)
        assert image.getpixel((200, 10))[0] > 150 and image.getpixel((200, 250))[2] > 150


def test_store_image_leaves_nothing_when_the_write_fails(tmp_path):
    with pytest.raises(TypeError):
        store_image(tmp_path / "a" / "a.jpg", "not bytes")  # type: ignore[arg-type]
    assert list((tmp_path / "a").iterdir()) == []


def test_benchmark_quick_mode_runs(tmp_path, capsys):
    assert bench_download.main(["--quick", "--workdir", str(tmp_path)]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["download"]["images_per_s"] > 0 and figures["cpu_limit"]["images_per_s"] > 0


def test_help_loads_neither_torch_nor_transformers():
    assert heavy_modules_after_help("download_image") == []


def assert_full_disk_ended_cleanly(exit_code: int, err: str, output: Path) -> None:
    assert exit_code == 1
    assert "Traceback" not in err and "No space left on device" in err
    assert err.strip().splitlines()[-1].startswith(f"error: cannot write to {output}")
    assert leftovers(output) == [] and not (output / "download_report.json").exists()


@pytest.mark.parametrize("filling", ["images", "failure_list"])
def test_a_full_disk_stops_the_run_with_one_line_and_leaves_no_temp_files(
    server, tmp_path, monkeypatch, capsys, filling
):
    if filling == "images":
        rows = [{"text": "x", "url": server.url("/jpeg.jpg"), "filename": f"{i}.jpg"} for i in range(20)]
        monkeypatch.setattr(datatools.atomic, "open", SmallDisk(free_bytes=5_000).open, raising=False)
    else:  # every row fails without a request, and the failure list fills the disk
        rows = [{"text": "一只猫" * 50, "url": "ftp://x/1.jpg", "filename": f"{i}.jpg"} for i in range(300)]
        monkeypatch.setattr(datatools.csv_rows, "open", SmallDisk(free_bytes=20_000).open, raising=False)
    output = tmp_path / "images"
    argv = ["--input", str(write_csv(tmp_path / "train.csv", rows)), "--output", str(output)]
    exit_code = download_image.main([*argv, *FAST])
    assert_full_disk_ended_cleanly(exit_code, capsys.readouterr().err, output)


def test_a_real_full_tmpfs_stops_the_run_with_one_line_and_leaves_no_temp_files(server, tmp_path, capsys):
    rows = [{"text": "x", "url": server.url("/jpeg.jpg"), "filename": f"{i}.jpg"} for i in range(60)]
    csv_path = write_csv(tmp_path / "train.csv", rows)
    with tmpfs(tmp_path / "small") as output:
        exit_code = download_image.main(["--input", str(csv_path), "--output", str(output), *FAST])
        assert_full_disk_ended_cleanly(exit_code, capsys.readouterr().err, output)
