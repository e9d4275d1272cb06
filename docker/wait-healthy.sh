#!/usr/bin/env bash
# Wait until every container of the compose project is healthy, or say which is not.
#   docker/wait-healthy.sh SECONDS PROJECT
set -euo pipefail
deadline=$((SECONDS + ${1:?seconds}))
project=${2:?project}
while :; do
  mapfile -t ids < <(docker ps -aq --filter "label=com.docker.compose.project=$project")
  if [ "${#ids[@]}" -eq 0 ]; then
    echo "wait-healthy: no containers in project $project" >&2
    exit 1
  fi
  waiting=()
  for id in "${ids[@]}"; do
    line=$(docker inspect --format \
      '{{ index .Config.Labels "com.docker.compose.service" }} {{ .State.Status }} {{ if .State.Health }}{{ .State.Health.Status }}{{ else }}none{{ end }}' "$id")
    read -r service state health <<<"$line"
    [ "$state" = running ] && [ "$health" = healthy ] || waiting+=("$service ($state, $health)")
  done
  if [ "${#waiting[@]}" -eq 0 ]; then
    exit 0
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "wait-healthy: not healthy after ${1} s: ${waiting[*]}" >&2
    echo "wait-healthy: see 'make logs'" >&2
    exit 1
  fi
  sleep 2
done
