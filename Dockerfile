# The sealed ECG appliance: trains on WFDB records mounted at /data, keeps ONNX graphs in the
# /store volume and serves them over gRPC on port 50051 with ONNX Runtime.
#
# The build needs no network: Debian packages come from build/debs/ (build/download-debs.sh)
# and Python wheels from build/wheels/ (build/download-wheels.sh, pinned with their digests in
# build/locks/), both bind-mounted into the steps that install them, so no package file stays
# in a layer. Build with BuildKit:
#   DOCKER_BUILDKIT=1 docker build --network none -t ecg-appliance:cpu .
# GPU variant (CUDA torch and onnxruntime-gpu from build/wheels-gpu/):
#   DOCKER_BUILDKIT=1 docker build --network none --build-arg WHEELS=wheels-gpu -t ecg-appliance:gpu .

# Debian bookworm plus Python 3.11 and tini, shared by the build and runtime stages.
FROM debian:bookworm-slim AS python-base
# apt-get orders the local files by their (pre-)dependencies; it needs no package lists.
RUN --mount=type=bind,source=build/debs,target=/tmp/debs \
    apt-get install --yes --no-install-recommends /tmp/debs/*.deb \
    && rm -rf /var/cache/apt/*.bin /var/cache/debconf/*-old /var/lib/dpkg/*-old /var/log/apt \
        /var/log/dpkg.log /usr/share/doc/* /usr/share/man/*

FROM python-base AS build
# Sub-folder of build/ that holds the wheels: wheels (CPU) or wheels-gpu.
ARG WHEELS=wheels
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_INDEX=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# The lock file pins every wheel to one version and its SHA-256 digest; pip refuses a wheel
# whose digest differs and installs no dependency the lock does not name.
RUN --mount=type=bind,source=build,target=/tmp/build \
    python3 -m venv /opt/venv \
    && pip install --find-links "/tmp/build/$WHEELS" --require-hashes --no-deps \
        -r "/tmp/build/locks/$WHEELS.txt"
COPY pyproject.toml ./
COPY proto ./proto
COPY appliance ./appliance
# The gRPC code is generated here from the .proto file, never copied from a working tree.
# setuptools reads README.md for the package description; a tree without one gets an empty file.
RUN python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. \
        proto/appliance/v1/appliance.proto \
    && { [ -f README.md ] || : > README.md; } \
    && pip install --no-deps --no-build-isolation . \
    && pip uninstall --yes grpcio-tools setuptools wheel pip
# Files the appliance never uses at run time: C++ headers and CMake files for building
# extensions, PyTorch's C++ test binaries, test libraries and TorchScript test models, and
# the sample models of ONNX and ONNX Runtime. torch/bin keeps torch_shm_manager, which torch.multiprocessing
# may start.
WORKDIR /opt/venv/lib/python3.11/site-packages
RUN find torch/bin -mindepth 1 -maxdepth 1 ! -name torch_shm_manager -exec rm -rf {} + \
    && rm -rf onnx/backend/test/data onnxruntime/datasets torch/include torch/share/cmake torch/test \
        torch/lib/libtorchbind_test.so torch/lib/libjitbackend_test.so \
        torch/lib/libbackend_with_compiler.so torch/lib/libaoti_custom_ops.so

FROM python-base AS runtime
# The setuid and setgid bits come off every file (su, passwd, mount and others from the base
# image), so a container started without no-new-privileges still gives uid 10001 no way to root.
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin appliance \
    && mkdir -p /data /store \
    && chown 10001:10001 /store \
    && find / -xdev -type f -perm /6000 -exec chmod ug-s {} +
COPY --from=build /opt/venv /opt/venv
COPY build/docker-entrypoint.sh /usr/local/bin/appliance-entrypoint
# The root filesystem is read-only at run time: caches and scratch files go to the /tmp tmpfs.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    APPLIANCE_DATA_DIR=/data \
    APPLIANCE_STORE_DIR=/store \
    APPLIANCE_HOST=0.0.0.0 \
    APPLIANCE_PORT=50051
USER 10001:10001
WORKDIR /tmp
VOLUME ["/store"]
EXPOSE 50051
# Healthy once the gRPC health service reports SERVING. A first `run` trains before it serves,
# so the container reports unhealthy until training ends.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["appliance-entrypoint", "health"]
ENTRYPOINT ["tini", "-g", "-s", "--", "appliance-entrypoint"]
CMD ["run"]
