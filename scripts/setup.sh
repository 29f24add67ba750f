#!/usr/bin/env bash
# Create (or update) the virtual environment .venv/ with virnucpro and everything it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test,slurm]'
echo "virnucpro is installed in $(pwd)/.venv"
