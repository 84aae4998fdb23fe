#!/usr/bin/env bash
# Check the GPU variant of the image on a host without a GPU: the check behind
# `make image-gpu-test`, which CI does not run.
#
# Usage: build/image-gpu-test.sh   (needs root, like build/image-test.sh)
# Builds ecg-appliance:gpu (cached when nothing changed), then runs every container with the
# hardening flags of tests/test_image.py and checks that
#   1. PyTorch is the CUDA build, ONNX Runtime lists CUDAExecutionProvider, and every shared
#      library of ONNX Runtime's CUDA provider resolves from the nvidia-* wheels except the
#      driver's libcuda.so.1, which the NVIDIA container runtime mounts on a GPU host;
#   2. a model trained in the container on three MIT-BIH records is served; the CUDA provider
#      fails to load only because libcuda.so.1 is missing (the nvidia-* libraries load), the
#      server logs the fallback and provider=CPUExecutionProvider, and generate returns beats;
#   3. `serve --require-gpu` exits non-zero and says that a GPU is required.
# RECORDS_DIR (default: the bundled records in appliance/data/default) supplies records 106,
# 209 and 223. The engine and its containers are stopped on exit, also when a check fails.
set -euo pipefail
export APPLIANCE_IMAGE="${APPLIANCE_IMAGE:-ecg-appliance:gpu}"
build_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$build_dir/env.sh"

records_dir="${RECORDS_DIR:-$repo_root/appliance/data/default}"
records=(106 209 223)
# Upper bound on ingest, one training epoch and export on a 2-core machine.
train_timeout_s=600
ready_timeout_s=120
require_gpu_timeout_s=60
serve_name="appliance-gpu-test-$$"
site_packages=/opt/venv/lib/python3.11/site-packages

work_dir="$(mktemp -d)"
cleanup() {
  "$docker_cli" rm --force "$serve_name" >/dev/null 2>&1 || true
  rm -rf "$work_dir"
  "$build_dir/engine.sh" stop
}
trap cleanup EXIT

fail() {
  echo "image-gpu-test: FAILED: $*" >&2
  exit 1
}

"$build_dir/build-image.sh" gpu

# The records are copied read-only and the store belongs to the image's user (uid 10001).
mkdir -p "$work_dir/records" "$work_dir/store"
for record in "${records[@]}"; do
  for extension in hea dat atr; do
    cp "$records_dir/$record.$extension" "$work_dir/records/"
  done
