#!/usr/bin/env bash
# Build the llm-compressor peer venv at benchmarks/peers/.venv-llmcompressor.
#
# llm-compressor 0.14 pins torch 2.10-2.14, transformers 5.15-5.17 and compressed-tensors 0.19.0,
# which clash with slimtune's own venv, so it gets a venv of its own. torch==2.13.0 (the local CPU
# wheel) is installed FIRST and every later pip call is constrained to it (an unpinned torch pulls
# a multi-GB CUDA build). When benchmarks/peers/llmcompressor-constraints.txt exists (the pip
# freeze of a venv that worked) every install uses it with -c, so rebuilds get the same versions.
# Idempotent: a stamp file makes a second run a no-op (delete the venv to rebuild).
# Regenerate the constraints after a deliberate upgrade:  REFREEZE=1 bash build_llmcompressor.sh
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv-llmcompressor"
STAMP="$VENV/.installed"
CONSTRAINTS="$HERE/llmcompressor-constraints.txt"
PY="${PY:-python3}"
LLMC_SPEC="${LLMC_SPEC:-llmcompressor==0.14.*}"

if [[ -f "$STAMP" && -z "${REFREEZE:-}" ]]; then
    echo "llm-compressor venv already built: $VENV ($(cat "$STAMP"))"
    exit 0
fi

test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

# torch stays 2.13.0 whatever else is resolved
TORCH_PIN="$(mktemp)"
trap 'rm -f "$TORCH_PIN"' EXIT
echo "torch==2.13.0" > "$TORCH_PIN"
CONS=(-c "$TORCH_PIN")
if [[ -f "$CONSTRAINTS" && -z "${REFREEZE:-}" ]]; then
    CONS+=(-c "$CONSTRAINTS")
fi

"${PIP[@]}" "${CONS[@]}" torch==2.13.0
"${PIP[@]}" "${CONS[@]}" "$LLMC_SPEC"

"$VENV/bin/python" - <<'PY'
import torch, transformers, compressed_tensors, llmcompressor
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
from llmcompressor import oneshot  # noqa: F401
from llmcompressor.modifiers.quantization import GPTQModifier  # noqa: F401
print("torch", torch.__version__, "transformers", transformers.__version__,
      "compressed-tensors", compressed_tensors.__version__, "llmcompressor", llmcompressor.__version__)
PY

if [[ ! -f "$CONSTRAINTS" || -n "${REFREEZE:-}" ]]; then
    {
        echo "# pip freeze of benchmarks/peers/.venv-llmcompressor after a working build"
        echo "# ($(date +%F), $("$VENV/bin/python" -V), torch CPU build); used with -c by build_llmcompressor.sh."
        echo "# Regenerate: REFREEZE=1 bash benchmarks/peers/build_llmcompressor.sh"
        "$VENV/bin/python" -m pip freeze --disable-pip-version-check | sed 's/^torch==.*/torch==2.13.0/'
    } > "$CONSTRAINTS.new"
    mv "$CONSTRAINTS.new" "$CONSTRAINTS"
    echo "wrote $CONSTRAINTS"
fi

"$VENV/bin/python" -c "from importlib.metadata import version as v
print(' '.join(f'{p}=={v(p)}' for p in ('torch', 'transformers', 'compressed-tensors', 'llmcompressor')))" > "$STAMP"
echo "built $VENV ($(cat "$STAMP"))"
