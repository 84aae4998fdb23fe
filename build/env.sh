# Shared settings of the image scripts; sourced, not run.
# Every path can be overridden from the environment.

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export APPLIANCE_ENGINE_DIR="${APPLIANCE_ENGINE_DIR:-/tmp/appliance-engine}"
export APPLIANCE_IMAGE="${APPLIANCE_IMAGE:-ecg-appliance:cpu}"
export APPLIANCE_BASE_IMAGE="${APPLIANCE_BASE_IMAGE:-debian:bookworm-slim}"
# A private daemon socket, so the scripts never touch an engine the machine already runs.
export DOCKER_HOST="${DOCKER_HOST:-unix://${APPLIANCE_ENGINE_DIR}/docker.sock}"
# Debian's 20.10 client: it drives BuildKit, which the Dockerfile needs for RUN --mount.
docker_cli="${DOCKER_CLI:-/usr/bin/docker}"
