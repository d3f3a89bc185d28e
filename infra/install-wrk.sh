#!/usr/bin/env bash
# Install wrk (the compiled HTTP load generator of bench.load and tests/load) when it is missing.
# Only as root with apt-get (CI, the dev container); anywhere else it says what to run and exits 0,
# so the caller goes on: tests/load skips with that reason, bench.load stops with it.
set -euo pipefail
if command -v wrk >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "wrk is not installed; install it with: sudo apt-get install -y wrk" >&2
  exit 0
fi
echo "== installing wrk (apt-get)"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }; then
  echo "wrk could not be installed (apt-get failed): tests/load's wrk tests skip, bench.load stops" >&2
  exit 0
fi
wrk -v 2>&1 | head -n 1 || true
