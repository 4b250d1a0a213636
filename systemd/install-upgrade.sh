# systemd/install-upgrade.sh: versions, upgrades and rollback for install.sh (sourced by it).
#
# The program is one virtual environment per version, the current one linked:
#
#   <root>/versions/<version>-<source hash>/   a venv (bin/appliance, bin/llama-server, share/appliance/)
#   <root>/venv -> versions/<current>          what the unit's ExecStart and the command link run
#   <root>/previous -> versions/<previous>     kept for --rollback (one)
#   <root>/images/                             engine images, shared by every version
#                                              (each versions/*/images links to it)
#
# (<root> is /opt/appliance for root, ~/.local/share/appliance for a user, the folder of
# APPLIANCE_PREFIX otherwise.) An upgrade builds the new version beside the current one,
# copies the databases whose schema it will migrate (state_dir/pre-upgrade/), switches the
# link, and checks the new version; `rollback` switches back and, where the new version
# had migrated a database, puts the copy back (the migrated file is kept beside it).
#
# Uses install.sh's variables: prefix, program_root, versions_dir, state_dir, cache_dir,
# service, systemd_runs, root, PYTHON and say/changed/die; run_as_service is install.sh's.
# shellcheck shell=bash

current_version_dir() {  # the version folder prefix links to ("" when none, or a broken link)
  if [ -L "$prefix" ] && [ -x "$prefix/bin/appliance" ]; then readlink -f "$prefix"; fi
}

version_of() {  # the appliance version a program folder holds
  "$1/bin/python" -I -c 'from importlib.metadata import version; print(version("appliance"))' 2>/dev/null \
    || echo unknown
}

link_atomically() {  # link target: make link point at target, in one rename
  ln -sfn "$2" "$1.tmp.$$"
  mv -T "$1.tmp.$$" "$1"
}

# An install from before versions (prefix a real venv): moved under versions/ and linked,
# its engine images moved to the shared folder. Paths inside it keep working: its scripts
# name <prefix>/bin/python, which the link resolves while it is the current version.
adopt_unversioned_install() {
  [ -d "$prefix" ] && [ ! -L "$prefix" ] || return 0
  [ -x "$prefix/bin/python" ] || { rm -rf "$prefix"; return 0; }  # a venv never finished
  local name
  name="$(version_of "$prefix")-$(cut -c1-12 "$prefix/.appliance-installed" 2>/dev/null || echo unversioned)"
  mkdir -p "$versions_dir"
  [ ! -e "$versions_dir/$name" ] || name="$name-$$"
  mv "$prefix" "$versions_dir/$name"
  link_atomically "$prefix" "versions/$name"
  if [ -d "$versions_dir/$name/images" ] && [ ! -L "$versions_dir/$name/images" ]; then
    if [ -e "$program_root/images" ]; then
      cp -a "$versions_dir/$name/images/." "$program_root/images/" && rm -rf "$versions_dir/$name/images"
    else
      mv "$versions_dir/$name/images" "$program_root/images"
    fi
  fi
  mkdir -p "$program_root/images"
  ln -sfn ../../images "$versions_dir/$name/images"
  changed "moved the installed version ($name) to $versions_dir/ (kept for --rollback)"
}

# The databases the new version will migrate: copied first (sqlite's online backup: a
# consistent copy while the daemon runs) into state_dir/pre-upgrade/, with the version they
# were taken for. A disk without room for the copies stops the upgrade before anything changed.
backup_databases() {  # new_program_dir from_version
  local new=$1 from=$2 backups="$state_dir/pre-upgrade"
  [ -f "$state_dir/appliance.db" ] || [ -f "$cache_dir/store.db" ] || return 0
  # -I: that version's modules, not a checkout's that happens to be the working directory.
  run_as_service "$new/bin/python" -I - "$state_dir/appliance.db" "$cache_dir/store.db" "$backups" "$from" <<'PY'
import os, shutil, sqlite3, sys
from pathlib import Path
from appliance.state import db as statedb
from appliance.store import store
from appliance.state.migrations import schema_version

state_db, store_db, backups, from_version = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
todo = [(p, r) for p, r in ((state_db, statedb.MIGRATIONS), (store_db, store.MIGRATIONS))
        if p.is_file() and schema_version(p) < r.latest]
if not todo:
    sys.exit(0)
need = sum(p.stat().st_size for p, _ in todo) * 1.1 + (1 << 20)
free = shutil.disk_usage(backups.parent).free
if free < need:
    sys.exit(f"only {free >> 20} MiB free on the filesystem of {backups.parent}; the copies of "
             f"{', '.join(str(p) for p, _ in todo)} taken before their schema changes need {int(need) >> 20} MiB: "
             "free some space and run install.sh again (nothing was changed)")
tmp = backups.with_name("pre-upgrade.tmp")
shutil.rmtree(tmp, ignore_errors=True)
tmp.mkdir(mode=0o750)
for path, _ in todo:
    src, dst = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True), sqlite3.connect(tmp / path.name)
    with dst:
        src.backup(dst)
    src.close(), dst.close()
    print(f"copied {path} (schema {schema_version(path)}) to {backups / path.name}")
