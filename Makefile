# hakit — the two commands: `make demo` and `make test` (both as root on Debian).
# Each installs what is missing (Debian packages, then a virtualenv) before running.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEB_PACKAGES := iproute2 nftables fuse3 util-linux procps psmisc curl iputils-ping etcd-server gcc libc6-dev
BENCH_PACKAGES := keepalived bc fio rsync glusterfs-server glusterfs-client

.PHONY: demo test lint typecheck unit integration deps venv bench-failover bench-farm bench-replication clean lab-down

demo: deps
	$(BIN)/hakit lab demo

test: deps lint typecheck
	$(BIN)/pytest -q -p no:cacheprovider tests

unit: venv
	$(BIN)/pytest -q -p no:cacheprovider tests/core tests/unit

integration: deps
	$(BIN)/pytest -q -p no:cacheprovider tests/integration

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: venv
	$(BIN)/mypy src

deps: .deb-stamp venv

# Debian packages: installed only when one is missing (apt-get update once first).
.deb-stamp:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@touch $@

venv: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

bench-deps: deps
	@missing=""; for p in $(BENCH_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

bench-failover: bench-deps
	$(BIN)/python bench/failover.py

bench-farm: bench-deps
	$(BIN)/python bench/farm.py

bench-replication: bench-deps
	$(BIN)/python bench/replication.py --reps 3 --plaintext

lab-down: venv
	$(BIN)/hakit lab down

clean:
	rm -rf $(VENV) .deb-stamp .mypy_cache .ruff_cache build src/*.egg-info
