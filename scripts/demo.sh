#!/usr/bin/env bash
# One command for the demo on a fresh machine: bash scripts/demo.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ANALOG_EXTRAS=demo
# shellcheck disable=SC1091
. "$here/setup_env.sh"
python -m analog demo "$@"
