#!/usr/bin/env bash
# Download every Python wheel the image needs into build/wheels/, so that the image build
# installs with `pip install --no-index` and needs no network (the same step works on an
# air-gapped site that receives the folder).
#
# Usage: build/download-wheels.sh [--print-requirements] [cpu|gpu]
#   cpu (default): CPU build of torch and onnxruntime.
#   gpu: CUDA build of torch (its CUDA libraries come as nvidia-* wheels) and onnxruntime-gpu,
#        into build/wheels-gpu/.
#   --print-requirements: print the requirements.txt this variant needs and download nothing;
#        build/build-image.sh compares it with the folder's to find stale wheels.
#
# The wheels target CPython 3.11 on x86-64 glibc, the Python of Debian bookworm, whatever
# Python runs this script. PYTHON selects the interpreter that runs pip (default python3).
set -euo pipefail

print_only=0
if [[ "${1:-}" == --print-requirements ]]; then
  print_only=1
  shift
fi
variant="${1:-cpu}"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
torch_version="2.13.0"

case "$variant" in
  cpu) dest="$repo_root/build/wheels" ;;
  gpu) dest="$repo_root/build/wheels-gpu" ;;
  *) echo "unknown variant '$variant': expected cpu or gpu" >&2; exit 2 ;;
esac

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

if (( print_only )); then
  printf '%s\n' "${runtime_deps[@]}" "${variant_deps[@]}"
  exit 0
fi
mkdir -p "$dest"

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

pip_env=(env)
if [[ "$variant" == gpu ]]; then
  # A find-links folder of CPU wheels in pip's configuration would win over the CUDA build,
  # because pip ranks the local version 2.13.0+cpu above 2.13.0. PIP_FIND_LINKS replaces the
  # configured find-links with the destination folder, so the indexes and mirrors of pip's
  # configuration still apply and a rerun reuses the wheels it already downloaded.
  pip_env=(env "PIP_FIND_LINKS=$dest")
fi

echo "downloading variant=$variant into $dest" >&2
"${pip_env[@]}" "$python" -m pip download --quiet --dest "$dest" "${target[@]}" \
  "${runtime_deps[@]}" "${variant_deps[@]}" "${build_deps[@]}"

# The Dockerfile installs exactly these lists from the folder.
printf '%s\n' "${runtime_deps[@]}" "${variant_deps[@]}" >"$dest/requirements.txt"
printf '%s\n' "${build_deps[@]}" >"$dest/build-requirements.txt"

if [[ "$variant" == gpu ]] && ls "$dest"/torch-*+cpu-*.whl >/dev/null 2>&1; then
  echo "found a +cpu torch wheel in $dest; the GPU image needs the CUDA build" >&2
  exit 1
fi
if [[ "$variant" == cpu ]] && ! ls "$dest"/torch-"${torch_version}"+cpu-*.whl >/dev/null 2>&1; then
  # The default PyPI torch wheel for Linux is the CUDA build (several GB with its nvidia-*
  # dependencies); the CPU image must hold the +cpu build.
  echo "no torch ${torch_version}+cpu wheel in $dest: put the CPU wheel where pip finds it" \
    "(PIP_FIND_LINKS or an index that serves it) and rerun" >&2
  exit 1
fi
du -sh "$dest" >&2
