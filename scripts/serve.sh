#!/usr/bin/env bash
# The main job: serve the embedded default model (SmolLM2-135M-Instruct) with its demo adapters.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m lorax_mlflow.cli serve "$@"
