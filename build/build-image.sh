#!/usr/bin/env bash
# Build the appliance image with no network inside the build.
#
# Usage: build/build-image.sh [cpu|gpu]
#   Starts the private engine, makes the base image, brings the Debian packages up to date with
#   this machine's package lists, fetches the wheels of the lock file in build/locks/ and checks
#   their digests, then builds APPLIANCE_IMAGE (default ecg-appliance:cpu, or ecg-appliance:gpu
#   for the gpu variant). The engine keeps running; stop it with build/engine.sh stop.
set -euo pipefail
variant="${1:-cpu}"
if [[ "$variant" == gpu && -z "${APPLIANCE_IMAGE:-}" ]]; then
  export APPLIANCE_IMAGE=ecg-appliance:gpu
fi
build_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$build_dir/env.sh"

case "$variant" in
  cpu) wheels=wheels ;;
  gpu) wheels=wheels-gpu ;;
  *) echo "unknown variant '$variant': expected cpu or gpu" >&2; exit 2 ;;
esac

"$build_dir/engine.sh" start
"$build_dir/base-image.sh"
# The Debian packages follow this machine's package lists, so that a rebuild picks up new
# security updates; files that are still current are kept.
"$build_dir/download-debs.sh"
# The wheels follow the lock file: those already in the folder are checked against their
# digests, and missing or differing ones are downloaded.
"$build_dir/download-wheels.sh" "$variant"

start_s=$(date +%s)
DOCKER_BUILDKIT=1 "$docker_cli" build --network none --progress plain \
  --build-arg "WHEELS=$wheels" -t "$APPLIANCE_IMAGE" "$repo_root"
elapsed_s=$(( $(date +%s) - start_s ))
size_bytes="$("$docker_cli" image inspect --format '{{.Size}}' "$APPLIANCE_IMAGE")"
echo "image built: tag=$APPLIANCE_IMAGE variant=$variant build_s=$elapsed_s" \
  "size_mb=$(( size_bytes / 1000000 ))" >&2
