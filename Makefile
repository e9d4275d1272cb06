# echo cluster: every target sets up what it needs; `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
PYTEST_ARGS ?=
PYTEST := $(PY) -m pytest
# Tests that measure nothing run in parallel (pytest-xdist); floods and container tests
# run after them, one at a time, since a neighbour would disturb the threads, RSS and
# probes they judge. Tests on the documented fixed ports share one xdist group.
JOBS ?= auto
PARALLEL := -n $(JOBS) --dist loadgroup
# pytest's exit 5 (nothing selected) is no failure when PYTEST_ARGS picks from one tier.
NONE_SELECTED_IS_OK := || test $$? -eq 5

# make load: total users (split evenly over the three services), spawn rate, duration,
# locust processes (-1 = one per core), where reports go, and any extra locust flags.
USERS ?= 90
SPAWN_RATE ?= 30
DURATION ?= 30s
PROCESSES ?= -1
REPORTS ?= reports
LOAD_ARGS ?=
LOCUST := $(VENV)/bin/locust -f loadtest/locustfile.py
# make load-master / load-worker: locust's own distributed mode, over hosts. The master
# listens for workers on MASTER_BIND:MASTER_PORT (0.0.0.0 to let other hosts in), waits
# up to 120 s for EXPECT_WORKERS of them, and serves the load's metrics on
# LOAD_METRICS_PORT; a worker finds its master at MASTER (host[:port]).
EXPECT_WORKERS ?= 2
MASTER_BIND ?= 127.0.0.1
MASTER_PORT ?= 5557
MASTER ?= 127.0.0.1:$(MASTER_PORT)
LOAD_METRICS_PORT ?= 9646
LOAD_REPORTS = --only-summary --csv $(REPORTS)/load --html $(REPORTS)/load.html \
	--summary-json $(REPORTS)/load-summary.json

# make flood: scenarios (comma-separated or all), connections held, seconds of attack
# per run (judged from 5 s in to the end), extra flags (e.g. --polite).
SCENARIOS ?= all
CONNECTIONS ?= 2000
ATTACK_SECONDS ?= 30
FLOOD_ARGS ?=
# make flood-limit: the attack sizes stepped through, and seconds of attack per step.
LIMIT_STEPS ?= 250,500,1000,2000,4000,8000,16000
LIMIT_SECONDS ?= 15
# How floods reach the containers: auto (their own addresses when `make up` runs them,
# else loopback), network, or published (through Docker's port proxy, which is measured too).
VIA ?= auto
FLOOD_VIA = --via $(VIA) --docker-project $(PROJECT)
QUICK ?=
# make flood-peers-containers: compose's `peers` profile (their ports: loadtest/peers.py).
PEER_SERVICES := peer-asyncio peer-uvloop-streams peer-uvloop-protocol peer-c-epoll \
	peer-asyncio-hardened
BENCH_ARGS ?=

# How the bounded pools take connections: ready (default) or connection (the recipe's).
DISPATCH ?=
# make up LINGER=seconds: how long a `ready` worker keeps a connection for its next message.
LINGER ?=
# make page-shot: where the screenshot goes, and the page's window (default: live, the
# last 15 minutes; WINDOW='--start UNIX --end UNIX' for another).
SHOT ?= docs/img/page-during-flood.png
# The headless browser: Debian's chromium, else another Chromium the machine has.
BROWSER ?= $(or $(shell command -v chromium chromium-browser google-chrome 2>/dev/null | head -1),chromium)
WINDOW ?=

# The images' Python (Debian bookworm's, and the pinned upstream one), for the wheels
# staged into the locust image.
IMAGE_PYTHON := 3.11
ARCH := $(shell uname -m)
WHEEL_TAGS := manylinux2014 manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_36
# make load-cluster: load workers in containers, and what they run.
WORKERS ?= 2

