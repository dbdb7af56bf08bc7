# overlayfs-py: developer entry points.
#
#   make demo     mount the example layer stack and run real programs on it
#   make test     the whole test suite (needs root and /dev/fuse for the mount tests)
#   make bench    benchmarks (BENCH_ARGS=... passed through); make bench-quick
#   make soak     64 clients for 10 minutes on ours, then on the kernel overlay (SOAK_ARGS=...)
#   make clean
#
# Every target that needs the program depends on `setup`, which is idempotent:
# it installs the system packages only when something is missing, and re-installs
# the Python package only when pyproject.toml is newer than the venv's stamp.

SHELL      := /bin/bash
PYTHON     ?= python3
VENV       := .venv
VPY        := $(VENV)/bin/python
STAMP      := $(VENV)/.installed-stamp
BENCH_ARGS ?=
SOAK_ARGS ?=
PYTEST_ARGS ?=

# Run apt-get through sudo only when we are not root.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

APT_PACKAGES := fuse3 libfuse3-dev pkg-config fuse-overlayfs attr rsync sqlite3 git strace e2fsprogs \
                xfsprogs fio uidmap

.PHONY: setup system-deps kernel-modules bytecode test demo bench bench-quick soak clean

setup: system-deps kernel-modules $(STAMP) bytecode

# System packages: only touch apt when one of the things we need is missing.
system-deps:
	@missing=""; \
	for cmd in fusermount3 pkg-config fuse-overlayfs strace setfattr getfattr rsync git mkfs.ext4 debugfs \
	           mkfs.xfs filefrag fio newuidmap newgidmap; do \
	    PATH="$$PATH:/usr/sbin:/sbin" command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$cmd"; \
	done; \
	if command -v pkg-config >/dev/null 2>&1 && ! pkg-config --exists fuse3; then \
	    missing="$$missing libfuse3-dev"; \
	fi; \
	if [ -n "$$missing" ]; then \
	    echo "setup: missing:$$missing -> installing system packages"; \
	    $(SUDO) apt-get update && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y $(APT_PACKAGES); \
	fi

# Best effort: the modules may be built in, or we may not be allowed to load them.
kernel-modules:
	@-$(SUDO) modprobe fuse >/dev/null 2>&1 || true
	@-$(SUDO) modprobe overlay >/dev/null 2>&1 || true
	@-$(SUDO) modprobe xfs >/dev/null 2>&1 || true    # reflink tests (loop device)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# The venv is rebuilt when the pyfuse3 build or its patch series changes (the directory
# itself too: its mtime changes when a patch is added, removed or renamed).
PYFUSE3_DEPS := vendor/pyfuse3/build.py vendor/pyfuse3/patches \
                $(wildcard vendor/pyfuse3/patches/*.patch) vendor/libfuse/build.py

$(STAMP): pyproject.toml $(PYFUSE3_DEPS) | $(VENV)/bin/python
	$(VPY) -m pip install --quiet --upgrade pip
	@# pyfuse3 with our patch set (vendor/pyfuse3/patches, applied by build.py) before the package,
	@# so pip keeps it: the daemon needs its directory-cache and DONT_MASK hooks.
	$(VPY) vendor/pyfuse3/build.py $(VPY)
	@# editable_mode=compat installs a plain path entry (a .pth line). The default installs a
	@# finder module that site imports at every interpreter start, with pathlib: ~11 ms of
	@# each daemon start. setuptools deprecates compat mode; once it is gone, the default.
	PYTHONWARNINGS="ignore:Compat editable" \
	    $(VPY) -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat || \
	    $(VPY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The daemon's modules compiled ahead of time. This environment sets PYTHONDONTWRITEBYTECODE,
# so with the editable install every daemon start compiled them from source: about 100 ms
# of each mount. compileall skips what is up to date; a stale .pyc is never used.
bytecode: $(STAMP)
	@$(VPY) -m compileall -q overlayfs_py

test: setup
	$(VPY) -m pytest -q $(PYTEST_ARGS) tests/

demo: setup
	bash examples/demo.sh

bench: setup
	$(VPY) benchmarks/bench.py $(BENCH_ARGS)

bench-quick: setup
	$(VPY) benchmarks/bench.py --quick $(BENCH_ARGS)

# Not part of `make test`: ten minutes by default (SOAK_SECONDS, SOAK_CLIENTS change it).
soak: setup
	$(VPY) soak/soak.py $(SOAK_ARGS)

clean:
	@# Never remove a tree that is still mounted somewhere below it.
	@if [ -d examples/.run ] && grep -q " $$(realpath examples/.run)" /proc/mounts; then \
	    echo "clean: something is still mounted under examples/.run; unmount it first" >&2; exit 1; \
	fi
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis examples/.run
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
