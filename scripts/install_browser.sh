#!/usr/bin/env bash
# Install what the browser test (tests/test_retrieval_browser.py) needs: Debian's chromium, from
# apt-get, and the playwright Python package, into .venv. Playwright drives /usr/bin/chromium and
# never downloads a browser of its own. Idempotent and quiet: a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/chromium ]; then
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then
        SUDO=(sudo)
    fi
    echo "install_browser: installing chromium with apt-get"
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
    bash scripts/setup.sh
fi
if ! .venv/bin/python -c "import playwright.sync_api" 2>/dev/null; then
    echo "install_browser: installing playwright into .venv"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "playwright>=1.65.2"
fi
