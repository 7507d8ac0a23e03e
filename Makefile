# ebpflb: `make demo` and `make test` are the two commands a newcomer runs.
# Each runs `make setup` first, which installs what is missing and says so.

VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest

.PHONY: setup demo test unit lint proto clean vagrant-test bench

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/ebpflb demo

test: setup lint
	$(PYTEST) tests

unit: setup
	$(PYTEST) -m "unit or api" tests

# Side-by-side figures: direct, ebpflb, kube-proxy's iptables and nftables rules (work in progress).
bench: setup
	$(PY) -m ebpflb.bench $(BENCH_ARGS)

lint: setup
	$(VENV)/bin/ruff check ebpflb tests
	$(VENV)/bin/mypy

# The multi-node suite on three Debian 12 VMs (docs/vagrant.md). Needs Vagrant and
# libvirt or VirtualBox here; not part of `make test`. rsync + provision put the
# current code into VMs that are already up and restart the units on it.
vagrant-test: setup
	vagrant up --no-provision
	vagrant rsync
	vagrant provision
	EBPFLB_TARGET=vagrant $(PYTEST) tests/vm

# The one command that makes the generated gRPC code in ebpflb/api/.
proto:
	@bash scripts/genproto.sh ebpflb/api

clean:
	rm -rf $(VENV) .setup-stamp *.egg-info .pytest_cache .mypy_cache .ruff_cache