(tmp / "FROM_VERSION").write_text(from_version + "\n")
shutil.rmtree(backups, ignore_errors=True)
os.replace(tmp, backups)
PY
}

# Back to the version previous links to; the databases' pre-upgrade copies are put back if
# the version being left had migrated them (the migrated files are kept, renamed).
rollback() {
  local prev cur prev_version cur_version
  prev=$(readlink "$program_root/previous" 2>/dev/null || true)
  [ -n "$prev" ] && [ -x "$program_root/$prev/bin/appliance" ] \
    || die "no previous version to roll back to ($program_root/previous is missing)"
  cur=$(readlink "$prefix" 2>/dev/null || true)
  prev_version=$(version_of "$program_root/$prev")
  cur_version=$(version_of "$prefix")
  service_ctl stop
  link_atomically "$prefix" "$prev"
  [ -z "$cur" ] || link_atomically "$program_root/previous" "$cur"
  changed "rolled back: $prefix -> $prev (appliance $prev_version); ${cur:-the version left} (appliance $cur_version)" \
          "is kept as the previous one"
  restore_databases "$prev_version"
  service_ctl start
}

# Only where the version rolled back to refuses them (its `appliance check` says a database
# is from a newer appliance): an older one that reads the migrated files keeps every row.
restore_databases() {  # version_rolled_back_to
  local backups="$state_dir/pre-upgrade" db live stamp verdict
  [ -f "$backups/FROM_VERSION" ] && [ "$(cat "$backups/FROM_VERSION")" = "$1" ] || return 0
  verdict=$(run_as_service "$prefix/bin/appliance" check "${config_args[@]}" 2>&1 || true)
  case "$verdict" in *"written by a newer appliance"*) ;; *) return 0 ;; esac
  stamp=$(date +%Y%m%dT%H%M%S)
  for db in "$backups"/*.db; do
    [ -f "$db" ] || continue
    case "$(basename "$db")" in appliance.db) live="$state_dir/appliance.db" ;; *) live="$cache_dir/$(basename "$db")" ;; esac
    [ -f "$live" ] || continue
    if [ "$(schema_of "$live")" = "$(schema_of "$db")" ]; then continue; fi
    mv "$live" "$live.migrated-$stamp"
    for side in -wal -shm; do [ ! -e "$live$side" ] || mv "$live$side" "$live.migrated-$stamp$side"; done
    cp -p "$db" "$live"
    changed "put back $live as it was before the upgrade (the migrated one is kept as $live.migrated-$stamp)"
  done
}

schema_of() {  # a database's PRAGMA user_version, read from its header
  od -An -tu1 -j60 -N4 "$1" | awk '{print ($1 * 16777216) + ($2 * 65536) + ($3 * 256) + $4}'
}

service_ctl() {  # start|stop the service where systemd runs it
  [ "$systemd_runs" = 1 ] && [ "$service" = 1 ] || return 0
  if [ "$1" = stop ]; then systemctl stop appliance.service || true
  else systemctl start appliance.service && say "started appliance.service"; fi
}

# Versions other than the current and the previous one go.
prune_versions() {
  local keep_cur keep_prev dir
  keep_cur=$(readlink "$prefix" 2>/dev/null || true)
  keep_prev=$(readlink "$program_root/previous" 2>/dev/null || true)
  for dir in "$versions_dir"/*/; do
    dir=${dir%/}
    case "versions/$(basename "$dir")" in "$keep_cur"|"$keep_prev") continue ;; esac
    rm -rf "$dir"
    changed "removed the old version $dir"
  done
}

