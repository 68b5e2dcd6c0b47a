#!/usr/bin/env bash
# Make sure a headless Chromium and its driver are installed (Debian's `chromium` and `chromium-driver`): the
# `browser` tests drive the web UI in a real browser through Selenium. A browser download by a Python package
# at install time fails on machines without general internet, so the distribution's packages are used.
# Prints the path of chromedriver on success.
set -euo pipefail
if command -v chromedriver >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1; then
    command -v chromedriver; exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "browser.sh: chromium and chromium-driver are missing; install them (as root: apt-get install chromium" \
         "chromium-driver) or set POISE_SKIP_BROWSER=1 to skip the browser tests" >&2
    exit 1
fi
echo "poise: installing chromium and chromium-driver for the browser tests (first use; about a minute)" >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
        >"$log" 2>&1; then
    echo "browser.sh: apt-get could not install chromium; last lines:" >&2
    tail -n 20 "$log" >&2
    exit 1
fi
command -v chromedriver