# Containers. The images build on the pinned upstream base images (.env) where they
# can be had, present or pullable, and otherwise on base images built here from
# Debian's packages (docker/base-source.sh decides, in a few seconds, and says so).
# OFFLINE=1 (or ECHO_OFFLINE=1) forces the Debian path, OFFLINE=0 the upstream one.
include .env
OFFLINE ?= $(ECHO_OFFLINE)
PROJECT ?= echo-cluster
UP_TIMEOUT ?= 240
ifeq ($(OFFLINE),1)
BASE_PYTHON := echo-cluster/python-base:bookworm
BASE_PROMETHEUS := echo-cluster/prometheus-base:bookworm
else
BASE_PYTHON := $(PYTHON_IMAGE)
BASE_PROMETHEUS := $(PROMETHEUS_IMAGE)
endif
# Compose v2 (`docker compose`) where there is one, else v1 (`docker-compose`).
COMPOSE_BIN := $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || \
	(command -v docker-compose >/dev/null 2>&1 && echo docker-compose))
COMPOSE := $(COMPOSE_BIN) -p $(PROJECT)
NEED_ENGINE = @docker info >/dev/null 2>&1 || { echo "no Docker Engine answers here \
(docker info failed); run the servers without containers: make up-local" >&2; exit 1; }

.PHONY: help venv test test-fast test-faults test-floods lint fmt up-local load load-master load-worker load-cluster load-cluster-ui load-ui flood flood-limit bench images build-images engine up page chromium page-shot down ps logs clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' \
		'{ name[NR] = $$1; text[NR] = $$2; if (length($$1) > width) width = length($$1) } \
		END { for (i = 1; i <= NR; i++) printf "  make %-" width "s  %s\n", name[i], text[i] }'

venv: $(STAMP) ## Create .venv and install the project with its dev extras

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

test: venv ## The suite CI runs: every claim once, floods and containers included (PYTEST_ARGS='-k name')
	$(PYTEST) -m "not flood and not compose" $(PARALLEL) $(PYTEST_ARGS) $(NONE_SELECTED_IS_OK)
	$(PYTEST) -m "(flood or compose) and not matrix" $(PYTEST_ARGS) $(NONE_SELECTED_IS_OK)

test-fast: venv ## The loop after every change: no floods, containers, bench or locust runs; in parallel
	$(PYTEST) -m "not flood and not compose and not slow" $(PARALLEL) $(PYTEST_ARGS)

test-faults: venv ## Every fault-injection test (MemoryError, OSError from the kernel, a failed send); in make test too
	$(PYTEST) -m faults $(PARALLEL) $(PYTEST_ARGS)

test-floods: venv ## The full flood matrix (every model, mode and scenario); tables in reports/test-floods.md
	@mkdir -p $(REPORTS) && rm -f $(REPORTS)/test-floods.jsonl
	ECHO_FLOOD_RECORD=$(REPORTS)/test-floods.jsonl $(PYTEST) -m flood $(PYTEST_ARGS)
	$(PY) -m loadtest.matrix $(REPORTS)/test-floods.jsonl > $(REPORTS)/test-floods.md
	@echo "test-floods: wrote $(REPORTS)/test-floods.md"

lint: venv ## ruff (lint + format check) and mypy --strict
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: venv ## Format the code and apply ruff's safe fixes
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

up-local: venv ## Run every model's server on loopback until Ctrl-C (DISPATCH=connection: the recipe's pools)
	$(if $(LINGER),ECHO_LINGER=$(LINGER) )$(PY) -m harness.cluster $(if $(DISPATCH),--dispatch $(DISPATCH))

load: venv ## Headless locust run against all three (USERS=90 DURATION=30s); verifies every byte
	@mkdir -p $(REPORTS)
	$(LOCUST) --headless -u $(USERS) -r $(SPAWN_RATE) -t $(DURATION) --processes $(PROCESSES) \
		$(LOAD_REPORTS) $(LOAD_ARGS)

load-master: venv ## The same run from workers on this or other hosts (EXPECT_WORKERS=2; see README)
	@mkdir -p $(REPORTS)
	$(LOCUST) --master --master-bind-host $(MASTER_BIND) --master-bind-port $(MASTER_PORT) \
		--expect-workers $(EXPECT_WORKERS) --expect-workers-max-wait 120 \
		--headless -u $(USERS) -r $(SPAWN_RATE) -t $(DURATION) \
		--load-metrics-port $(LOAD_METRICS_PORT) $(LOAD_REPORTS) $(LOAD_ARGS)

