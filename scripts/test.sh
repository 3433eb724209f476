#!/usr/bin/env bash
# One command for the whole test suite on a fresh machine: bash scripts/test.sh [pytest args]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC1091
. "$here/setup_env.sh"
# The report page is tested in a real headless browser (Debian's chromium).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; browser tests will be skipped" >&2
fi
ruff check analog tests examples benchmarks
python -m pytest -q "$@"
