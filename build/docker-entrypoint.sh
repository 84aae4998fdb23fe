#!/bin/sh
# Entrypoint of the appliance image.
#
#   train  [ARGS]  ingest the WFDB records in $APPLIANCE_DATA_DIR, train, and publish the ONNX
#                  graphs and manifest as a new version in $APPLIANCE_STORE_DIR
#   serve  [ARGS]  serve the current version of the store over gRPC on $APPLIANCE_PORT
#   run    [ARGS]  train if the store has no current version, then serve (ARGS go to serve);
#                  a training checkpoint left by a stopped run is resumed, not started over
#   report [ARGS]  compute the quality report of the store's current model from the MIT-BIH
#                  records in $APPLIANCE_DATA_DIR and attach it to the store, where
#                  GetQualityReport returns it
#   health         exit 0 when the local gRPC health service reports SERVING
#   anything else  run as a command, e.g. `python -m appliance generate ...`
#
# Extra ARGS are passed to `python -m appliance train|serve|report` unchanged.
# APPLIANCE_TRAIN_MAX_MINUTES and APPLIANCE_TRAIN_EPOCHS, when set, become --max-minutes and
# --epochs of training.
#
# TLS: mount a folder at $APPLIANCE_TLS_DIR (default /tls) with server.crt and server.key;
# client-ca.crt there turns on mutual TLS. The health check reads ca.crt (and, for mutual TLS,
# health-client.crt and health-client.key) from the same folder. It connects to
# APPLIANCE_HEALTH_HOST when set, else to APPLIANCE_HOST, or to 127.0.0.1 when the server listens
# on every interface (0.0.0.0 or ::); the server certificate must name that host.
# Without TLS files the server binds a non-loopback host only when
# APPLIANCE_ALLOW_INSECURE_REMOTE=1 is set.
set -eu

data_dir="${APPLIANCE_DATA_DIR:-/data}"
store_dir="${APPLIANCE_STORE_DIR:-/store}"
host="${APPLIANCE_HOST:-0.0.0.0}"
port="${APPLIANCE_PORT:-50051}"
tls_dir="${APPLIANCE_TLS_DIR:-/tls}"
allow_insecure_remote="${APPLIANCE_ALLOW_INSECURE_REMOTE:-0}"
train_max_minutes="${APPLIANCE_TRAIN_MAX_MINUTES:-}"
train_epochs="${APPLIANCE_TRAIN_EPOCHS:-}"

train() {
  if [ -n "$train_max_minutes" ]; then
    set -- --max-minutes "$train_max_minutes" "$@"
  fi
  if [ -n "$train_epochs" ]; then
    set -- --epochs "$train_epochs" "$@"
  fi
  # On SIGTERM or SIGINT, training saves a checkpoint and exits with 128 plus the signal
  # number; tini -g sends the signal to training as well as to this shell. The shell ignores
  # both meanwhile, so that it ends with training's status instead of before training.
  trap '' TERM INT
  # Without a terminal, training logs a progress line once a minute instead of drawing a bar.
  python -m appliance train --data "$data_dir" --store "$store_dir" "$@"
  # `serve` runs next in `run`, and exec keeps ignored signals ignored.
  trap - TERM INT
}

tls_files_present() {
  [ -f "$tls_dir/server.crt" ] && [ -f "$tls_dir/server.key" ]
}

# Exit with status 2 when serving would expose plain-text gRPC on a non-loopback host.
# `run` calls it before training too, so a wrong setting fails at once, not after training.
reject_plaintext_remote() {
  if tls_files_present || [ "$allow_insecure_remote" = 1 ]; then
    return 0
  fi
  case "$host" in
    127.* | ::1 | localhost) ;;
    *)
      echo "entrypoint: no $tls_dir/server.crt and server.key, so host=$host would serve" \
        "plain-text gRPC; mount TLS files at $tls_dir, or set APPLIANCE_ALLOW_INSECURE_REMOTE=1" \
        "and publish the port on the host's loopback only (-p 127.0.0.1:$port:$port)." \
        "APPLIANCE_HOST=127.0.0.1 serves clients inside the container only." >&2
      exit 2
      ;;
  esac
}

serve() {
  reject_plaintext_remote
  if tls_files_present; then
    set -- --tls-cert "$tls_dir/server.crt" --tls-key "$tls_dir/server.key" "$@"
    if [ -f "$tls_dir/client-ca.crt" ]; then
      set -- --tls-client-ca "$tls_dir/client-ca.crt" "$@"
    fi
  elif [ "$allow_insecure_remote" = 1 ]; then
    set -- --allow-insecure-remote "$@"
  fi
  exec python -m appliance serve --store "$store_dir" --host "$host" --port "$port" "$@"
}

report() {
  exec python -m appliance report --store "$store_dir" --data "$data_dir" --out /tmp/report "$@"
}

# HOST:PORT of the health check, with an IPv6 literal in brackets.
health_address() {
  target="${APPLIANCE_HEALTH_HOST:-$host}"
  case "$target" in
    0.0.0.0 | :: | "[::]") target=127.0.0.1 ;;
  esac
  case "$target" in
    \[*) ;;
    *:*) target="[$target]" ;;
  esac
  printf '%s:%s\n' "$target" "$port"
}

health() {
  if [ -f "$tls_dir/ca.crt" ]; then
    set -- --tls-ca "$tls_dir/ca.crt"
    if [ -f "$tls_dir/health-client.crt" ] && [ -f "$tls_dir/health-client.key" ]; then
      set -- "$@" --tls-cert "$tls_dir/health-client.crt" --tls-key "$tls_dir/health-client.key"
    fi
  fi
  exec python -m appliance health --address "$(health_address)" "$@"
}

command="${1:-run}"
if [ "$#" -gt 0 ]; then
  shift
fi

case "$command" in
  train)
    train "$@"
    ;;
  serve)
    serve "$@"
    ;;
  run)
    reject_plaintext_remote
    if [ ! -f "$store_dir/CURRENT" ]; then
      checkpoint="$store_dir/training/checkpoint.pt"
      if [ -f "$checkpoint" ]; then
        # A run stopped during training (docker stop, a restart policy) left this checkpoint.
        # Training checks that the records and settings match it and fails if they do not.
        echo "entrypoint: store=$store_dir has no current version; resuming training from" \
          "$checkpoint on data=$data_dir" >&2
        train --resume
      else
        echo "entrypoint: store=$store_dir has no current version; training on data=$data_dir" >&2
        train
      fi
    fi
    serve "$@"
    ;;
  report)
    report "$@"
    ;;
  health)
    health
    ;;
  *)
    exec "$command" "$@"
    ;;
esac
