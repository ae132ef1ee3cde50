# Front door: `make serve` (start the server) and `make test` (everything CI runs).
# Each target creates .venv and installs what it needs when missing.
# `make cluster` and the cluster tests also need nginx, which pip cannot install: on Debian/Ubuntu
# `sudo apt-get install nginx-light` (or nginx), Fedora `sudo dnf install nginx`, macOS `brew install nginx`.
# Without it `make test` skips the tests that run it, saying so; .ci/run installs it when it runs as root.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SERVE_STAMP := $(VENV)/.installed-serve
TEST_STAMP  := $(VENV)/.installed-test

# `make serve` settings; e.g. `make serve PORT=50052 SERVE_ARGS='--device cuda'`. The same PORT (and HOST)
# reach the client commands: `make health PORT=50052`, `make layers PORT=50052`. Each defaults to its
# NORMSERVE_* variable, which `normserve serve` and the client commands read too: export NORMSERVE_PORT=50052
# once, and `make serve`, `normserve health` and `normserve layers` all use that port.
HOST       ?= $(or $(NORMSERVE_HOST),127.0.0.1)
PORT       ?= $(or $(NORMSERVE_PORT),50051)
STATE_DIR  ?= $(or $(NORMSERVE_STATE_DIR),./normserve-state)
SERVE_ARGS ?=
# `make cluster` settings: REPLICAS replicas on PORT+1.., nginx on PORT, e.g. `make cluster REPLICAS=4`.
REPLICAS          ?= 2
CLUSTER_STATE_DIR ?= ./normserve-cluster

# `make protos` writes here; the drift test points it at a scratch folder.
PROTO_OUT ?= protos

# `make gpu-check` runs on a GPU machine with no network, under its own python3
# (which holds CUDA torch and CuPy); `make gpu-wheels` fetches, here, what it lacks.
GPU_PYTHON    ?= python3
GPU_WHEELS    ?= .gpu-wheels
GPU_CHECK_OUT ?= build/gpu-check

# The cross-language test's Node.js client: its npm packages, as the lock file pins them.
NODE_DIR   := tests/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed

# The CUDA kernels run on the CPU in `make test` (tests/cudasim; needs g++ with C++20, else those tests skip,
# saying so). These rerun those tests on sanitizer builds of the kernels (docs/gpu.md).
CXX ?= g++
CUDA_SIM_TESTS := tests/test_cudasim.py tests/test_fused.py -k "cpu or edge or walk or cudasim"

.PHONY: serve health layers cluster test lint bench protos clean gpu-wheels gpu-check node-deps \
	cuda-sim-ubsan cuda-sim-tsan cuda-sim-mutants

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(SERVE_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(TEST_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@ $(SERVE_STAMP)

serve: $(SERVE_STAMP)
	$(VENV)/bin/normserve serve --host $(HOST) --port $(PORT) --state-dir $(STATE_DIR) $(SERVE_ARGS)

# The client commands, pointed where `make serve` (or `make cluster`'s nginx) listens by the same settings.
health layers: $(SERVE_STAMP)
	NORMSERVE_HOST=$(HOST) NORMSERVE_PORT=$(PORT) $(VENV)/bin/normserve $@

# Layer-sharded replicas behind nginx on this host (deploy/nginx/README.md); needs nginx (see the top).
cluster: $(SERVE_STAMP)
	$(VENV)/bin/normserve cluster --host $(HOST) --port $(PORT) --replicas $(REPLICAS) \
		--state-dir $(CLUSTER_STATE_DIR) $(SERVE_ARGS)

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint node-deps
	$(PY) -m pytest

# Only where node and npm exist: elsewhere the Node.js tests skip (saying so) and `make test` runs the rest.
node-deps:
	@if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then \
		$(MAKE) --no-print-directory $(NODE_STAMP); \
	else \
		echo "node/npm not found: the Node.js client tests will skip"; \
	fi

# npm ci installs exactly the lock file (no resolution); no install scripts are needed, so none run.
$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	cd $(NODE_DIR) && npm ci --ignore-scripts --no-audit --no-fund
	touch $@

bench: $(TEST_STAMP)
	$(PY) benchmarks/kernels.py
	$(PY) benchmarks/service.py
	$(PY) benchmarks/training.py
	$(PY) benchmarks/cluster.py

# Regenerate the committed Python code (messages, stubs, .pyi) from the .proto.
protos: $(TEST_STAMP)
	$(PY) -m grpc_tools.protoc -I protos --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) \
		--grpc_python_out=$(PROTO_OUT) protos/normserve/v1/normalization.proto

gpu-wheels: $(PY)
	$(PY) scripts/gpu_check.py download --dest $(GPU_WHEELS)

# Exits 2 ("no CUDA device") on a machine without one; results in $(GPU_CHECK_OUT).
gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py run --wheels $(GPU_WHEELS) --out $(GPU_CHECK_OUT)

# Undefined behaviour in a kernel (overflow, bad shift, misaligned access) stops the test with its .cu line.
cuda-sim-ubsan: $(TEST_STAMP)
	NKSIM_FLAVOR=ubsan UBSAN_OPTIONS=print_stacktrace=1 $(PY) -m pytest -q $(CUDA_SIM_TESTS)

# A data race between the threads of a block (a missing __syncthreads) in one order, first-in-first-out, on
# a slice of the matrix (TSan is slow); the self-tests' deliberate race is left out. TSan's runtime must be
# loaded before Python.
cuda-sim-tsan: $(TEST_STAMP)
	NKSIM_FLAVOR=tsan LD_PRELOAD="$$($(CXX) -print-file-name=libtsan.so)" \
		TSAN_OPTIONS="halt_on_error=1 report_signal_unsafe=0 suppressions=tests/cudasim/tsan.supp" $(PY) -m pytest -q -p no:faulthandler -s \
		tests/test_fused.py -k "float32-1-cpu-fifo or (edge and fifo) or (walk and fifo)"

# Each __syncthreads of the kernels removed in turn, in a scratch copy: which thread orders catch it.
cuda-sim-mutants: $(TEST_STAMP)
	$(PY) tests/cudasim/mutants.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info $(NODE_DIR)/node_modules
