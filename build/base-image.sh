#!/usr/bin/env bash
# Make the base image APPLIANCE_BASE_IMAGE (default debian:bookworm-slim) with debootstrap and
# import it into the engine, for machines that cannot pull from a registry. A site that can
# pull or load the official image skips this step.
#
# Usage: build/base-image.sh   (needs root and the engine from build/engine.sh start)
# The Debian mirror is read from this machine's own apt configuration; DEBIAN_MIRROR overrides it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

if "$docker_cli" image inspect "$APPLIANCE_BASE_IMAGE" >/dev/null 2>&1; then
  echo "base image present: $APPLIANCE_BASE_IMAGE" >&2
  exit 0
fi

mirror="${DEBIAN_MIRROR:-}"
if [[ -z "$mirror" ]]; then
  mirror="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)"
fi
if [[ -z "$mirror" ]]; then
  mirror="$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
fi
if [[ -z "$mirror" ]]; then
  echo "no Debian mirror found in /etc/apt; set DEBIAN_MIRROR to the mirror URL" >&2
  exit 1
fi

work_dir="$(mktemp -d "${APPLIANCE_ENGINE_DIR}/rootfs.XXXXXX")"
trap 'rm -rf "$work_dir"' EXIT
rootfs="$work_dir/rootfs"

echo "debootstrap: suite=bookworm variant=minbase mirror=$mirror" >&2
debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$work_dir/debootstrap.log" 2>&1 || {
  tail -n 20 "$work_dir/debootstrap.log" >&2
  exit 1
}
# Trim what the official slim image also leaves out: package lists, caches, documentation.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*

tar -C "$rootfs" --numeric-owner -c . | "$docker_cli" import - "$APPLIANCE_BASE_IMAGE" >/dev/null
echo "base image imported: $APPLIANCE_BASE_IMAGE" >&2
