# dumpwatch: `make test` and `make run` install what they need on a fresh Debian machine.
SHELL := /bin/bash
# Debian's own Python reads DICOM headers faster than a self-built one; any 3.11+ works.
PYTHON ?= $(shell [ -x /usr/bin/python3 ] && echo /usr/bin/python3 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | sha256sum | cut -c1-12)
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends

.PHONY: all install dcmtk browser test test-no-dcmtk run lint bench clean help

all: test ## run the tests (the default)

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	  || { echo "dumpwatch needs Python 3.11 or newer (found $$($(PYTHON) --version))"; exit 1; }
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && $(APT_INSTALL) python3-venv; \
	  else echo "Python's venv module is missing: as root, apt-get install python3-venv"; exit 1; fi; }
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,server,lint]'
	touch $@

install: $(STAMP) ## make .venv with dumpwatch and its test and lint tools

dcmtk: ## install DCMTK's storescp and storescu with apt-get when they are missing
	@command -v storescp >/dev/null && command -v storescu >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && $(APT_INSTALL) dcmtk; \
	  else echo "DCMTK is missing: as root, apt-get install dcmtk"; exit 1; fi; }

# The status page's tests drive Debian's own chromium, headless, through its chromedriver.
browser: ## install chromium and chromedriver (for the status page's tests) with apt-get when they are missing
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && $(APT_INSTALL) chromium chromium-driver; \
	  else echo "chromium is missing: as root, apt-get install chromium chromium-driver (its tests are skipped)"; fi; }

# The end-to-end tests start storescp, which listens on every interface. As root, they run
# in a network namespace of their own, where only loopback exists.
ISOLATE := $(shell [ "$$(id -u)" = 0 ] && command -v ip >/dev/null && unshare --net true 2>/dev/null && echo yes)

test: install dcmtk browser ## run the tests
ifeq ($(ISOLATE),yes)
	unshare --net -- sh -c 'ip link set lo up && exec $(BIN)/pytest $(PYTEST_ARGS)'
else
	$(BIN)/pytest $(PYTEST_ARGS)
endif

# Tests marked dcmtk start storescp, storescu or echoscu; the others need none of DCMTK.
test-no-dcmtk: install ## run the tests that need no DCMTK, without installing it
	$(BIN)/pytest -m "not dcmtk" $(PYTEST_ARGS)

# make run's configuration: etc/dumpwatch.local.cfg if there is one (git ignores it: copy
# etc/dumpwatch.cfg there to change a setting), else the default; or RUN_CONFIG=FILE.
RUN_CONFIG ?= $(if $(wildcard $(CURDIR)/etc/dumpwatch.local.cfg),$(CURDIR)/etc/dumpwatch.local.cfg,$(CURDIR)/etc/dumpwatch.cfg)
RUN_VAR ?= $(CURDIR)/var

run: install dcmtk ## receive on port 11112 and sort into var/ (storescp + dumpwatch under supervisord); Ctrl-C stops
	@exec $(BIN)/python scripts/run.py "$(RUN_CONFIG)" "$(RUN_VAR)"

# ruff and mypy come pinned in the lint extra; mypy's settings are in pyproject.toml.
lint: install ## check the code with ruff and mypy
	$(BIN)/ruff check dumpwatch tests bench scripts
	$(BIN)/mypy

bench: install ## measure sort-once on a generated MR corpus (figures for docs/benchmarks.md)
	$(BIN)/python bench/sort_once.py

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache build *.egg-info
