#!/bin/sh
# Entrypoint of the appliance image.
#
#   train  [ARGS]  ingest the WFDB records in $APPLIANCE_DATA_DIR, train, and publish the ONNX
#                  graphs and manifest as a new version in $APPLIANCE_STORE_DIR
#   serve  [ARGS]  serve the current version of the store over gRPC on $APPLIANCE_PORT
#   run    [ARGS]  train if the store has no current version, then serve (ARGS go to serve)
#   health         exit 0 when the local gRPC health service reports SERVING
#   anything else  run as a command, e.g. `python -m appliance generate ...`
#
# Extra ARGS are passed to `python -m appliance train|serve` unchanged.
set -eu

data_dir="${APPLIANCE_DATA_DIR:-/data}"
store_dir="${APPLIANCE_STORE_DIR:-/store}"
host="${APPLIANCE_HOST:-0.0.0.0}"
port="${APPLIANCE_PORT:-50051}"
train_max_minutes="${APPLIANCE_TRAIN_MAX_MINUTES:-}"

train() {
  if [ -n "$train_max_minutes" ]; then
    set -- --max-minutes "$train_max_minutes" "$@"
  fi
  python -m appliance train --data "$data_dir" --store "$store_dir" "$@"
}

serve() {
  exec python -m appliance serve --store "$store_dir" --host "$host" --port "$port" "$@"
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
    if [ ! -f "$store_dir/CURRENT" ]; then
      echo "entrypoint: store=$store_dir has no current version; training on data=$data_dir" >&2
      train
    fi
    serve "$@"
    ;;
  health)
    exec python -m appliance health --address "127.0.0.1:$port"
    ;;
  *)
    exec "$command" "$@"
    ;;
esac
