#!/usr/bin/env bash
# bench/first_install.sh: the README's two commands as a newcomer runs them, each in a
# fresh clone of this repository's HEAD with an empty HOME, pip cache and build cache,
# then the second run of each, and `appliance bundle create` of the default model with
# empty caches; a table of each phase's seconds against the goal, and the old way of
# fetching the llama.cpp sdist (pip download --no-binary :all:, capped) as the baseline.
#
#   bench/first_install.sh [--only install|dev|bundle]... [--baseline-cap SECONDS]
#
# As root `./install.sh` is the service install: it runs with --root into the scratch
# folder (the same work, nothing written to /). pip's own configuration (index, find-links,
# cert) is kept: it is how this machine reaches PyPI. Record the load with the figures:
# the machine may be shared (the table prints the load average before and after each run).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
only=()
cap=120
while [ $# -gt 0 ]; do
  case "$1" in
    --only) only+=("$2"); shift ;;
    --baseline-cap) cap=$2; shift ;;
    *) echo "usage: $0 [--only install|dev|bundle]... [--baseline-cap SECONDS]" >&2; exit 2 ;;
  esac
  shift
done
wants() { [ ${#only[@]} = 0 ] || [[ " ${only[*]} " == *" $1 "* ]]; }
scratch=$(mktemp -d "${TMPDIR:-/tmp}/first-install.XXXXXX")
chmod 0755 "$scratch"   # a --root install's readiness check runs as its service user
trap 'rm -rf "$scratch"' EXIT
rows=()
load() { cut -d' ' -f1 /proc/loadavg; }
row() { rows+=("$(printf '%-44s %8s %8s %7s  %s' "$1" "$2" "$3" "$4" "$5")"); }

# fresh NAME: a clone and an empty HOME (pip cache off, build cache under it) for one run.
fresh() {
  local dir="$scratch/$1"
  mkdir -p "$dir/home"
  git clone --quiet "$repo" "$dir/clone"
  echo "$dir"
}

# timed DIR LOG COMMAND...: run in the clone with the fresh HOME; each output line is kept
# with its second; prints the total seconds.
timed() {
  local dir=$1 log=$2 start rc
  shift 2
  start=$EPOCHREALTIME
  set +e
  (cd "$dir/clone" && env -u APPLIANCE_BUILD_CACHE -u XDG_CACHE_HOME HOME="$dir/home" PIP_NO_CACHE_DIR=1 "$@") 2>&1 \
    | while IFS= read -r line; do printf '%s %s\n' "$(elapsed "$start")" "$line"; done >"$log"
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" != 0 ]; then
    tail -n 30 "$log" >&2
    echo "first_install: '$*' failed (exit $rc)" >&2
    exit 1
  fi
  elapsed "$start"
}
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.1f", b - a}'; }

# at LOG PATTERN: the second of the first line matching PATTERN ("" if none).
at() { grep -m1 -E -- "$2" "$1" | cut -d' ' -f1 || true; }
span() { if [ -n "$2" ] && [ -n "$3" ]; then awk -v a="$2" -v b="$3" 'BEGIN {printf "%.1f", b - a}'; else echo -; fi; }
ratio() { if [ "$1" != "-" ]; then awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; else echo -; fi; }

phases() {  # LOG NAME: the install's phases
  local log=$1 name=$2 t0 pip_end fetch build_start build_end model end
  t0=$(at "$log" 'install.sh: installing appliance')
  pip_end=$(at "$log" 'installed the appliance package|Python packages up to date')
  fetch=$(at "$log" 'fetch_sdist: (fetched|.*from the cache)')
  build_start=$(at "$log" 'building llama-server [0-9]')
  build_end=$(at "$log" 'build.sh: built in|using cached build|using the prebuilt')
  model=$(at "$log" 'bundled model')
  end=$(tail -n1 "$log" | cut -d' ' -f1)
  row "  $name: Python packages (venv, pip)" "$(span "" "${t0:-0}" "$pip_end")" "" "" ""
  row "  $name: llama.cpp sdist (plain download)" "$(span "" "$pip_end" "$fetch")" "" "" ""
  row "  $name: llama-server compile" "$(span "" "$build_start" "$build_end")" "" "" \
      "$(grep -o 'building llama-server [^:]*' "$log" | head -n1)"
  row "  $name: image, model, service, check" "$(span "" "$build_end" "$end")" "" "" ""
}

system_args=()
[ "$(id -u)" != 0 ] || system_args=(--root ROOT)

echo "first_install: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), scratch $scratch" >&2
if wants install; then
  dir=$(fresh install)
  args=("${system_args[@]/ROOT/$dir/root}")
  before=$(load)
  total=$(timed "$dir" "$dir/first.log" ./install.sh "${args[@]}")
  row "./install.sh ${args[*]:+--root DIR} (empty caches)" "$total" 480 "$(ratio "$total" 480)" "load $before -> $(load)"
  phases "$dir/first.log" "install"
  again=$(timed "$dir" "$dir/second.log" ./install.sh "${args[@]}")
  same=$(tail -n1 "$dir/second.log" | grep -q 'nothing changed' && echo "nothing changed" || echo "CHANGED SOMETHING")
  row "./install.sh again" "$again" 30 "$(ratio "$again" 30)" "$same"
fi
if wants dev; then
  dir=$(fresh dev)
  before=$(load)
  total=$(timed "$dir" "$dir/first.log" ./install.sh --dev)
  row "./install.sh --dev (empty caches)" "$total" 540 "$(ratio "$total" 540)" "load $before -> $(load)"
  phases "$dir/first.log" "dev"
  again=$(timed "$dir" "$dir/second.log" ./install.sh --dev)
  same=$(tail -n1 "$dir/second.log" | grep -q 'nothing changed' && echo "nothing changed" || echo "CHANGED SOMETHING")
  row "./install.sh --dev again" "$again" 30 "$(ratio "$again" 30)" "$same"
fi
if wants bundle; then
  # The appliance as the dev install left it, then fresh caches for the bundle itself.
  dir=${dir:-}
  if [ -z "$dir" ] || [ ! -x "$dir/clone/.venv/bin/appliance" ]; then
    dir=$(fresh bundle)
    timed "$dir" "$dir/setup.log" ./install.sh --dev >/dev/null
  fi
  rm -rf "$dir/home" && mkdir -p "$dir/home"
  before=$(load)
  total=$(timed "$dir" "$dir/bundle-none.log" .venv/bin/appliance bundle create -o "$dir/none.tar" --prebuilt none)
  row "bundle create --prebuilt none (empty caches)" "$total" 180 "$(ratio "$total" 180)" "load $before -> $(load)"
  before=$(load)
  total=$(timed "$dir" "$dir/bundle.log" .venv/bin/appliance bundle create -o "$dir/native.tar")
  row "bundle create (the install's llama-server)" "$total" 180 "$(ratio "$total" 180)" "load $before -> $(load)"
  before=$(load)
  total=$(timed "$dir" "$dir/bundle-portable.log" .venv/bin/appliance bundle create -o "$dir/portable.tar" \
          --prebuilt portable)
  row "bundle create --prebuilt portable" "$total" 600 "$(ratio "$total" 600)" \
      "compiles it once, then cached; load $before -> $(load)"
fi

# The baseline: how the sdist was fetched before (pip prepares the sdist's metadata, so it
# builds its build requirements from source, CMake first), capped.
base="$scratch/baseline"
mkdir -p "$base/home"
# shellcheck source=../images/llamacpp/pin.env
. "$repo/images/llamacpp/pin.env"
start=$EPOCHREALTIME
rc=0
(cd "$base" && HOME="$base/home" PIP_NO_CACHE_DIR=1 timeout "$cap" python3 -m pip download --quiet --no-deps \
  --no-binary :all: "$LLAMACPP_SDIST_NAME==$LLAMACPP_SDIST_VERSION" -d "$base/dl" >/dev/null 2>&1) || rc=$?
old=$(elapsed "$start")
start=$EPOCHREALTIME
HOME="$base/home" python3 "$repo/images/fetch_sdist.py" "$LLAMACPP_SDIST_NAME" "$LLAMACPP_SDIST_VERSION" \
  "$LLAMACPP_SDIST_SHA256" "$base/new" >/dev/null 2>&1
new=$(elapsed "$start")
row "baseline: pip download --no-binary :all: sdist" "$old" "" "" \
    "$([ "$rc" = 124 ] && echo "killed at the ${cap} s cap, still building" || echo "exit $rc")"
row "images/fetch_sdist.py, same sdist" "$new" "" "$(awk -v a="$old" -v b="$new" 'BEGIN {printf "%.0f", a / b}')x" \
    "faster than the baseline (at least)"

printf '%-44s %8s %8s %7s  %s\n' "phase" "seconds" "goal" "ratio" "note"
printf '%s\n' "${rows[@]}"
