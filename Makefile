# echo cluster: every target sets up what it needs; `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
PYTEST_ARGS ?=

# make load: total users (split evenly over the three services), spawn rate, duration,
# locust processes (-1 = one per core), where reports go, and any extra locust flags.
USERS ?= 90
SPAWN_RATE ?= 30
DURATION ?= 30s
PROCESSES ?= -1
REPORTS ?= reports
LOAD_ARGS ?=
LOCUST := $(VENV)/bin/locust -f loadtest/locustfile.py

.PHONY: help venv test lint fmt up-local load load-ui clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

venv: $(STAMP) ## Create .venv and install the project with its dev extras

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

test: venv ## Run the test suite (pytest; PYTEST_ARGS='-k name' to pick)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv ## ruff (lint + format check) and mypy --strict
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: venv ## Format the code and apply ruff's safe fixes
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

up-local: venv ## Run the three servers on loopback (echo 15001-15003, metrics 9101-9103) until Ctrl-C
	$(PY) -m services.cluster

load: venv ## Headless locust run against all three (USERS=90 DURATION=30s); verifies every byte
	@mkdir -p $(REPORTS)
	$(LOCUST) --headless -u $(USERS) -r $(SPAWN_RATE) -t $(DURATION) --processes $(PROCESSES) \
		--only-summary --csv $(REPORTS)/load --html $(REPORTS)/load.html \
		--summary-json $(REPORTS)/load-summary.json $(LOAD_ARGS)

load-ui: venv ## locust's web UI on http://127.0.0.1:8089 with the same users
	$(LOCUST) --web-host 127.0.0.1 --web-port 8089 $(LOAD_ARGS)

clean: ## Remove the virtualenv, caches and reports
	rm -rf $(VENV) reports .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
