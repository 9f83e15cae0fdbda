# vmsnap: `make demo` and `make test` work on a fresh Debian 12 machine as root.
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# the suite runs on PYTEST_WORKERS xdist worker processes (tests/README.md); 0 runs it in this process
PYTEST_WORKERS ?= 3
XDIST := $(if $(filter 0,$(PYTEST_WORKERS)),-p no:xdist,-n $(PYTEST_WORKERS) --dist worksteal)
# the edit-test loop: the unit tests and one real end-to-end backup and restore (the demo's, in the lab guest)
QUICK_TESTS := tests/unit tests/integration/demo/test_demo.py

.PHONY: bootstrap bytecode lint shape test test-all test-quick demo bench bench-quick bench-peers clean

bootstrap:
	@bash scripts/bootstrap.sh

lint: bootstrap
	$(BIN)/ruff check vmsnap tests benchmarks scripts
	$(BIN)/ruff format --check vmsnap tests benchmarks scripts
	$(BIN)/mypy --strict vmsnap

# the plugin boundary and the package's shape (scripts/shape.py, configured in pyproject.toml [tool.shape]): no
# import cycle, no isinstance on a plugin's class nor its name compared outside its home, no file over 700 lines
shape:
	python3 scripts/shape.py

# The tests start a Python process for each vmsnap command they run, and each imports vmsnap: where
# PYTHONDONTWRITEBYTECODE is set (this machine sets it) none writes the bytecode it compiles, so every one
# compiled vmsnap from source again (0.15-0.3 s of CPU each). Compiled here once (only what changed since), they
# read it. And pytest, without it set, keeps the test modules it rewrote (its assertions) for the next worker:
# collecting the suite takes 3.3 s of CPU instead of 8.1 in each worker. __pycache__ is in .gitignore.
PYTEST := env -u PYTHONDONTWRITEBYTECODE $(BIN)/pytest

bytecode: bootstrap
	$(BIN)/python -m compileall -q vmsnap tests

# lint, then every test but the `slow` ones
test: lint shape bytecode
	$(PYTEST) $(XDIST) $(PYTEST_ARGS)

# lint, then every test, the `slow` ones too
test-all: lint shape bytecode
	$(PYTEST) $(XDIST) -m "slow or not slow" $(PYTEST_ARGS)

test-quick: bootstrap bytecode
	$(PYTEST) -n 2 --dist worksteal $(QUICK_TESTS) $(PYTEST_ARGS)

demo: bootstrap
	$(BIN)/vmsnap demo

bench: bootstrap
	$(BIN)/vmsnap bench --throughput --out benchmarks/results

bench-quick: bootstrap
	$(BIN)/vmsnap bench --quick --throughput --out benchmarks/results

# the peers (virtnbdbackup on a libvirt domain; restic and borgbackup on the same disks) are not part of
# `make test`: installed here, only if missing, with a policy-rc.d that keeps every service from starting
# (vmsnap starts libvirtd by hand)
PEER_PACKAGES := virtnbdbackup libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients python3-libvirt \
	restic borgbackup

bench-peers: bootstrap
	@missing=""; \
	for pkg in $(PEER_PACKAGES); do \
	  dpkg-query -W -f='$${db:Status-Status}' $$pkg 2>/dev/null | grep -qx installed || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "bench-peers: installing$$missing"; \
	  created=""; \
	  if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && created=1; \
	  fi; \
	  status=0; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing </dev/null >/dev/null \
	    || status=$$?; \
	  if [ -n "$$created" ]; then rm -f /usr/sbin/policy-rc.d; fi; \
	  exit $$status; \
	fi
	$(BIN)/python benchmarks/dedup_peers.py --out benchmarks/results
	$(BIN)/vmsnap bench --peers --out benchmarks/results

# random operations with kill -9 and S3 restarts, then recover, verify and every backup restored and compared
# (tests/soak/soak.py; not in CI, which runs a 60-second one): SOAK_SECONDS (default 1200), SOAK_SEED
SOAK_SECONDS ?= 1200

.PHONY: soak
soak: bootstrap
	SOAK_SECONDS=$(SOAK_SECONDS) $(BIN)/python -m tests.soak.soak

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
