#!/bin/sh
# Debian's chromium, for the dialog browser test (tests/dialog/test_browser.py). Idempotent:
# does nothing when a chromium binary is already on PATH. Needs root (or sudo) to install.
set -e
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
fi
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium
