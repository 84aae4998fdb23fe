#!/usr/bin/env bash
# Download every Python wheel the image needs into build/wheels/, so that the image build
# installs with `pip install --no-index` and needs no network (the same step works on an
# air-gapped site that receives the folder).
#
# Usage: build/download-wheels.sh [--lock | --check | --print-requirements] [cpu|gpu]
#   cpu (default): CPU build of torch and onnxruntime.
#   gpu: CUDA build of torch (its CUDA libraries come as nvidia-* wheels) and onnxruntime-gpu,
#        into build/wheels-gpu/.
#   (no option): fetch exactly the wheels of the variant's lock file, build/locks/wheels.txt or
#        build/locks/wheels-gpu.txt, and check each against its SHA-256 digest there. Wheels
#        already in the folder are checked without network. Without a lock file it locks first.
#   --lock: resolve the requirements of pyproject.toml and the variant anew, download them into
#        an empty folder and write the lock file from what was downloaded. Commit the lock file.
#   --check: check the folder against the lock file without network; exit 1 on a missing
#        wheel or a digest that differs.
#   --print-requirements: print the requirements this variant resolves and download nothing.
#
# The wheels target CPython 3.11 on x86-64 glibc, the Python of Debian bookworm, whatever
# Python runs this script. PYTHON selects the interpreter that runs pip (default python3).
# WHEELS_DIR and WHEELS_LOCK replace the wheel folder and the lock file, for example in tests.
set -euo pipefail

mode=fetch
case "${1:-}" in
  --lock) mode=lock; shift ;;
  --check) mode=check; shift ;;
  --print-requirements) mode=print; shift ;;
esac
variant="${1:-cpu}"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
torch_version="2.13.0"

case "$variant" in
  cpu) folder=wheels ;;
  gpu) folder=wheels-gpu ;;
  *) echo "unknown variant '$variant': expected cpu or gpu" >&2; exit 2 ;;
esac
dest="${WHEELS_DIR:-$repo_root/build/$folder}"
# The Dockerfile installs exactly the lines of this file, with pip --require-hashes.
lock="${WHEELS_LOCK:-$repo_root/build/locks/$folder.txt}"

# Runtime dependencies come from pyproject.toml so that the image and the development
# environment list the same packages. torch and onnxruntime are replaced per variant. The
# `quality` extra is included, so that the quality report runs inside the sealed container.
mapfile -t runtime_deps < <(
  "$python" - "$repo_root/pyproject.toml" <<'PY'
import sys
import tomllib

with open(sys.argv[1], "rb") as handle:
    project = tomllib.load(handle)["project"]
requirements = project["dependencies"] + project["optional-dependencies"]["quality"]
for requirement in requirements:
    name = requirement.split(";")[0].strip()
    if not name.lower().startswith(("torch", "onnxruntime")):
        print(name)
PY
)

# grpcio-tools generates the gRPC code and setuptools builds the package; both are used in the
# build stage only and never reach the runtime stage.
build_deps=("grpcio-tools>=1.66" "setuptools>=68" "wheel")

if [[ "$variant" == cpu ]]; then
  variant_deps=("torch==${torch_version}" "onnxruntime>=1.20")
else
  # The extras make onnxruntime-gpu pull the CUDA and cuDNN wheels its CUDA provider links
  # against, instead of relying on the ones that torch happens to require.
  variant_deps=("torch==${torch_version}" "onnxruntime-gpu[cuda,cudnn]>=1.20")
fi

requirements=("${runtime_deps[@]}" "${variant_deps[@]}" "${build_deps[@]}")
if [[ "$mode" == print ]]; then
  printf '%s\n' "${requirements[@]}"
  exit 0
fi

target=(
  --only-binary=:all:
  --implementation cp
  --python-version 3.11
  --abi cp311
)
# Every manylinux tag that bookworm's glibc 2.36 runs, newest first (pip prefers the tags in
# the order given). The nvidia-* wheels of the CUDA build use tags such as manylinux_2_18,
# which a short list of common tags misses.
glibc_minor_max=36
for (( minor = glibc_minor_max; minor >= 5; minor-- )); do
  target+=(--platform "manylinux_2_${minor}_x86_64")
done
target+=(
  --platform manylinux2014_x86_64
  --platform manylinux2010_x86_64
  --platform manylinux1_x86_64
  --platform linux_x86_64
)

# Requirement lines recorded in the lock file's header, to tell when pyproject.toml changed.
locked_requirements() {
  sed -n 's/^# requirement: //p' "$lock"
}

# File name and SHA-256 digest of each locked wheel, one pair per line.
lock_entries() {
  awk '/^# file: / { file = $3; next }
       file != "" && /--hash=sha256:/ { sub(/.*--hash=sha256:/, ""); print file, $0; file = "" }' \
    "$lock"
}

