#!/usr/bin/env bash
# Screenshot an experiment's report.html as a person would see it (headless Chromium, no network).
# Usage: scripts/screenshot_report.sh EXPERIMENT_DIR [OUT.png] [WIDTHxHEIGHT]
# Needs Debian's chromium: apt-get install -y chromium
set -euo pipefail
dir=${1:?usage: $0 EXPERIMENT_DIR [OUT.png] [WIDTHxHEIGHT]}
out=$(realpath -m "${2:-$dir/report_screenshot.png}")
size=${3:-1400x4000}
html=$(realpath "$dir/report.html")
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$browser" ] || { echo "no chromium found; install it: apt-get install -y chromium" >&2; exit 1; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --hide-scrollbars --screenshot="$out" \
  --window-size="${size/x/,}" "file://$html" >/dev/null 2>&1
echo "$out"
