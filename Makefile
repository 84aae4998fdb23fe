# Thin targets: each runs one or two commands. `make run` and `make test` create the virtual
# environment on first use, so a fresh clone needs no other step.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROTO_SRC := proto/appliance/v1/appliance.proto
PROTO_OUT := appliance/v1/appliance_pb2.py
BUF_VERSION := 1.75.0
BUF := build/node/node_modules/.bin/buf
NODE_CLIENT := clients/node/node_modules/.installed

.PHONY: venv proto node-client run test lint bench image image-test image-gpu image-gpu-test clean

venv: $(VENV)/.installed $(PROTO_OUT)

# torch is pinned to release 2.13.0: a range would pull a multi-GB CUDA build. pip takes the
# CPU build (2.13.0+cpu) where its configuration offers it, for example through a find-links
# folder or an extra index that holds the +cpu wheels (PIP_FIND_LINKS, PIP_EXTRA_INDEX_URL).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

proto: $(PROTO_OUT)

$(PROTO_OUT): $(PROTO_SRC) $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO_SRC)

run: venv
	$(PY) -m appliance run --out runs/latest

test: venv node-client
	$(PY) -m pytest -q

lint: venv $(BUF)
	$(VENV)/bin/ruff check appliance tests benchmarks
	$(VENV)/bin/ruff format --check appliance tests benchmarks
	$(VENV)/bin/mypy
	$(BUF) lint

# buf lints the proto contract (settings in buf.yaml); npm installs it under build/node.
$(BUF):
	npm install --prefix build/node --no-save @bufbuild/buf@$(BUF_VERSION)

node-client: $(NODE_CLIENT)

# npm installs the Node.js client's pinned packages (no lock file) when package.json changes.
$(NODE_CLIENT): clients/node/package.json
	npm install --prefix clients/node --no-package-lock --no-audit --no-fund
	touch $@

# Each benchmark prints its figures; docs/benchmarks.md records them with command and machine.
# The training budgets are long: the whole target takes about an hour on 2 cores.
bench: venv
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/flow_baselines.py
	$(PY) benchmarks/flops.py
	$(PY) benchmarks/gate.py
	$(PY) benchmarks/grpc_throughput.py
	$(PY) benchmarks/unread_streams.py
	$(PY) benchmarks/privacy_search.py
	$(PY) benchmarks/worker_memory.py
	$(PY) benchmarks/quality.py --out runs/quality

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache

# Container image. Both targets need root: they install docker.io and debootstrap when missing,
# run a private Docker engine under /tmp/appliance-engine and build with no network.
image: venv
	build/build-image.sh cpu

# Lint, build and run the sealed-container checks; stops the engine at the end, also on failure.
image-test: venv
	build/image-test.sh

# GPU variant (CUDA torch and onnxruntime-gpu wheels); not part of CI.
image-gpu:
	build/build-image.sh gpu

# Build the GPU variant and check it on a host without a GPU: CUDA builds present, serving
# falls back to the CPU provider, --require-gpu stops the server. Stops the engine at the end.
image-gpu-test:
	build/image-gpu-test.sh
