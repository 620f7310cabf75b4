#!/usr/bin/env bash
# Installs the browser the web page tests drive: Debian's headless-capable `chromium` (Playwright
# for Python, a dev dependency, drives it at /usr/bin/chromium; no browser is ever downloaded).
# Hardware: a Debian/Ubuntu machine, root or sudo. Time: ~1 min (apt), nothing when it is there.
# Run:  bash launch/install-browser.sh       (without it the page tests skip, saying why)
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  echo "launch/install-browser.sh: $(/usr/bin/chromium --version 2>/dev/null || echo chromium) is installed"
  exit 0
fi
command -v apt-get >/dev/null || { echo "launch/install-browser.sh: no apt-get here: install Chromium at" \
  "/usr/bin/chromium yourself (the page tests skip without it)" >&2; exit 0; }
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "launch/install-browser.sh: installed $(/usr/bin/chromium --version)"
