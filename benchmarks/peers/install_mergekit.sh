#!/usr/bin/env bash
# Put mergekit 0.1.5 (LGPL-3.0; a peer for tests and benchmarks, never a dependency) beside the
# test venv, at benchmarks/peers/.mergekit-pkgs, without touching .venv.
#
# mergekit needs transformers >= 5, pydantic 2, safetensors, accelerate, peft >= 0.18: the test
# venv already has versions that satisfy its pins. Its tensor merge API (merge_tensors) needs
# only one more package, immutables, so both are installed --no-deps into a target directory and
# put on PYTHONPATH for the parity tests:
#
#   bash benchmarks/peers/install_mergekit.sh
#   PYTHONPATH=benchmarks/peers/.mergekit-pkgs .venv/bin/python -m pytest tests/test_merge_mergekit.py
#
# (datasets, scipy, sentencepiece and protobuf, which its CLI and other methods use, are left
# out.) Idempotent: a second run is a no-op; delete the directory to reinstall.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TARGET="$HERE/.mergekit-pkgs"
PY="${PY:-$HERE/../../.venv/bin/python}"

if [[ -d "$TARGET/mergekit" ]]; then
    echo "mergekit already installed: $TARGET"
    exit 0
fi
"$PY" -m pip install -q --disable-pip-version-check --no-deps --target "$TARGET.tmp" \
    mergekit==0.1.5 immutables==0.21
mv "$TARGET.tmp" "$TARGET"
PYTHONPATH="$TARGET" "$PY" -c "import mergekit.merge_methods; print('mergekit 0.1.5 installed:', '$TARGET')"
