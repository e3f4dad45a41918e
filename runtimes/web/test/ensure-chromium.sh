#!/usr/bin/env bash
# Installs Debian's chromium for the browser test when it is missing and this is root with apt-get;
# otherwise says why not (the browser test then skips with that reason).
set -euo pipefail
for candidate in "${CHROMIUM:-}" /usr/bin/chromium /usr/bin/chromium-browser /usr/bin/google-chrome; do
  if [ -n "$candidate" ] && [ -x "$candidate" ]; then echo "chromium: $candidate"; exit 0; fi
done
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "chromium is not installed and this is not root with apt-get: the browser test will be skipped"; exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
echo "chromium: installed $(/usr/bin/chromium --version 2>/dev/null || true)"
