#!/usr/bin/env bash
# Start or stop a private Docker engine whose state lives under APPLIANCE_ENGINE_DIR.
#
# Usage: build/engine.sh install|start|stop|status
#   install: apt-get install the Debian engine (docker.io) and debootstrap if missing.
#   start:   run dockerd in the background with no bridge, no iptables and no IP forwarding,
#            so the host's network settings stay untouched; wait until it answers.
#   stop:    remove every container of this engine, then stop dockerd by its pid file.
# Source build/env.sh afterwards (or export DOCKER_HOST as it does) to talk to this engine.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

engine_dir="$APPLIANCE_ENGINE_DIR"
pid_file="$engine_dir/dockerd.pid"
log_file="$engine_dir/dockerd.log"
start_timeout_s=60

install_packages() {
  if [[ -x /usr/sbin/dockerd && -x /usr/sbin/debootstrap && -x /usr/bin/docker ]]; then
    return
  fi
  if [[ $(id -u) -ne 0 ]]; then
    echo "docker.io and debootstrap are missing and installing them needs root" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends docker.io debootstrap >/dev/null
}

is_running() {
  [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null
}

start_engine() {
  install_packages
  if is_running; then
    echo "engine already running: pid=$(cat "$pid_file") host=$DOCKER_HOST" >&2
    return
  fi
  mkdir -p "$engine_dir"
  # setsid detaches dockerd from the caller's process group, so a Ctrl-C in make does not
  # kill it before the stop step runs.
  setsid /usr/sbin/dockerd \
    --data-root "$engine_dir/docker" \
    --exec-root "$engine_dir/exec" \
    --pidfile "$pid_file" \
    -H "$DOCKER_HOST" \
    --iptables=false --ip6tables=false --bridge=none --ip-forward=false --ip-masq=false \
    >"$log_file" 2>&1 </dev/null &
  local waited_s=0
  until "$docker_cli" info >/dev/null 2>&1; do
    if (( waited_s >= start_timeout_s )); then
      echo "dockerd did not answer within ${start_timeout_s} s; log: $log_file" >&2
      tail -n 20 "$log_file" >&2 || true
      exit 1
    fi
    sleep 1
    waited_s=$((waited_s + 1))
  done
  echo "engine started: pid=$(cat "$pid_file") host=$DOCKER_HOST waited_s=$waited_s" >&2
}

stop_engine() {
  if ! is_running; then
    echo "engine not running: dir=$engine_dir" >&2
    return
  fi
  local containers
  containers="$("$docker_cli" ps -aq 2>/dev/null || true)"
  if [[ -n "$containers" ]]; then
    # shellcheck disable=SC2086
    "$docker_cli" rm -f $containers >/dev/null 2>&1 || true
  fi
  local pid
  pid="$(cat "$pid_file")"
  kill "$pid"
  for _ in $(seq 1 30); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "dockerd pid=$pid still running after 30 s; sending SIGKILL" >&2
    kill -9 "$pid" || true
  fi
  echo "engine stopped: pid=$pid" >&2
}

case "${1:-}" in
  install) install_packages ;;
  start) start_engine ;;
  stop) stop_engine ;;
  status) if is_running; then echo "running pid=$(cat "$pid_file")"; else echo "stopped"; exit 1; fi ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
