#!/usr/bin/env bash
# Quickstart 2: install what is needed (once), then run the test suite. Extra arguments go to
# pytest (e.g. -m "not slow" for the quick tests only).
source "$(dirname "$0")/setup.sh"
ruff check src tests benchmarks
# Two worker processes (tests use one thread each), each test file on one worker in file order:
# the suite takes half the time on two cores. -n 0 runs it in this process.
python -m pytest -n 2 --dist loadfile "$@"
