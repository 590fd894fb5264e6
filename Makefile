# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0
# Where the pin alone would fetch the CUDA build (PyPI on Linux x86):
# make demo TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=

.PHONY: demo test test-all test-e2e arm64-device lint bench clean sshd postgres chromium
# The emulated arm64 device of the end-to-end tests (a Debian arm64 root, about 1 GB), outside the checkout.
ARM64_DIR ?= /var/tmp/autoseg-arm64

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Pin torch first: any other spec pulls a multi-GB CUDA build.
	$(BIN)/pip install -q $(TORCH_PIP_ARGS) $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/autoseg demo --out runs/demo

test: $(STAMP) sshd postgres
	$(BIN)/ruff check .
	# edge_agent runs on the device's python: 3.8 (JetPack 5) and newer.
	$(BIN)/vermin -q -t=3.8- --no-tips --violations edge_agent
	# One pytest worker per core (pytest-xdist): 533 s -> 323 s on the 2-core CI machine. Every server a test
	# needs (sshd, PostgreSQL) is per worker on a free loopback port.
	$(BIN)/python -m pytest -q -n auto --dist worksteal --durations=20

test-all: $(STAMP) sshd postgres chromium
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n auto --dist worksteal -m 'not e2e'

# An arm64 device on this machine: Debian arm64 under qemu-user (binfmt_misc), numpy + onnxruntime wheels for
# aarch64, its own sshd on 127.0.0.1. Built once (idempotent); needs root. See tests/e2e/arm64_device.sh.
arm64-device: $(STAMP)
	@command -v debootstrap >/dev/null && test -x /usr/bin/qemu-aarch64-static && command -v update-binfmts >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap qemu-user-static binfmt-support >/dev/null; }
	ARM64_DIR=$(ARM64_DIR) HOST_PIP="$(BIN)/python -m pip" tests/e2e/arm64_device.sh build

# The end-to-end tests against it (marked e2e, not part of `make test`): slow, the device is emulated.
test-e2e: $(STAMP) sshd arm64-device
	ARM64_DIR=$(ARM64_DIR) $(BIN)/python -m pytest -q -m e2e tests/e2e

# The report's rendering test uses Debian's headless Chromium.
chromium:
	@test -x /usr/bin/chromium || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# The SSH tests run a real OpenSSH server on 127.0.0.1.
sshd:
	@test -x /usr/sbin/sshd || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null; }
	@mkdir -p /run/sshd

# The storage tests run a real PostgreSQL server on 127.0.0.1 (a throwaway cluster, tests/postgres.py).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }

lint: $(STAMP)
	$(BIN)/ruff check .

# bench_latency and bench_distributed start sshds and a PostgreSQL cluster of their own, as the tests do.
bench: $(STAMP) sshd postgres
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) runs .pytest_cache