# A venv at dir with the pip specs installed. pip's output goes to a log, shown when it
# fails; a half-made version folder is removed (never --dev's .venv); a full disk is said so.
install_program() {  # dir spec...
  local dir=$1 log
  shift
  log=$(mktemp "${TMPDIR:-/tmp}/appliance-pip.XXXXXX")
  if [ ! -x "$dir/bin/python" ]; then
    { "$PYTHON" -m venv "$dir" && "$dir/bin/python" -m pip install --quiet --upgrade pip; } >"$log" 2>&1 \
      || program_failed "$dir" "$log" "creating the virtual environment"
  fi
  say "installing the appliance package with pip into $dir"
  heartbeat "installing the appliance package" "$log" \
    "$dir/bin/python" -m pip install --quiet --disable-pip-version-check --prefer-binary "$@" \
    || program_failed "$dir" "$log" "installing the appliance package"
  grep -v "^WARNING: Location '.*' is ignored" "$log" | grep -i "warning\|error" | sed 's/^/install.sh: pip: /' || true
  rm -f "$log"
}

# Runs the command, its output appended to log; while it runs, a line every
# $APPLIANCE_PROGRESS_S (30) s says it still does (pip from empty caches takes minutes,
# with nothing to show). Its status is returned.
heartbeat() {  # what log command...
  local what=$1 log=$2 start pid rc=0
  shift 2
  start=$(date +%s)
  "$@" >>"$log" 2>&1 &
  pid=$!
  while ! wait_for "$pid" "${APPLIANCE_PROGRESS_S:-30}"; do
    say "$what: $(( $(date +%s) - start ))s elapsed"
  done
  wait "$pid" || rc=$?
  return "$rc"
}

wait_for() {  # pid seconds: true once pid has exited, false after seconds
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 0.1
  done
  ! kill -0 "$1" 2>/dev/null
}

program_failed() {  # dir log what
  local kept="nothing was installed" mountpoint free_kib
  [ -z "$(current_version_dir)" ] || kept="the installed version ($(version_of "$prefix")) is unchanged"
  # Measured before the half-made folder goes: venv does not repeat ensurepip's ENOSPC.
  free_kib=$(df -Pk "$(dirname "$1")" | awk 'NR==2 {print $4}')
  [ "$mode" = dev ] || rm -rf "$1"
  if grep -q "No space left on device" "$2" || [ "$free_kib" -lt 65536 ]; then
    rm -f "$2"
    mountpoint=$(df -P "$(dirname "$1")" | awk 'NR==2 {print $6}')
    die "disk full while $3 into $1: free some space on $mountpoint and run install.sh again; $kept"
  fi
  tail -n 20 "$2" >&2
  rm -f "$2"
  die "$3 into $1 failed (pip's last lines above); $kept"
}

# What a later install.sh --rollback and `appliance bundle create` (run from the installed
# program, no checkout) need: this installer, in <version>/share/appliance/installer/.
# Whether dest holds this installer already (compared in place: a scratch copy beside it
# would touch its parent folder, and a second install must change nothing).
installer_current() {  # dest
  local dest=$1 f
  [ "$(readlink "$dest/images" 2>/dev/null)" = ../images ] || return 1
  for f in install.sh pyproject.toml appliance.example.toml; do cmp -s "$here/$f" "$dest/$f" || return 1; done
  for f in "$here"/systemd/*; do cmp -s "$f" "$dest/systemd/${f##*/}" || return 1; done
  [ "$(ls -A "$dest/systemd" | wc -l)" = "$(ls -A "$here/systemd" | wc -l)" ]
}

install_installer() {  # program_dir
  local dest="$1/share/appliance/installer" tmp f
  installer_current "$dest" && return
  tmp="$dest.tmp.$$"
  rm -rf "$tmp" && mkdir -p "$tmp/systemd"
  for f in install.sh pyproject.toml appliance.example.toml; do cp -p "$here/$f" "$tmp/$f"; done
  cp -p "$here"/systemd/* "$tmp/systemd/"
  ln -s ../images "$tmp/images"
  rm -rf "$dest" && mv "$tmp" "$dest"
  changed "copied the installer to $dest (install.sh --rollback, bundle create)"
}

# A step after the switch failed: back to the version that was current, then stop.
fail_upgrade() {  # message
  if [ -n "${switched_from:-}" ]; then
    say "$1"
    rollback
    die "$1; rolled back to appliance $(version_of "$prefix") (as install.sh --rollback does)"
  fi
  die "$1"
}
