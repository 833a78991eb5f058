#!/usr/bin/env bash
# Build llama.cpp's reference tools (llama-quantize, llama-imatrix, llama-perplexity, llama-bench) and its shared
# library from the source bundled in the llama-cpp-python sdist, so the GGUF checks compare against
# the same llama.cpp that `pip install llama-cpp-python` would compile. The build lives in the cache
# (LLMQUANT_CACHE, default ~/.cache/llmquant), never in the repo; rerunning is a no-op once built.
#
#   bash scripts/build_llama_cpp.sh            # ~10 min on 2 cores the first time
#   then: export LLAMA_CPP_BIN=$(bash scripts/build_llama_cpp.sh --print-bin)
#   and   pip install --no-deps --no-build-isolation llama-cpp-python==$VERSION with CMAKE_ARGS=-DLLAMA_BUILD=OFF
#         plus LLAMA_CPP_LIB_PATH=<bin>/.. /lib to reuse this build from Python (see tests/test_gguf_llama_cpp.py).
set -euo pipefail
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
CACHE=${LLMQUANT_CACHE:-$HOME/.cache/llmquant}
ROOT=$CACHE/llama.cpp-$VERSION
BIN=$ROOT/build/bin
if [[ ${1:-} == --print-bin ]]; then echo "$BIN"; exit 0; fi
if [[ -x $BIN/llama-quantize && -x $BIN/llama-perplexity && -x $BIN/llama-imatrix && -x $BIN/llama-bench ]]; then
  echo "already built: $BIN"; exit 0
fi
mkdir -p "$ROOT"
if [[ ! -f $ROOT/src/CMakeLists.txt ]]; then
  python -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$ROOT/sdist"
  rm -rf "$ROOT/src.tmp" && mkdir -p "$ROOT/src.tmp"
  tar xzf "$ROOT/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$ROOT/src.tmp" --strip-components=3 \
    "llama_cpp_python-$VERSION/vendor/llama.cpp"
  mv "$ROOT/src.tmp" "$ROOT/src"
fi
cmake -S "$ROOT/src" -B "$ROOT/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=ON > "$ROOT/cmake.log"
cmake --build "$ROOT/build" -j "$(nproc)" --target llama-quantize llama-perplexity llama-imatrix llama-bench llama
echo "built: $BIN"