load-worker: venv ## A locust worker for a master elsewhere (MASTER=host[:port])
	$(LOCUST) --worker --master-host $(word 1,$(subst :, ,$(MASTER))) \
		--master-port $(or $(word 2,$(subst :, ,$(MASTER))),5557) $(LOAD_ARGS)

load-cluster: engine ## The load run from WORKERS=2 locust workers in containers (needs make up); reports in reports/
	@test -n "$(COMPOSE_BIN)" || { echo "make load-cluster: neither 'docker compose' nor docker-compose found" >&2; exit 1; }
	@mkdir -p $(REPORTS)
	@LOAD_RUN="--headless -t $(DURATION)" LOAD_WORKERS=$(WORKERS) LOAD_USERS=$(USERS) \
		LOAD_SPAWN_RATE=$(SPAWN_RATE) LOAD_ARGS='$(LOAD_ARGS)' \
		bash docker/load-cluster.sh "$(COMPOSE)" $(WORKERS) $(REPORTS) $(PROJECT)

load-cluster-ui: engine ## locust's web UI on http://127.0.0.1:8089 with WORKERS=2 workers in containers, until Ctrl-C
	@test -n "$(COMPOSE_BIN)" || { echo "make load-cluster-ui: neither 'docker compose' nor docker-compose found" >&2; exit 1; }
	@LOAD_RUN= LOAD_WORKERS=$(WORKERS) LOAD_USERS=$(USERS) LOAD_SPAWN_RATE=$(SPAWN_RATE) \
		LOAD_ARGS='$(LOAD_ARGS)' bash docker/load-cluster.sh "$(COMPOSE)" $(WORKERS) "" $(PROJECT)

load-ui: venv ## locust's web UI on http://127.0.0.1:8089 with the same users
	$(LOCUST) --web-host 127.0.0.1 --web-port 8089 $(LOAD_ARGS)

flood: venv ## Every flood scenario against each running server; table, JSON and charts in reports/
	$(PY) -m loadtest.flood --scenarios $(SCENARIOS) --connections $(CONNECTIONS) \
		--duration $(ATTACK_SECONDS) --json $(REPORTS)/flood.json --charts $(REPORTS) $(FLOOD_VIA) $(FLOOD_ARGS)

flood-peers: venv ## The same floods against asyncio, uvloop and C echo servers beside the three models, on loopback; one table
	$(PY) -m loadtest.peers --scenarios $(SCENARIOS) --connections $(CONNECTIONS) \
		--duration $(ATTACK_SECONDS) --json $(REPORTS)/flood-peers.json --charts $(REPORTS)/peers $(FLOOD_ARGS)

flood-peers-containers: engine images ## The same against the peers in containers (0.5 CPU, 128 MiB) beside make up's models
	$(COMPOSE) --profile peers up -d --no-build $(PEER_SERVICES)
	$(PY) -m loadtest.peers --containers --scenarios $(SCENARIOS) --connections $(CONNECTIONS) \
		--duration $(ATTACK_SECONDS) --json $(REPORTS)/flood-peers-containers.json \
		--charts $(REPORTS)/peers-containers $(FLOOD_ARGS); status=$$?; \
	$(COMPOSE) --profile peers rm -fsv $(PEER_SERVICES) >/dev/null 2>&1; exit $$status

flood-limit: venv ## Step each flood up per server until it is not held; table, JSON and chart in reports/
	$(PY) -m loadtest.flood --find-limit --scenarios $(SCENARIOS) --limit-steps $(LIMIT_STEPS) \
		--duration $(LIMIT_SECONDS) --json $(REPORTS)/flood-limits.json --charts $(REPORTS) $(FLOOD_VIA) $(FLOOD_ARGS)

bench: venv ## Throughput, latency, memory and counters of each model vs asyncio and C (QUICK=1: short)
	$(PY) -m bench $(if $(filter 1,$(QUICK)),--quick) --json $(REPORTS)/bench.json \
		--chart $(REPORTS)/bench.png $(BENCH_ARGS)

images: venv ## Build the images when their inputs changed (on upstream bases, or Debian-built ones without a registry)
	$(NEED_ENGINE)
	@bash docker/images.sh "$(OFFLINE)" "$(PYTHON_IMAGE)" "$(PROMETHEUS_IMAGE)" "$(PY)" \
		$(MAKE) --no-print-directory build-images

