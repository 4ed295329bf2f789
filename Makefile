# Set-up and entry points. `make demo` and `make test` install everything they
# need (Debian packages with apt, Python packages into .venv) and then run.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
OUT    ?= out

# System tools the build and the tests use.
APT_PACKAGES := gpgv gnupg zstd xz-utils binutils ca-certificates \
	umoci skopeo mmdebstrap qemu-user-static binfmt-support \
	qemu-system-x86 qemu-system-arm qemu-utils ovmf qemu-efi-aarch64 \
	python3-venv python3-pip fdisk postgresql chromium

# `make demo DEMO_ARGS=--no-wait` ends once the VM shows up in the fleet.
DEMO_ARGS ?=

.PHONY: demo test setup apt venv lint bench bench-system bench-update bench-agent bench-fleet \
	compare-openscap clean

# The archive moves on (security updates, point releases): refresh the lock to
# its newest state, then build exactly that lock for both architectures.
demo: setup
	$(BIN)/cerulean lock --refresh images/base.toml
	$(BIN)/cerulean build images/base.toml --locked --arch amd64,arm64 --out $(OUT)
	$(BIN)/cerulean lock --refresh images/tools.toml
	$(BIN)/cerulean lock --refresh images/vm.toml
	$(BIN)/cerulean build images/vm.toml --locked --arch amd64 --format qcow2 --out $(OUT)
	$(BIN)/cerulean test $(OUT)/vm-amd64.qcow2
	$(BIN)/cerulean demo $(OUT)/vm-amd64.qcow2 --dir $(OUT)/fleet-demo $(DEMO_ARGS)

# The QEMU power-cut test cuts 20 times when run by itself; each cut is a boot of
# about two minutes under emulation, so the whole suite runs 2 of them.
POWER_CUTS ?= 2

test: setup
	CERULEAN_POWER_CUTS=$(POWER_CUTS) $(BIN)/python -m pytest -p no:cacheprovider -n 2 --dist loadgroup --no-loadscope-reorder \
		--durations=30 tests

bench: setup
	$(BIN)/python benchmarks/build_bench.py

bench-system: setup
	$(BIN)/python benchmarks/system_bench.py

bench-update: setup
	$(BIN)/python benchmarks/update_bench.py

# AIDE is the reference for the integrity scan; only this benchmark needs it.
bench-agent: setup
	@command -v aide >/dev/null || { SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends aide; }
	$(BIN)/python benchmarks/agent_bench.py

# Simulated agents against a real fleet server on SQLite and PostgreSQL (FLEET_BENCH_ARGS:
# --hosts, --seconds, --workers, --concurrency; 10,000 hosts for 10 minutes by default).
FLEET_BENCH_ARGS ?=
bench-fleet: setup
	$(BIN)/python benchmarks/fleet_bench.py $(FLEET_BENCH_ARGS)

# anssi-bp28-intermediary against OpenSCAP (SSG's Debian 12 data stream) in one booted vm.
compare-openscap: setup
	test -e $(OUT)/vm-amd64.qcow2 || $(BIN)/cerulean build images/vm.toml --arch amd64 \
		--format qcow2 --out $(OUT)
	$(BIN)/python benchmarks/openscap_compare.py --disk $(OUT)/vm-amd64.qcow2

setup: apt venv

apt: $(VENV)/.apt-stamp
venv: $(VENV)/.pip-stamp

$(VENV)/.apt-stamp: Makefile
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "Installing Debian packages:$$missing"; \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@mkdir -p $(VENV) && touch $@

$(VENV)/.pip-stamp: pyproject.toml $(VENV)/.apt-stamp
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

clean:
	rm -rf $(VENV) $(OUT)
