#!/usr/bin/env bash
# Download the Debian packages that the base image lacks for the appliance (Python 3.11 with
# venv, and tini as init process) into build/debs/, so that the image build installs them with
# dpkg and needs no network.
#
# Usage: build/download-debs.sh   (needs the engine and the base image)
# apt resolves dependencies against the base image's own package database, so the folder holds
# exactly the packages the image is missing. The host must run Debian bookworm (the release of
# the base image) with package lists from `apt-get update`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

dest="$repo_root/build/debs"
packages=(python3 python3-venv tini)

work_dir="$(mktemp -d)"
trap 'rm -rf "$work_dir"' EXIT
"$docker_cli" run --rm --network none "$APPLIANCE_BASE_IMAGE" cat /var/lib/dpkg/status \
  >"$work_dir/status"

rm -rf "$dest"
mkdir -p "$dest/partial"
apt-get install --download-only --yes --quiet --no-install-recommends \
  -o Dir::State::status="$work_dir/status" \
  -o Dir::Cache::archives="$dest" \
  -o Debug::NoLocking=1 \
  "${packages[@]}" >"$work_dir/apt.log" 2>&1 || {
    tail -n 20 "$work_dir/apt.log" >&2
    echo "apt-get could not download ${packages[*]}; run apt-get update and retry" >&2
    exit 1
  }
rm -rf "$dest/partial" "$dest/lock"
echo "debs downloaded: count=$(ls "$dest"/*.deb | wc -l) size=$(du -sh "$dest" | cut -f1)" >&2
