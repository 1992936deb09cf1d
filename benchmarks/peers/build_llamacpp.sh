#!/usr/bin/env bash
# Build llama.cpp's Python binding (llama-cpp-python 0.3.36, whose PyPI sdist vendors llama.cpp)
# into its own venv at benchmarks/peers/.venv-llamacpp, for the GGUF cross-checks of issue #13.
#
# The wheel is built once from the sdist (CMAKE_ARGS="-DGGML_NATIVE=OFF": generic x86-64, right
# for correctness checks; NATIVE=1 builds for this CPU, for tokens/s, and keys the cache by the
# CPU's flags) and kept under ~/.cache/slimtune/wheels, so a rebuild of the venv is instant.
# The sdist itself is kept under ~/.cache/slimtune/sdist (it also carries llama.cpp's
# convert_hf_to_gguf.py). torch is not needed here: the venv holds llama-cpp-python and numpy.
# Idempotent: a stamp file makes a second run a no-op (delete the venv to rebuild).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VERSION="0.3.36"
CACHE="${HOME}/.cache/slimtune"
SDIST_DIR="$CACHE/sdist"
SDIST="$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz"
PY="${PY:-python3}"

if [[ -n "${NATIVE:-}" ]]; then
    FLAGS_KEY="native-$(grep -m1 '^flags' /proc/cpuinfo | sha256sum | cut -c1-12)"
    CMAKE="-DGGML_NATIVE=ON"
    VENV="$HERE/.venv-llamacpp-native"
else
    FLAGS_KEY="generic"
    CMAKE="-DGGML_NATIVE=OFF"
    VENV="$HERE/.venv-llamacpp"
fi
WHEELS="$CACHE/wheels/llamacpp-$FLAGS_KEY"
STAMP="$VENV/.installed"

if [[ -f "$STAMP" ]]; then
    echo "llama.cpp venv already built: $VENV ($(cat "$STAMP"))"
    exit 0
fi

mkdir -p "$SDIST_DIR" "$WHEELS"
if [[ ! -f "$SDIST" ]]; then
    "$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
        "llama-cpp-python==$VERSION" -d "$SDIST_DIR"
fi

test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" "numpy==2.4.6" "gguf==0.19.0"

if ! ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $VERSION ($CMAKE): several minutes on 2 cores ..."
    "${PIP[@]}" scikit-build-core ninja
    CMAKE_ARGS="$CMAKE" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        "$VENV/bin/python" -m pip wheel -q --disable-pip-version-check --no-deps \
        "$SDIST" -w "$WHEELS"
fi
"${PIP[@]}" --no-deps "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl
"${PIP[@]}" "typing-extensions" "diskcache" "jinja2"

"$VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
"$VENV/bin/python" -c "import llama_cpp; print(llama_cpp.__version__)" > "$STAMP"
echo "built $VENV (llama-cpp-python $(cat "$STAMP"), $CMAKE)"