build-images:
ifeq ($(OFFLINE),1)
	bash docker/offline-base.sh python
	bash docker/offline-base.sh prometheus
endif
	@rm -rf build/image/site && mkdir -p build/image/site
	@# prometheus-client is pure Python: stage the copy the venv runs, so the build fetches nothing.
	cp -r "$$($(PY) -c 'import os, prometheus_client as p; print(os.path.dirname(p.__file__))')" build/image/site/
	docker build -q -f docker/echo.Dockerfile --build-arg PYTHON_IMAGE=$(BASE_PYTHON) \
		-t echo-cluster/echo:latest . || { echo "make images: could not build on $(BASE_PYTHON)" >&2; exit 1; }
	docker build -q -f docker/prometheus.Dockerfile --build-arg PROMETHEUS_IMAGE=$(BASE_PROMETHEUS) \
		-t echo-cluster/prometheus:latest . || { echo "make images: could not build on $(BASE_PROMETHEUS)" >&2; exit 1; }
	@# locust and its dependencies, and uvloop for the peers, as wheels for the images'
	@# Python (the venv's versions); the C peer built static, so any base runs it.
	@rm -rf build/locust && mkdir -p build/locust/site build/locust/reports build/locust/bin
	$(PY) -m pip install --quiet --target build/locust/site --only-binary=:all: \
		--implementation cp --python-version $(IMAGE_PYTHON) $(foreach tag,$(WHEEL_TAGS),--platform $(tag)_$(ARCH)) \
		$$($(PY) -c 'from importlib.metadata import version as v; print(*(p + "==" + v(p) for p in ("locust", "prometheus-client", "uvloop")))')
	@cc -O2 -static -o build/locust/bin/epoll_echo bench/epoll_echo.c 2>/dev/null \
		|| echo "make images: no static C build here; the c-epoll peer container is left out" >&2
	docker build -q -f docker/locust.Dockerfile --build-arg PYTHON_IMAGE=$(BASE_PYTHON) \
		-t echo-cluster/locust:latest . || { echo "make images: could not build on $(BASE_PYTHON)" >&2; exit 1; }

engine:
	$(NEED_ENGINE)

up: engine images ## Start the stack (3 servers + Prometheus) and wait until every service is healthy
	@test -n "$(COMPOSE_BIN)" || { echo "make up: neither 'docker compose' nor docker-compose found" >&2; exit 1; }
	DISPATCH=$(DISPATCH) LINGER=$(LINGER) $(COMPOSE) up -d --no-build
	@bash docker/wait-healthy.sh $(UP_TIMEOUT) $(PROJECT)
	@$(PY) -m services.models
	@echo "  prometheus http://127.0.0.1:9090"
	@echo "  the three models side by side (make page):"
	@echo "    $$($(PY) -m harness.dashboard)"

page: venv ## Print the address of the page that shows the three models side by side
	@$(PY) -m harness.dashboard

chromium: ## Install Debian's chromium (as root) unless a Chromium is there: page-shot and the page's test
	@$(BROWSER) --version >/dev/null 2>&1 || { test "$$(id -u)" = 0 && command -v apt-get >/dev/null && \
		echo "chromium: installing Debian's package" && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		{ echo "chromium: needs Debian's chromium package (apt-get install chromium, as root)" >&2; exit 1; }

page-shot: venv chromium ## Screenshot the page, one 1920x1080 screen, with headless Chromium (SHOT=, WINDOW=)
	@mkdir -p $(dir $(SHOT))
	@# --virtual-time-budget: let the page's script query and draw before the shot.
	$(BROWSER) --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1920,1080 \
		--virtual-time-budget=20000 --screenshot=$(SHOT) "$$($(PY) -m harness.dashboard $(WINDOW))" 2>/dev/null
	@echo "page-shot: wrote $(SHOT)"

down: ## Stop the stack and remove its containers, network and volume
	$(NEED_ENGINE)
	$(COMPOSE) --profile peers down -v --remove-orphans

ps: ## Show the stack's containers and their health
	$(COMPOSE) ps

logs: ## Show the stack's logs (SERVICE=queue for one)
	$(COMPOSE) logs --tail=200 $(SERVICE)

clean: ## Remove the virtualenv, caches and reports
	rm -rf $(VENV) reports .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
