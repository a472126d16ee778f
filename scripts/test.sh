#!/usr/bin/env bash
# Quickstart 2: install what is needed (once), then run the test suite. Extra arguments go to
# pytest (e.g. -m "not slow" for the quick tests only).
source "$(dirname "$0")/setup.sh"
ruff check src tests benchmarks
python -m pytest "$@"
