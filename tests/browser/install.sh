#!/usr/bin/env bash
# Debian's chromium for the report's browser test (tests/test_report.py), installed when missing.
# Playwright (a dev dependency) drives it; no browser is ever downloaded by Playwright itself.
set -euo pipefail
if command -v chromium >/dev/null; then
  echo "browser/install.sh: $(chromium --version 2>/dev/null | head -1)"
  exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium >/dev/null
echo "browser/install.sh: installed $(chromium --version 2>/dev/null | head -1)"
