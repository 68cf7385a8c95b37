#!/usr/bin/env bash
# Set up .venv with every extra (CPU builds, pinned by constraints.txt) and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test,torch,keras,plot,images,distributed]"
.venv/bin/python -m pytest -q "$@"
