#!/usr/bin/env bash
# The console's browser tests drive Debian's Chromium through Playwright (no browser download): install it when it
# is missing and this is a Debian-like machine where we are root; otherwise say how, and the tests skip saying why.
set -euo pipefail
for name in chromium chromium-browser; do
    if command -v "$name" >/dev/null; then exit 0; fi
done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's chromium for the console's browser tests (apt-get install chromium)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "install-chromium: apt-get failed; the console's browser tests will skip" >&2
else
    echo "install-chromium: chromium is missing; run 'sudo apt-get install chromium' (or set LADLE_CHROMIUM to a" \
         "Chromium binary) for the console's browser tests" >&2
fi
