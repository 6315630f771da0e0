"""The search page in a real headless browser: Debian's chromium driven by Playwright.

Skipped when /usr/bin/chromium or the playwright package is missing; scripts/install_browser.sh
installs both. Playwright launches the system chromium and never downloads a browser.
"""

import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
pytest.importorskip("uvicorn", reason="the [serve] extra is not installed")
from _service import serving
from test_retrieval import IMAGE_NAMES, draw_images

import retrieval
from component.retrieval.api_models import DEFAULT_TOP_K
from component.retrieval.images import images_in_directory
from component.retrieval.index import RetrievalIndex

sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="playwright cannot be imported (scripts/install_browser.sh installs it)",
    exc_type=ImportError,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
QUERY = "一只小猫在红色的沙发上睡觉"
THUMBNAILS_LOADED = """() => {
    const images = [...document.querySelectorAll("#results img")];
    return images.length > 0 && images.every((image) => image.complete && image.naturalWidth > 0);
}"""

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (scripts/install_browser.sh)"
)


@pytest.fixture(scope="module")
def index_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    """An index of eight drawn images."""
    root = tmp_path_factory.mktemp("browser")
    draw_images(root / "images", IMAGE_NAMES)
    RetrievalIndex.build(tiny_checkpoint, root / "index", images_in_directory(root / "images"), device="cpu")
    return root / "index"


@pytest.fixture(scope="module")
def server_url(index_dir):
    """The search service served from a thread on a free loopback port."""
    with serving(index_dir) as server:
        yield server.url


@pytest.fixture(scope="module")
def page(server_url):
    """A page of headless chromium, opened on the search page."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.set_default_timeout(20_000)
        page.console_errors = []  # a blocked inline script or style is reported here

        def keep_error(message) -> None:
            if message.type == "error":
                page.console_errors.append(message.text)

        page.on("console", keep_error)
        page.goto(server_url)
        yield page
        browser.close()


def shown_filenames(page) -> list[str]:
    """The filenames of the result thumbnails, in page order, once every thumbnail has loaded."""
    page.wait_for_function(THUMBNAILS_LOADED)
    return page.eval_on_selector_all(
        "#results figure.result", "figures => figures.map(f => f.dataset.filename)"
    )


def command_filenames(capsys, index_dir: Path, *query: str) -> list[str]:
    """The filenames `retrieval.py search --json` ranks for the query."""
    capsys.readouterr()
    retrieval.main(
        [
            "search",
            "--index",
            str(index_dir),
            *query,
            "--top_k",
            str(DEFAULT_TOP_K),
            "--json",
            "--device",
            "cpu",
        ]
    )
    return [result["filename"] for result in json.loads(capsys.readouterr().out)["results"]]


def test_chinese_query_shows_thumbnails_in_the_search_commands_order(capsys, page, index_dir):
    page.locator("#query").press_sequentially(QUERY)
    page.locator("#query").press("Enter")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('results for')")
    assert QUERY in page.text_content("#status")
    assert shown_filenames(page) == command_filenames(capsys, index_dir, "--text", QUERY)
    assert len(shown_filenames(page)) == len(IMAGE_NAMES)


def test_image_upload_shows_the_image_itself_first(capsys, page, index_dir):
    image = Path(RetrievalIndex.load(index_dir).image_root) / "more" / "g.jpg"
    page.set_input_files("#image-query", str(image))
    page.wait_for_function("() => document.getElementById('status').textContent.includes('g.jpg')")
    shown = shown_filenames(page)
    assert shown[0] == "more/g.jpg"
    assert shown == command_filenames(capsys, index_dir, "--image", str(image))


def test_the_content_security_policy_lets_the_pages_own_script_and_style_run(page):
    page.wait_for_function("() => document.getElementById('results').children.length > 0")
    assert page.evaluate("getComputedStyle(document.getElementById('results')).display") == "flex"
    assert not [error for error in page.console_errors if "Content Security Policy" in error]


def test_the_api_reference_renders_every_endpoint_offline(page, server_url):
    page.goto(server_url + "docs")
    page.wait_for_function("() => document.querySelectorAll('section.endpoint').length > 0")
    shown = page.eval_on_selector_all("section.endpoint", "sections => sections.map(s => s.dataset.path)")
    assert set(shown) == {"/healthz", "/api/search", "/api/search_image", "/api/embed", "/api/similarity"}
    assert "Chinese CLIP image search" in page.text_content("#title")
    assert not [error for error in page.console_errors if "Content Security Policy" in error]
    page.goto(server_url)
