#!/usr/bin/env bash
# `make load-cluster`: one run of the compose profile `load` against the running stack.
# Starts the master and N workers, waits for the master to finish, prints its table,
# copies its reports out, removes the load containers and their volume, and exits with
# the run's status (non-zero on any byte mismatch or threshold breach).
#
#   docker/load-cluster.sh "COMPOSE COMMAND" WORKERS REPORTS_DIR PROJECT
#
# With REPORTS_DIR empty (make load-cluster-ui) the master serves locust's web UI on
# 127.0.0.1:8089 and this runs in the foreground until Ctrl-C, then cleans up.
set -euo pipefail
compose=$1 workers=$2 reports=$3 project=$4
# shellcheck disable=SC2086 # the compose command is two words for v2
run() { $compose --profile load "$@"; }

cleanup() {
  run rm -fsv locust-master locust-worker >/dev/null 2>&1 || true
  docker volume rm -f "${project}_load-reports" >/dev/null 2>&1 || true
}
trap cleanup EXIT

if [ -z "$reports" ]; then
  echo "load-cluster-ui: locust's web UI at http://127.0.0.1:8089 ($workers worker(s)); Ctrl-C ends it"
  run up --no-build --scale locust-worker="$workers" locust-master locust-worker || true
  exit 0
fi
run up -d --no-build --scale locust-worker="$workers" locust-master locust-worker
master=$(run ps -q locust-master)
status=$(docker wait "$master")
docker logs "$master" 2>&1 | sed -n '/== echo load test/,$p'
docker cp "$master:/reports/." "$reports/"
echo "load-cluster: $workers worker(s); reports in $reports/ (exit $status)"
exit "$status"
