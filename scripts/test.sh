#!/usr/bin/env bash
# Set up .venv (if needed) and run the whole test suite; extra arguments go to pytest
# (for the quick subset: bash scripts/test.sh -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$(pwd)/.venv/bin:$PATH"
exec .venv/bin/python -m pytest "$@"
