#!/usr/bin/env bash
# Set up a fresh machine and run the test suite (the README's second command).
# torch is pinned first: an open-ended torch requirement would pull a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet torch==2.13.0
python3 -m pip install --quiet -e ".[test]"
python3 -m pytest -q "$@"
