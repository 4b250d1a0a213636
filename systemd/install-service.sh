# systemd/install-service.sh: the service side of install.sh (sourced by it, not run).
#
# preflight              checks with clear messages: OS, disk space, NVIDIA driver or CPU-only
# install_service_files  the system user, directories, default config, unit
# start_service          systemctl: enabled, started, or restarted once when this run changed it
#                        (returns 1 when systemd could not start it)
# run_as_service         a command as the service user, with the service's directories
# uninstall              the program and unit; with --purge also config, data, logs and user
#
# Uses install.sh's variables: root, prefix, bin_link, etc_dir, unit_file, state_dir,
# cache_dir, log_dir, service, systemd_runs, purge, mode, here, and say/changed/die.
# shellcheck shell=bash

SERVICE_USER=appliance
NVIDIA_PROC=${APPLIANCE_NVIDIA_PROC:-/proc/driver/nvidia}   # a test points this at a fake
MIN_FREE_GIB=${APPLIANCE_MIN_FREE_GIB:-2}

preflight() {
  local os="unknown" where free_kib
  if [ -r /etc/os-release ]; then
    os=$(. /etc/os-release && echo "${PRETTY_NAME:-$ID}")
  fi
  say "preflight: $os, $("$PYTHON" -V 2>&1), $(uname -m)"
  command -v sha256sum >/dev/null || die "sha256sum is missing (Debian: apt-get install coreutils)"
  # Disk: the build cache, the program and the bundled model need about 1 GiB; GPU
  # model weights need their own size on top, under the cache directory.
  if [ "$service" = 1 ]; then where=$cache_dir; else where=${XDG_CACHE_HOME:-$HOME/.cache}; fi
  local probe=$where
  while [ ! -e "$probe" ]; do probe=$(dirname "$probe"); done
  free_kib=$(df -Pk "$probe" | awk 'NR==2 {print $4}')
  if [ "$free_kib" -lt $((MIN_FREE_GIB * 1024 * 1024)) ]; then
    die "only $((free_kib / 1024)) MiB free on the filesystem of $where; the install needs" \
        "${MIN_FREE_GIB} GiB (the engine build, the bundled model), GPU models their weights' size" \
        "on top. Free some space, or set APPLIANCE_MIN_FREE_GIB to accept less."
  fi
  say "preflight: $((free_kib / 1024 / 1024)) GiB free for the cache ($where)"
  if [ -r "$NVIDIA_PROC/version" ]; then
    local version gpus
    version=$(sed -n 's/.*Kernel Module[^0-9]*\([0-9][0-9.]*\).*/\1/p' "$NVIDIA_PROC/version" | head -n1)
    gpus=$(find "$NVIDIA_PROC/gpus" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    say "preflight: NVIDIA driver ${version:-(version unknown)}, $gpus GPU(s): GPU engines (vllm, sglang) can be placed"
  else
    say "preflight: no NVIDIA driver ($NVIDIA_PROC/version missing): CPU-only mode, the llama.cpp" \
        "engine serves; GPU models (vllm, sglang) are not placed until the driver is installed"
  fi
}

_user_exists() {
  if [ -n "$root" ]; then grep -q "^$SERVICE_USER:" "$root/etc/passwd" 2>/dev/null
  else getent passwd "$SERVICE_USER" >/dev/null; fi
}

_owner() {  # uid:gid of the service user (numeric: with --root it exists only in DIR/etc/passwd)
  if [ "$(id -u)" != 0 ]; then echo "$(id -u):$(id -g)"; return; fi
  awk -F: -v u="$SERVICE_USER" '$1 == u {print $3 ":" $4}' "$root/etc/passwd"
}

_ensure_dir() {  # path mode uid:gid
  local path=$1 mode=$2 owner=$3 now
  [ "$(id -u)" = 0 ] || owner="$(id -u):$(id -g)"
  if [ ! -d "$path" ]; then
    install -d -m "$mode" -o "${owner%:*}" -g "${owner#*:}" "$path"
    changed "created $path (mode $mode, owner $owner)"
    return
  fi
  now=$(stat -c '%a %u:%g' "$path")
  if [ "$now" != "${mode#0} $owner" ]; then
    chmod "$mode" "$path"
    chown "$owner" "$path"
    changed "set $path to mode $mode, owner $owner (was $now)"
  fi
}

_ensure_file() {  # source destination mode: install or update, say which
  if cmp -s "$1" "$2"; then
    say "$2 up to date"
    return 1
  fi
  local verb=installed
  [ -e "$2" ] && verb=updated
  install -D -m "$3" "$1" "$2"
  changed "$verb $2"
}

# What the appliance's own commands get to run as the service would: its config, and the
# directories systemd gives it (under --root, those inside DIR).
config_args=()
if [ "$service" = 1 ]; then config_args=(--config "$etc_dir/appliance.toml"); fi

run_as_service() {  # command...: as the service user where there is one
  if [ "$service" = 0 ]; then
    "$@"
    return
  fi
  local ids
  ids=$(_owner)
  if [ "$(id -u)" = 0 ] && [ "${ids%:*}" != 0 ]; then
    env HOME="$state_dir" STATE_DIRECTORY="$state_dir" CACHE_DIRECTORY="$cache_dir" LOGS_DIRECTORY="$log_dir"       setpriv --reuid="${ids%:*}" --regid="${ids#*:}" --clear-groups -- "$@"
  else
    env STATE_DIRECTORY="$state_dir" CACHE_DIRECTORY="$cache_dir" LOGS_DIRECTORY="$log_dir" "$@"
  fi
}

share_with_service() {  # dir: readable by the service user (a bundle being imported)
  [ "$service" = 1 ] && [ "$(id -u)" = 0 ] || return 0
  local ids
  ids=$(_owner)
  if [ "$1" = "${bundle_tmp:-}" ]; then
    chgrp -R "${ids#*:}" "$1" && chmod -R g+rX,o-rwx "$1"
  elif ! run_as_service test -r "$1/bundle.json" -a -x "$1/models"; then
    die "the service user $SERVICE_USER cannot read the bundle in $1: unpack it where it can, or pass" \
        "the .tar to --offline"
  fi
}

install_service_files() {
  local owner
  # The user the daemon runs as; no login, home in its state directory.
  if _user_exists; then
    say "system user $SERVICE_USER up to date"
  else
    mkdir -p "$root/etc"
    if command -v systemd-sysusers >/dev/null; then
      systemd-sysusers ${root:+--root "$root"} "$here/systemd/appliance.sysusers" >/dev/null
    else
      useradd --system --user-group --home-dir /var/lib/appliance --no-create-home \
        --shell /usr/sbin/nologin ${root:+--prefix "$root"} "$SERVICE_USER"
    fi
    changed "created system user $SERVICE_USER"
  fi
  owner=$(_owner)
  # Directories: config (root's, read-only to the daemon), credentials (root only:
  # systemd reads them for LoadCredential=), state, cache (models), logs.
  _ensure_dir "$etc_dir" 0755 0:0
  _ensure_dir "$etc_dir/credentials" 0700 0:0
  _ensure_dir "$state_dir" 0750 "$owner"
  _ensure_dir "$cache_dir" 0750 "$owner"
  _ensure_dir "$log_dir" 0750 "$owner"
  if [ -e "$etc_dir/appliance.toml" ]; then
    say "kept $etc_dir/appliance.toml (an existing config is never overwritten)"
  else
    install -m 0644 "$here/appliance.example.toml" "$etc_dir/appliance.toml"
    changed "installed the default config $etc_dir/appliance.toml (edit it, then restart the service)"
  fi
  if _ensure_file "$here/systemd/appliance.service" "$unit_file" 0644 && [ "$systemd_runs" = 1 ]; then
    systemctl daemon-reload
    changed "reloaded systemd's units"
  fi
}

start_service() {
  if [ "$systemd_runs" = 1 ]; then
    if systemctl is-enabled --quiet appliance.service; then
      say "appliance.service enabled"
    else
      systemctl enable --quiet appliance.service
      changed "enabled appliance.service (starts at boot)"
    fi
    if ! systemctl is-active --quiet appliance.service; then
      systemctl start appliance.service || return 1
      changed "started appliance.service"
    elif [ "$changes" -gt 0 ]; then
      systemctl restart appliance.service || return 1
      changed "restarted appliance.service (this run changed it)"
    else
      say "appliance.service running"
    fi
    say "done: systemctl status appliance; appliance logs; API on http://127.0.0.1:8000/v1"
  elif [ -n "$root" ]; then
    say "done: installed under $root; systemd is not asked to do anything for a --root install"
  else
    say "systemd is not running here (a container?); run the daemon by hand as its user:"
    say "  runuser -u $SERVICE_USER -- env STATE_DIRECTORY=/var/lib/appliance" \
        "CACHE_DIRECTORY=/var/cache/appliance LOGS_DIRECTORY=/var/log/appliance" \
        "/opt/appliance/venv/bin/appliance serve"
  fi
}

_remove() {  # path what
  if [ -e "$1" ] || [ -L "$1" ]; then
    rm -rf -- "$1"
    changed "removed $2 $1"
  fi
}

uninstall() {
  [ "$mode" = system ] || die "--uninstall is for installs; a --dev checkout is removed with rm -rf .venv"
  if [ "$systemd_runs" = 1 ] && [ "$service" = 1 ] && [ -e "$unit_file" ]; then
    if systemctl is-enabled --quiet appliance.service || systemctl is-active --quiet appliance.service; then
      systemctl disable --now --quiet appliance.service
      changed "stopped and disabled appliance.service"
    fi
  fi
  if [ "$service" = 1 ]; then
    _remove "$unit_file" "the unit"
    [ "$systemd_runs" = 0 ] || systemctl daemon-reload
  fi
  if [ -L "$bin_link" ] && [ "$(readlink "$bin_link")" = "$prefix/bin/appliance" ]; then
    _remove "$bin_link" "the link"
  fi
  _remove "$prefix" "the program"
  if [ "$service" = 1 ]; then
    # /opt/appliance also holds the versions and the engine images (images/vllm, images/sglang).
    _remove "$(dirname "$prefix")" "the program directory"
  else
    _remove "$versions_dir" "the program's versions"
    _remove "$program_root/previous" "the link to the previous version"
    _remove "$program_root/images" "the engine images"
    rmdir "$(dirname "$prefix")" 2>/dev/null || true
  fi
  local data
  if [ "$service" = 1 ]; then
    data=("$etc_dir" "$state_dir" "$cache_dir" "$log_dir")
  else
    data=("${XDG_STATE_HOME:-$HOME/.local/state}/appliance" "${XDG_CACHE_HOME:-$HOME/.cache}/appliance")
  fi
  if [ "$purge" = 1 ]; then
    local d
    for d in "${data[@]}"; do _remove "$d" "(purge)"; done
    if [ "$service" = 1 ] && _user_exists; then
      userdel ${root:+--prefix "$root"} "$SERVICE_USER" 2>/dev/null || true
      if [ -n "$root" ]; then
        if grep -q "^$SERVICE_USER:" "$root/etc/group"; then groupdel --prefix "$root" "$SERVICE_USER"; fi
      elif getent group "$SERVICE_USER" >/dev/null; then
        groupdel "$SERVICE_USER"
      fi
      changed "removed system user $SERVICE_USER"
    fi
  else
    local kept=() d
    for d in "${data[@]}"; do [ -e "$d" ] && kept+=("$d"); done
    if [ "$service" = 1 ] && _user_exists; then kept+=("user $SERVICE_USER"); fi
    if [ "${#kept[@]}" -gt 0 ]; then
      say "kept $(printf '%s, ' "${kept[@]}" | sed 's/, $//') (--purge removes them)"
    fi
  fi
  summary
}

dev_tools() {
  # The unit's tests run systemd-analyze (Debian's systemd package; it needs no
  # running systemd and does not replace the container's init).
  command -v systemd-analyze >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends systemd >/dev/null \
      || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends systemd >/dev/null; } \
      || die "apt-get could not install systemd (for systemd-analyze in the tests)"
    changed "installed Debian's systemd package (systemd-analyze, for the unit's tests)"
  else
    say "note: systemd-analyze is missing (Debian: apt-get install systemd); the unit's tests will skip"
  fi
}

summary() {
  if [ "$changes" = 0 ]; then say "nothing changed"; else say "$changes change(s)"; fi
}
