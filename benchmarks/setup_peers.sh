#!/usr/bin/env bash
# Install the benchmark peer libraries into the CURRENT Python environment
# without ever touching torch.
#
#   source /path/to/venv/bin/activate
#   bash benchmarks/setup_peers.sh                # from PyPI
#   PIP_FIND_LINKS=/tmp/peers bash benchmarks/setup_peers.sh   # prefer local wheels
#
# What it does:
#   1. pip install --no-deps -r requirements-peers.txt   (peers + their pure deps)
#   2. pip install --no-deps --target benchmarks/.peer_site/secorder001 torch-secorder==0.0.1
#      (same import name as our package, so it lives outside site-packages and is
#      loaded under an alias by benchmarks/_peers.py:load_secorder_001())
#   3. checks torch's version/location did not change, then runs
#      `python benchmarks/_peers.py --check` (import + one tiny call per peer).
#
# Everything is --no-deps on purpose: a plain `pip install backpack-for-pytorch`
# would pull torchvision and a multi-GB torch build.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python}"

if ! "$PY" -c 'import sys; sys.exit(0 if sys.prefix != sys.base_prefix else 1)'; then
    if [ "${ALLOW_SYSTEM_PYTHON:-0}" != "1" ]; then
        echo "setup_peers.sh: no virtualenv active (set ALLOW_SYSTEM_PYTHON=1 to override)" >&2
        exit 1
    fi
fi

torch_id() {
    "$PY" -W ignore -c 'import torch; print(torch.__version__, torch.__file__)'
}
if ! before="$(torch_id)"; then
    echo "setup_peers.sh: torch must already be installed in this environment" >&2
    exit 1
fi
echo "torch: $before"

"$PY" -m pip install --no-deps -r "$here/requirements-peers.txt"

"$PY" -m pip install --no-deps --upgrade \
    --target "$here/.peer_site/secorder001" "torch-secorder==0.0.1"

after="$(torch_id)"
if [ "$before" != "$after" ]; then
    echo "setup_peers.sh: torch changed from '$before' to '$after' -- aborting" >&2
    exit 1
fi

"$PY" "$here/_peers.py" --check
