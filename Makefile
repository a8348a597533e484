# Quick start: `make demo` (install, start the daemon, classify the sample images) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean install install-venv install-systemd check-install-python

# torch is pinned through constraints.txt to the 2.13.0 CPU build this kind of machine carries on
# disk; a looser pin would pull a multi-GB CUDA build. On a GPU host, install your CUDA build of
# torch into the venv first: an installed torch satisfies setup.cfg's range and is kept.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch
	$(BIN)/pip install --quiet -c constraints.txt -e '.[daemon,test,bench]'
	touch $@

demo: $(STAMP)
	$(BIN)/python -m inferd.daemon.demo samples/*.png

# The suite on TEST_WORKERS processes (pytest-xdist): most tests wait on daemons, sockets and
# subprocesses rather than on the CPU, so more workers than cores pays. Work stealing hands the tests
# of a busy worker to an idle one; tests/conftest.py puts the slow ones first. The tests marked
# timing (a victim's latency, a device's share of work, a watchdog deadline) then run alone, so no
# other test's load decides them. TEST_WORKERS=0 runs the first part in this one process. For a
# quick loop leave the slow tests out: `.venv/bin/python -m pytest -q -n 4 -m "not slow"`.
TEST_WORKERS ?= 4
# Both parts always run; the last line counts them together (tests/summary.py).
test: $(STAMP)
	@rm -rf .test-results && mkdir -p .test-results
	-$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not timing" --junitxml=.test-results/parallel.xml
	-$(BIN)/python -m pytest -q -m timing --junitxml=.test-results/timing.xml
	@$(BIN)/python tests/summary.py .test-results/parallel.xml .test-results/timing.xml

bench: $(STAMP)
	$(BIN)/python -m bench.load

clean:
	rm -rf $(VENV) bench/out

# System install (docs/operations.md, "systemd"). `sudo make install` = install-venv + install-systemd.
# Packagers stage with `make install-systemd DESTDIR=/tmp/stage PREFIX=/usr`; the unit's ExecStart=
# and Documentation= are rewritten to the INFERD_HOME and DOCDIR chosen here. `make install
# INSTALL_PYTHON=...` picks the interpreter of /opt/inferd (default: the system's /usr/bin/python3).
PREFIX      ?= /usr/local
INFERD_HOME ?= /opt/inferd
SYSCONFDIR  ?= /etc
UNITDIR     ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
TMPFILESDIR ?= $(PREFIX)/lib/tmpfiles.d
DOCDIR      ?= $(PREFIX)/share/doc/inferd
# The venv's bin/python is a link to this interpreter, and the service user runs it: the system
# Python by default, never whatever `python3` a developer's PATH finds first (a pyenv or conda
# Python under /root is one the inferd user cannot execute). systemd/check-interpreter says so
# before anything is installed.
INSTALL_PYTHON ?= /usr/bin/python3
SERVICE_USER   ?= inferd

install: install-venv install-systemd

# A venv is not relocatable (its scripts name its interpreter), so this target ignores DESTDIR.
install-venv: check-install-python
	$(INSTALL_PYTHON) -m venv $(INFERD_HOME)
	$(INFERD_HOME)/bin/pip install --quiet -c constraints.txt torch
	$(INFERD_HOME)/bin/pip install --quiet -c constraints.txt '.[daemon]'

# Can $(SERVICE_USER) run $(INSTALL_PYTHON)? Says what to do when not; installs nothing.
check-install-python:
	@$(INSTALL_PYTHON) systemd/check-interpreter $(SERVICE_USER)

install-systemd:
	install -d -m 755 $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(TMPFILESDIR) $(DESTDIR)$(DOCDIR)
	sed -e 's|/opt/inferd/|$(INFERD_HOME)/|g' -e 's|/usr/local/share/doc/inferd/|$(DOCDIR)/|g' \
	    -e 's|/etc/inferd/|$(SYSCONFDIR)/inferd/|g' systemd/inferd.service > $(DESTDIR)$(UNITDIR)/inferd.service
	sed -e 's|/usr/local/share/doc/inferd/|$(DOCDIR)/|g' systemd/inferd.socket > $(DESTDIR)$(UNITDIR)/inferd.socket
	chmod 644 $(DESTDIR)$(UNITDIR)/inferd.service $(DESTDIR)$(UNITDIR)/inferd.socket
	install -m 644 systemd/inferd.sysusers.conf $(DESTDIR)$(SYSUSERSDIR)/inferd.conf
	install -m 644 systemd/inferd.tmpfiles.conf $(DESTDIR)$(TMPFILESDIR)/inferd.conf
	# README and the operator's manuals, with every file they link to, in the repository's layout
	$(PYTHON) systemd/install-docs . $(DESTDIR)$(DOCDIR) README.md docs/operations.md docs/protocol.md docs/architecture.md
	install -d -m 755 $(DESTDIR)$(SYSCONFDIR)/inferd
	# the example configuration, never over an operator's own
	test -e $(DESTDIR)$(SYSCONFDIR)/inferd/inferd.toml || \
	    install -m 644 systemd/inferd.toml $(DESTDIR)$(SYSCONFDIR)/inferd/inferd.toml
