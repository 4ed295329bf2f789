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
	python3-venv python3-pip fdisk postgresql chromium faketime gcc libc6-dev

# `make demo DEMO_ARGS=--no-wait` ends once the VM shows up in the fleet.
DEMO_ARGS ?=
DEMO_MINUTES := 15

.PHONY: demo test check test-clock-ahead setup apt venv lint bench bench-system bench-boot \
	bench-stress bench-update bench-publisher bench-agent bench-agent-attacks bench-agent-attacks-debian bench-fleet \
	compare-openscap clean

# The archive moves on (security updates, point releases): the demo locks copies of the
# definitions to its newest state, in $(OUT)/definitions so that the checkout's locks
# stay as committed, then builds exactly those locks.
DEMO_DEFS := $(OUT)/definitions
CERULEAN := $(abspath $(BIN))/cerulean

demo: setup
	@echo "make demo: builds the base container image (amd64, arm64) and the vm disk image,"
	@echo "boots the vm in QEMU to check it, then boots it again to enroll in a fleet server."
	@echo "About $(DEMO_MINUTES) minutes on 2 cores under emulation (KVM: less), once installed."
	rm -rf $(DEMO_DEFS) && mkdir -p $(DEMO_DEFS) && cp -r images $(DEMO_DEFS)/
	cd $(DEMO_DEFS) && $(CERULEAN) lock --refresh images/base.toml
	cd $(DEMO_DEFS) && $(CERULEAN) build images/base.toml --locked --arch amd64,arm64 \
		--out $(abspath $(OUT))
	cd $(DEMO_DEFS) && $(CERULEAN) lock --refresh images/tools.toml
	cd $(DEMO_DEFS) && $(CERULEAN) lock --refresh images/vm.toml
	cd $(DEMO_DEFS) && $(CERULEAN) build images/vm.toml --locked --arch amd64 --format qcow2 \
		--out $(abspath $(OUT))
	$(BIN)/cerulean test $(OUT)/vm-amd64.qcow2
	$(BIN)/cerulean demo $(OUT)/vm-amd64.qcow2 --dir $(OUT)/fleet-demo $(DEMO_ARGS)

# The amd64 update test cuts the power 20 times when run by itself; each cut is a boot
# of one to two minutes under emulation, so the whole suite runs 2 of them.
POWER_CUTS ?= 2

PYTEST := $(BIN)/python -m pytest -p no:cacheprovider

test: setup test-clock-ahead
	CERULEAN_POWER_CUTS=$(POWER_CUTS) $(PYTEST) -n 2 --dist loadgroup --no-loadscope-reorder \
		--durations=30 tests

# Everyday work: unit, lint (ruff, mypy) and fleet tests, no QEMU (a few minutes).
check: setup
	$(PYTEST) -n 2 --durations=10 tests/unit tests/test_lint.py tests/fleet

# A test has one clock: the unit tests run again under a wall clock a year ahead
# (Debian's faketime), so a test that mixes a fixed date with the real time fails
# now instead of on that date. The small preload keeps Python's sleeps working.
CLOCK_AHEAD_DAYS ?= 365
FAKETIME_SLEEP := $(VENV)/lib/faketime-sleep.so

$(FAKETIME_SLEEP): tests/support/faketime_sleep.c $(VENV)/.apt-stamp $(VENV)/.pip-stamp
	mkdir -p $(@D)
	cc -shared -fPIC -O2 -Wall -o $@ $< -ldl

test-clock-ahead: setup $(FAKETIME_SLEEP)
	@echo "Unit tests under a wall clock moved $(CLOCK_AHEAD_DAYS) days ahead (faketime):"
	CERULEAN_CLOCK_AHEAD_DAYS=$(CLOCK_AHEAD_DAYS) LD_PRELOAD=$(abspath $(FAKETIME_SLEEP)) \
		FAKETIME_DONT_FAKE_MONOTONIC=1 faketime -f '+$(CLOCK_AHEAD_DAYS)d' \
		$(PYTEST) -n 2 -q tests/unit

bench: setup
	$(BIN)/python benchmarks/build_bench.py

# $(call bench_tool,PROGRAM): installs the Debian package of that name unless the program
# is there; for tools only a benchmark needs.
bench_tool = command -v $(1) >/dev/null || { SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(1); }

# mmdebstrap needs arch-test to build the plain Debian system for a foreign architecture;
# only these benchmarks build one.
bench-system: setup
	@$(call bench_tool,arch-test)
	$(BIN)/python benchmarks/system_bench.py

# Boot time of the vm image next to plain Debian, amd64 and arm64, in one run
# (BOOT_BENCH_ARGS: --arch, --boots, --work DIR to keep the disks).
BOOT_BENCH_ARGS ?=
bench-boot: setup
	@$(call bench_tool,arch-test)
	$(BIN)/python benchmarks/boot_bench.py $(BOOT_BENCH_ARGS)

# The vm booted 30 times with the other core busy, counting every oops and panic
# (STRESS_ARGS: --boots, --cpus, --label; the old crash needs two vCPUs on one thread
# each: CERULEAN_TCG_THREADS=multi STRESS_ARGS="--cpus 2 --label before").
STRESS_ARGS ?=
bench-stress: setup
	test -e $(OUT)/vm-amd64.qcow2 || $(BIN)/cerulean build images/vm.toml --arch amd64 \
		--format qcow2 --out $(OUT)
	$(BIN)/python benchmarks/boot_stress.py $(OUT)/vm-amd64.qcow2 $(STRESS_ARGS)

bench-update: setup
	$(BIN)/python benchmarks/update_bench.py

# A new trixie-security InRelease (a local stand-in) to a signed release on stable.
bench-publisher: setup
	$(BIN)/python benchmarks/publisher_bench.py $(PUBLISHER_BENCH_ARGS)

# AIDE is the reference for the integrity scan; only this benchmark needs it.
bench-agent: setup
	@$(call bench_tool,aide)
	$(BIN)/python benchmarks/agent_bench.py

# An ordinary local user's attacks on the agent, in a booted vm (a fresh build of this tree).
ATTACK_BENCH_ARGS ?=
bench-agent-attacks: setup
	$(BIN)/cerulean build images/vm.toml --arch amd64 --format qcow2 --out $(OUT)
	$(BIN)/python benchmarks/agent_attack_bench.py --disk $(OUT)/vm-amd64.qcow2 \
		$(ATTACK_BENCH_ARGS)

# The same attacks on plain Debian trixie with the agent's .deb installed by apt.
bench-agent-attacks-debian: setup
	$(BIN)/python benchmarks/agent_attack_bench.py --debian $(ATTACK_BENCH_ARGS)

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
	@if [ -r /etc/os-release ]; then . /etc/os-release; fi; if [ "$${ID:-}" != debian ]; then \
		echo "make demo and make test set up a Debian 12 or 13 host; this one is" \
			"$${PRETTY_NAME:-not Debian} (on Ubuntu, chromium is a snap and apt names no" \
			"Debian mirror: see README.md)." >&2; exit 1; fi
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
