#!/usr/bin/env bash
# Download the Debian packages that the base image needs for the appliance into build/debs/,
# so that the image build installs them with apt and needs no network:
# - Python 3.11 with venv, and tini as init process, with the dependencies the base image lacks;
# - the newer versions of the base image's own packages that this machine's package lists
#   offer, which include the Debian security suite when the apt configuration names it.
#
# Usage: build/download-debs.sh   (needs the engine and the base image)
# apt resolves dependencies against the base image's own package database, so the folder holds
# exactly the packages the image is missing or has in an older version. The host must run
# Debian bookworm (the release of the base image) with package lists from `apt-get update`.
# A rerun keeps the files that are still current, downloads the rest and deletes stale ones.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

dest="$repo_root/build/debs"
packages=(python3 python3-venv tini)

work_dir="$(mktemp -d)"
trap 'rm -rf "$work_dir"' EXIT
"$docker_cli" run --rm --network none "$APPLIANCE_BASE_IMAGE" cat /var/lib/dpkg/status \
  >"$work_dir/status"

mkdir -p "$dest/partial" "$work_dir/empty/partial"
apt_options=(
  --yes --no-install-recommends
  -o Dir::State::status="$work_dir/status"
  -o Debug::NoLocking=1
)
# File names of both package sets, as apt prints them: 'URI' FILE SIZE HASH. apt leaves out the
# files its archive folder already holds, so this listing uses an empty one.
listing=("${apt_options[@]}" -o Dir::Cache::archives="$work_dir/empty")
{
  apt-get install --print-uris -qq "${listing[@]}" "${packages[@]}"
  apt-get dist-upgrade --print-uris -qq "${listing[@]}"
} >"$work_dir/uris" 2>"$work_dir/apt.log" || {
  tail -n 20 "$work_dir/apt.log" >&2
  echo "apt-get could not resolve ${packages[*]} and the base image's updates;" \
    "run apt-get update and retry" >&2
  exit 1
}
awk '{print $2}' "$work_dir/uris" | sort -u >"$work_dir/wanted"
for file in "$dest"/*.deb; do
  [[ -e "$file" ]] || continue
  grep -qxF "$(basename "$file")" "$work_dir/wanted" || rm -f "$file"
done

download=("${apt_options[@]}" --quiet -o Dir::Cache::archives="$dest")
{
  apt-get install --download-only "${download[@]}" "${packages[@]}"
  apt-get dist-upgrade --download-only "${download[@]}"
} >"$work_dir/apt.log" 2>&1 || {
  tail -n 20 "$work_dir/apt.log" >&2
  echo "apt-get could not download ${packages[*]} and the base image's updates;" \
    "run apt-get update and retry" >&2
  exit 1
}
rm -rf "$dest/partial" "$dest/lock"
updates="$(apt-get dist-upgrade --simulate "${apt_options[@]}" 2>/dev/null | grep -c '^Inst ' || true)"
echo "debs downloaded: count=$(ls "$dest"/*.deb | wc -l) base_updates=$updates" \
  "size=$(du -sh "$dest" | cut -f1)" >&2
