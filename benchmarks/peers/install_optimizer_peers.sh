#!/usr/bin/env bash
# Put the optimiser peers (test-time extras, never dependencies) beside the test venv, at
# benchmarks/peers/.optim-pkgs, without touching .venv: galore-torch 1.0 (GaLore's reference;
# its package imports bitsandbytes, which imports on CPU), lion-pytorch 0.2.5, fira 1.0.2 and
# bitsandbytes 0.50.2. Their other needs (torch, transformers, numpy, packaging) are already in
# the test venv, so all three go in --no-deps:
#
#   bash benchmarks/peers/install_optimizer_peers.sh
#   PYTHONPATH=benchmarks/peers/.optim-pkgs .venv/bin/python -m pytest tests/test_train_optimizers.py
#
# Idempotent: a second run is a no-op; delete the directory to reinstall.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TARGET="$HERE/.optim-pkgs"
PY="${PY:-$HERE/../../.venv/bin/python}"

if [[ -d "$TARGET/galore_torch" && -d "$TARGET/lion_pytorch" && -d "$TARGET/fira" ]]; then
    echo "optimiser peers already installed: $TARGET"
    exit 0
fi
rm -rf "$TARGET.tmp"
"$PY" -m pip install -q --disable-pip-version-check --no-deps --target "$TARGET.tmp" \
    galore-torch==1.0 lion-pytorch==0.2.5 fira==1.0.2 bitsandbytes==0.50.2
rm -rf "$TARGET"
mv "$TARGET.tmp" "$TARGET"
PYTHONPATH="$TARGET" "$PY" -c "import galore_torch, lion_pytorch, fira; print('optimiser peers installed:', '$TARGET')"
