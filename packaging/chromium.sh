#!/bin/sh
# Debian's headless Chromium for the web page's browser test (tests/test_web.py, `pytest -m slow`).
# Best effort: where it cannot install (not root, no apt-get, no network) it says so and the test
# skips with its reason; it never fails the test command.
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium.sh: not installing Chromium here (needs root and apt-get); the browser test will skip" >&2
    exit 0
fi
echo "chromium.sh: installing Debian's chromium (about a minute)" >&2
{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } >/dev/null 2>&1 \
    || echo "chromium.sh: apt-get could not install chromium; the browser test will skip" >&2
exit 0
