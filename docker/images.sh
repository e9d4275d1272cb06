#!/usr/bin/env bash
# make images: build the echo, Prometheus and locust images only when something they are
# built from has changed, and ask the registry about the base images only then.
#
#   docker/images.sh OFFLINE PYTHON_IMAGE PROMETHEUS_IMAGE PYTHON BUILD-COMMAND...
#
# build/images.stamp holds, from the last build: a hash of the inputs (every file the
# Dockerfiles copy or run, the base images asked for, the staged packages' versions),
# the base path decided then (OFFLINE 0 or 1) and the three images' IDs. When the inputs
# and the images are the same, nothing is built and no registry is asked.
set -euo pipefail

offline_given=$1 python_image=$2 prometheus_image=$3 python=$4
shift 4
STAMP=build/images.stamp
IMAGES=(echo-cluster/echo:latest echo-cluster/prometheus:latest echo-cluster/locust:latest)

inputs_key() {
  {
    printf '%s\n' "$python_image" "$prometheus_image"
    "$python" -c 'from importlib.metadata import version as v
print(v("locust"), v("prometheus-client"))'
    find docker services loadtest prometheus .env .dockerignore -type f \
      ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum
  } | sha256sum | cut -c1-16
}

image_ids() {
  docker image inspect --format '{{.Id}}' "${IMAGES[@]}" 2>/dev/null | paste -sd, || echo missing
}

key=$(inputs_key)
old_key="" old_offline="" old_ids=""
if [ -s "$STAMP" ]; then
  read -r old_key old_offline old_ids <"$STAMP" || true
fi

offline=$offline_given
if [ -z "$offline" ] && [ "$old_key" = "$key" ]; then
  offline=$old_offline # decided for these very inputs: the registry is not asked again
fi
offline=$(bash docker/base-source.sh "$offline" "$python_image" "$prometheus_image")

if [ "$old_key $old_offline $old_ids" = "$key $offline $(image_ids)" ]; then
  echo "make images: up to date (inputs $key, OFFLINE=$offline); nothing to build"
  exit 0
fi
"$@" OFFLINE="$offline"
mkdir -p "$(dirname "$STAMP")"
echo "$key $offline $(image_ids)" >"$STAMP"
