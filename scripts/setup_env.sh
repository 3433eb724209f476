# Sourced by scripts/demo.sh and scripts/test.sh: creates .venv (once) and installs analog into it.
# torch comes first and pinned, so a machine with only Python gets one known build. On a GPU machine,
# set ANALOG_TORCH_SPEC (for example "torch==2.13.0 --index-url <your CUDA wheel index>") or install
# torch into .venv yourself beforehand: an importable torch is kept as it is.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" >/dev/null 2>&1; then
  # shellcheck disable=SC2086
  python -m pip install -q ${ANALOG_TORCH_SPEC:-torch==2.13.0}
fi
python -m pip install -q -e ".[${ANALOG_EXTRAS:-test}]"