# Check every locked wheel of the folder against its digest, without network. With "delete",
# a wheel whose digest differs is deleted, so that a download fetches it again.
check_folder() {
  local file digest status=0
  while read -r file digest; do
    if [[ ! -f "$dest/$file" ]]; then
      echo "missing wheel: $file" >&2
      status=1
    elif [[ "$(sha256sum "$dest/$file" | cut -d' ' -f1)" != "$digest" ]]; then
      echo "wheel digest differs from the lock: $file" >&2
      status=1
      if [[ "${1:-}" == delete ]]; then
        rm -f "$dest/$file"
      fi
    fi
  done < <(lock_entries)
  return "$status"
}

# Delete the wheels of the folder that the lock file does not name.
remove_unlocked() {
  local wheel
  for wheel in "$dest"/*.whl; do
    [[ -e "$wheel" ]] || continue
    grep -qF "# file: $(basename "$wheel")" "$lock" || rm -f "$wheel"
  done
  # Requirement lists that older versions of this script wrote beside the wheels.
  rm -f "$dest/requirements.txt" "$dest/build-requirements.txt"
}

if [[ "$mode" == check ]]; then
  [[ -f "$lock" ]] || { echo "no lock file $lock" >&2; exit 1; }
  if check_folder; then
    echo "wheels match the lock: variant=$variant folder=$dest" >&2
    exit 0
  fi
  echo "wheels in $dest do not match $lock: a wheel is missing or its digest differs" >&2
  exit 1
fi

if [[ "$mode" == fetch && ! -f "$lock" ]]; then
  echo "no lock file $lock: resolving and locking" >&2
  mode=lock
fi

if [[ "$mode" == fetch ]]; then
  if ! cmp --silent <(printf '%s\n' "${requirements[@]}") <(locked_requirements); then
    echo "the requirements of pyproject.toml differ from those locked in $lock;" \
      "run build/download-wheels.sh --lock $variant and commit the lock file" >&2
    exit 1
  fi
  if check_folder delete 2>/dev/null; then
    echo "wheels match the lock: variant=$variant folder=$dest" >&2
  else
    echo "downloading the locked wheels: variant=$variant folder=$dest" >&2
    mkdir -p "$dest"
    "$python" -m pip download --quiet --dest "$dest" --no-deps --require-hashes \
      "${target[@]}" -r "$lock"
  fi
  remove_unlocked
  check_folder
  du -sh "$dest" >&2
  exit 0
fi

# --lock: resolve into an empty folder, so that no wheel of an earlier resolution is locked.
pip_env=(env)
if [[ "$variant" == gpu ]]; then
  # A find-links folder of CPU wheels in pip's configuration would win over the CUDA build,
  # because pip ranks the local version 2.13.0+cpu above 2.13.0. PIP_FIND_LINKS replaces the
  # configured find-links with the old folder, so the indexes and mirrors of pip's
  # configuration still apply and wheels already downloaded are reused.
  pip_env=(env "PIP_FIND_LINKS=$dest")
fi
fresh="$(mktemp -d)"
trap 'rm -rf "$fresh"' EXIT
echo "resolving and downloading variant=$variant" >&2
"${pip_env[@]}" "$python" -m pip download --quiet --dest "$fresh" "${target[@]}" \
  "${requirements[@]}"

if [[ "$variant" == gpu ]] && ls "$fresh"/torch-*+cpu-*.whl >/dev/null 2>&1; then
  echo "found a +cpu torch wheel; the GPU image needs the CUDA build" >&2
  exit 1
fi
if [[ "$variant" == cpu ]] && ! ls "$fresh"/torch-"${torch_version}"+cpu-*.whl >/dev/null 2>&1; then
  # The default PyPI torch wheel for Linux is the CUDA build (several GB with its nvidia-*
  # dependencies); the CPU image must hold the +cpu build.
  echo "no torch ${torch_version}+cpu wheel was found: put the CPU wheel where pip finds it" \
    "(PIP_FIND_LINKS or an index that serves it) and rerun" >&2
  exit 1
fi

mkdir -p "$(dirname "$lock")"
{
  echo "# Wheels of the $variant image, each pinned to one file and its SHA-256 digest."
  echo "# Written by build/download-wheels.sh --lock $variant; do not edit. The Dockerfile"
  echo "# installs exactly these lines with pip --require-hashes --no-deps."
  printf '# requirement: %s\n' "${requirements[@]}"
  for wheel in "$fresh"/*.whl; do
    file="$(basename "$wheel")"
    # A wheel file name starts with DISTRIBUTION-VERSION-.
    name="${file%%-*}"
    rest="${file#*-}"
    version="${rest%%-*}"
    digest="$(sha256sum "$wheel" | cut -d' ' -f1)"
    echo "# file: $file"
    echo "${name//_/-}==$version --hash=sha256:$digest"
  done
} >"$lock"
mkdir -p "$dest"
mv -f "$fresh"/*.whl "$dest"/
remove_unlocked
echo "locked $(grep -c -- '--hash=' "$lock") wheels in $lock" >&2
du -sh "$dest" >&2
