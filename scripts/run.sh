#!/usr/bin/env bash
# Quickstart 1: install what is needed (once), then run the whole pipeline on the embedded model
# and the bundled example corpus. Extra arguments go to `kedro run` (e.g. --pipelines evaluation).
source "$(dirname "$0")/setup.sh"
python -m cartridges "$@"  # `kedro run`, with the known third-party warnings filtered first
