# pibackup developer tasks. `make setup` once on a fresh Debian machine, then `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# xfsprogs, btrfs-progs, exfatprogs, exfat-fuse: tests/e2e/test_filesystems.py's sticks (mkfs, and exFAT through FUSE)
# rclone: shipping to clouds and object stores (pibackup-ship=rclone:...), tested against its
# local backend and `rclone serve sftp`/`webdav` on 127.0.0.1 (tests/e2e/test_rclone*.py, bench/rclone_ship.py)
APT_PACKAGES = python3 python3-venv python3-pip sqlite3 make strace xz-utils e2fsprogs util-linux rsync openssh-client openssh-server \
	rclone xfsprogs btrfs-progs exfatprogs exfat-fuse \
	libsqlite3-0 libsodium23 libgmp10 zlib1g libpq5
# tests/cln/: a real Core Lightning, unpacked from ../shared/cln/ into .cln/ (ignored by git);
# its runtime libraries are the last line of APT_PACKAGES. Without the tarball the tests skip (CI fails them).
CLN_TARBALL ?= $(CURDIR)/../shared/cln/core-lightning-v26.06.6-bookworm-amd64.tar.xz
CLN_DIR      = $(CURDIR)/.cln
# `make deb` and `make test-deb`: Debian's package tools, lintian, and debootstrap for the test chroot.
DEB_APT_PACKAGES = debhelper dh-python python3-all dpkg-dev fakeroot patch lintian man-db debootstrap
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' pibackup/__init__.py)
DEB      = dist/pibackup_$(VERSION)_all.deb

.PHONY: setup test test-long lint docs bench clean deb test-deb

setup:
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) $(DEB_APT_PACKAGES)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	@if [ -f "$(CLN_TARBALL)" ]; then \
		rm -rf "$(CLN_DIR)" && mkdir -p "$(CLN_DIR)" && tar xJf "$(CLN_TARBALL)" -C "$(CLN_DIR)" && \
		"$(CLN_DIR)/usr/local/bin/lightningd" --version; \
	else echo "no $(CLN_TARBALL): the tests against a real lightningd (tests/cln) will be skipped"; fi

lint:
	$(VENV)/bin/ruff check pibackup tests pibackup.py
	$(VENV)/bin/mypy

# Two workers at most where there are two cores (pytest-xdist): most tests wait on fsync
# and on the plugin's process, so the suite takes about half as long. The tests' files go
# under the checkout, on a real disk: /tmp may be a tmpfs (Debian 13 mounts it so), where
# nothing waits on a sync and the compaction process, at nice 10, can fall behind the
# workers until the compaction tests' replays are over.
TEST_TMP = $(CURDIR)/.test-tmp
test: lint
	$(PY) -m pytest -q -n auto --maxprocesses=4 --basetemp=$(TEST_TMP)

# The large runs: >= 500 SIGKILLs of the plugin per recording; every crash state of trace A
# (tests/crashstates.py), with its figures.
test-long:
	PIBACKUP_KILL_POINTS=500 $(PY) -m pytest -q -s -k sigkill tests/e2e/test_traces.py tests/e2e/test_compact.py tests/e2e/test_replica.py tests/e2e/test_remote_kills.py
	PIBACKUP_CORRUPTIONS=3000 $(PY) -m pytest -q -s tests/crash/test_corruption.py
	$(PY) -m pytest -q -s -m long tests/crash/test_crashstates.py

# docs/guide/options.md is generated from the options table (pibackup/app/options.py);
# tests/unit/test_docs.py fails when the two differ.
docs:
	$(PY) -m pibackup.app.options docs/guide/options.md

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis .test-tmp .cln
	find . -name __pycache__ -prune -exec rm -rf {} +

# Benchmarks: never part of `make test`. Prints tables.
# As root the wear benchmark runs on a loop-mounted ext4 image (device bytes from
# /sys/block/loopN/stat); otherwise on a plain directory, without device bytes.
bench:
	$(PY) bench/filter_tiers.py
	$(PY) bench/wear.py
	$(PY) bench/replay_speed.py
	$(PY) bench/compaction.py
	$(PY) bench/long_run.py 1000000
	$(PY) bench/remote.py
	$(PY) bench/large_db.py  # 2 GB: about 20 minutes on 2 cores; --mb 200 for a quick run
	$(PY) bench/rclone_ship.py

# The Debian package (docs/dev/packaging.md). `make deb` fetches the pinned pyln-client wheel
# from PyPI, builds dist/pibackup_<version>_all.deb and runs lintian on it. `make test-deb`
# installs it with apt in a fresh bookworm chroot (debootstrap, cached under
# ~/.cache/pibackup) and replays a recording through the installed plugin; root only.
deb:
	PYTHON=$(PYTHON) packaging/build-deb.sh

test-deb: deb
	tests/deb/run.sh $(DEB)
