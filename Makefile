# pneumoscope: `make demo` runs the whole thing locally, `make test` runs the tests.
# Both install what they need into .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1
DEMO_PORT ?= 8480
DEMO_WEB_PORT ?= 8482
DEMO_USER ?= demo

.PHONY: setup deps-web demo test test-fast compile bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

demo: setup
	@echo "== pneumoscope demo: the training pipeline on kfp.local with the 'demo' profile"
	@echo "   (96 px, 2 epochs: about 10 minutes on 2 CPU cores; a demonstration, not a clinical model)"
	$(BIN)/pneumoscope pipeline run --local --profile demo
	@echo "== a demo login for the web app on this machine (its password is printed only when it is created)"
	$(BIN)/pneumoscope users add $(DEMO_USER) --generate-password --if-missing
	@echo "== serving the champion: transformer http://127.0.0.1:$(DEMO_PORT), doctor's web app" \
	  "http://127.0.0.1:$(DEMO_WEB_PORT) (sign in as '$(DEMO_USER)'; Ctrl-C stops everything)"
	$(BIN)/pneumoscope serve --model models:/pneumonia@champion --port $(DEMO_PORT) --web-port $(DEMO_WEB_PORT)

# The web app's tests start a real PostgreSQL 15 (initdb + pg_ctl as an unprivileged user) and drive
# Debian's Chromium with Playwright; install both with apt when missing (CI machines start bare).
deps-web:
	@if [ ! -x /usr/lib/postgresql/15/bin/initdb ] || [ ! -x /usr/bin/chromium ]; then \
	  echo "== installing postgresql-15 and chromium (apt)"; \
	  flock /tmp/apt.lock sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-15 chromium fonts-dejavu-core >/dev/null'; \
	fi

test: setup deps-web
	$(BIN)/python -m pytest -q -rs

compile: setup
	$(BIN)/pneumoscope pipeline compile

clean:
	rm -rf .pneumoscope local_outputs .pytest_cache