done
chmod 755 "$work_dir" "$work_dir/records"
chmod 444 "$work_dir/records"/*
chown 10001:10001 "$work_dir/store"

hardening=(
  --network none --read-only --cap-drop ALL --security-opt no-new-privileges --init
  --tmpfs /tmp:rw,nosuid,nodev,size=512m
)
volumes=(--volume "$work_dir/records:/data:ro" --volume "$work_dir/store:/store")

echo "check 1: CUDA builds of torch and onnxruntime" >&2
"$docker_cli" run --rm "${hardening[@]}" --entrypoint python "$APPLIANCE_IMAGE" -c '
import onnxruntime as ort
import torch

providers = ort.get_available_providers()
print(f"torch={torch.__version__} torch_cuda={torch.version.cuda} "
      f"cuda_available={torch.cuda.is_available()} onnxruntime={ort.__version__} "
      f"providers={providers}")
assert torch.version.cuda, "torch is not a CUDA build"
assert "CUDAExecutionProvider" in providers, "onnxruntime lists no CUDAExecutionProvider"
'
missing="$("$docker_cli" run --rm "${hardening[@]}" --entrypoint sh "$APPLIANCE_IMAGE" -c "
  LD_LIBRARY_PATH=\$(find $site_packages/nvidia -mindepth 2 -maxdepth 2 -name lib -type d \
    | paste -sd: -)
  export LD_LIBRARY_PATH
  ldd $site_packages/onnxruntime/capi/libonnxruntime_providers_cuda.so | grep 'not found' || true
")"
echo "unresolved libraries of the CUDA provider: ${missing:-none}" >&2
if [[ "$(awk '{print $1}' <<<"$missing")" != libcuda.so.1 ]]; then
  fail "the CUDA provider needs libraries that no nvidia-* wheel supplies: $missing"
fi

echo "check 2: train, serve and log the execution provider in use" >&2
timeout "$train_timeout_s" "$docker_cli" run --rm "${hardening[@]}" "${volumes[@]}" \
  --env APPLIANCE_TRAIN_EPOCHS=1 --env APPLIANCE_TRAIN_MAX_MINUTES=1 \
  "$APPLIANCE_IMAGE" train >"$work_dir/train.log" 2>&1 || {
    tail -n 30 "$work_dir/train.log" >&2
    fail "training in the GPU image failed"
  }
grep -E 'published model_id=' "$work_dir/train.log" >&2 || fail "training published no model"

"$docker_cli" run --detach --name "$serve_name" "${hardening[@]}" "${volumes[@]}" \
  --env APPLIANCE_HOST=127.0.0.1 "$APPLIANCE_IMAGE" serve >/dev/null
waited_s=0
until "$docker_cli" exec "$serve_name" appliance-entrypoint health >/dev/null 2>&1; do
  if (( waited_s >= ready_timeout_s )); then
    "$docker_cli" logs --tail 30 "$serve_name" >&2
    fail "the server was not SERVING after ${ready_timeout_s} s"
  fi
  sleep 2
  waited_s=$((waited_s + 2))
done
serve_log="$("$docker_cli" logs "$serve_name" 2>&1)"
serving_line="$(grep -E 'server serving .*provider=' <<<"$serve_log" || true)"
echo "$serving_line" >&2
if ! grep -q 'provider=CPUExecutionProvider' <<<"$serving_line"; then
  fail "the server did not log provider=CPUExecutionProvider on a host without a GPU"
fi
# ONNX Runtime names the first shared library that failed to load. Any name other than the
# driver's libcuda.so.1 means the serving process did not load the nvidia-* libraries.
load_error="$(grep -oE 'libonnxruntime_providers_cuda\.so with error: [^ ]+' <<<"$serve_log" \
  | head -n 1 || true)"
echo "CUDA provider load error: ${load_error:-none}" >&2
if [[ "${load_error##* }" != libcuda.so.1: ]]; then
  "$docker_cli" logs --tail 30 "$serve_name" >&2
  fail "the CUDA provider did not fail on libcuda.so.1 alone: ${load_error:-no load error logged}"
fi
grep -E 'execution provider fallback requested=CUDAExecutionProvider used=CPUExecutionProvider' \
  <<<"$serve_log" >&2 || fail "the server did not log the fallback from the CUDA provider"
"$docker_cli" exec "$serve_name" python -m appliance generate --address 127.0.0.1:50051 \
  --count 8 --margin 0 --seed 7 --out /tmp/generated --format npy >/dev/null
beat_count="$("$docker_cli" exec "$serve_name" python -c \
  "import numpy as np; print(np.load('/tmp/generated/synthetic.npy').shape[0])")"
[[ "$beat_count" == 8 ]] || fail "generate returned $beat_count beats, expected 8"
echo "generate returned beats=$beat_count" >&2
"$docker_cli" rm --force "$serve_name" >/dev/null

echo "check 3: serve --require-gpu exits non-zero without a GPU" >&2
status=0
timeout "$require_gpu_timeout_s" "$docker_cli" run --rm "${hardening[@]}" "${volumes[@]}" \
  --env APPLIANCE_HOST=127.0.0.1 "$APPLIANCE_IMAGE" serve --require-gpu \
  >"$work_dir/require-gpu.log" 2>&1 || status=$?
grep -E '^error:' "$work_dir/require-gpu.log" >&2 || true
if (( status == 0 || status == 124 )); then
  tail -n 5 "$work_dir/require-gpu.log" >&2
  fail "serve --require-gpu did not exit with an error (exit status $status)"
fi
if ! grep -q 'GPU is required' "$work_dir/require-gpu.log"; then
  tail -n 5 "$work_dir/require-gpu.log" >&2
  fail "serve --require-gpu exited with status $status but without 'GPU is required'"
fi
echo "image-gpu-test: passed image=$APPLIANCE_IMAGE require_gpu_exit_status=$status" >&2
