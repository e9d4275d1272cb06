#!/usr/bin/env bash
# make images: build the echo, Prometheus and locust images only when something they are
# built from has changed, and ask the registry about the base images only then.
#
#   docker/images.sh OFFLINE PYTHON_IMAGE PROMETHEUS_IMAGE PYTHON BUILD-COMMAND...
#
# build/images.stamp holds, from the last build: a hash of the files (every file the
# Dockerfiles copy or run, and the staged packages' versions), a hash of the base images
# asked for, the base path decided then (OFFLINE 0 or 1) and the three images' IDs. When
# what the images are built from and the images are the same, nothing is built; the
# registry is asked only when the base images asked for have changed. On the Debian path
# (OFFLINE=1) the names asked for play no part in what is built.
set -euo pipefail

offline_given=$1 python_image=$2 prometheus_image=$3 python=$4
shift 4
STAMP=build/images.stamp
IMAGES=(echo-cluster/echo:latest echo-cluster/prometheus:latest echo-cluster/locust:latest)

files_key() {
  {
    "$python" -c 'from importlib.metadata import version as v
print(v("locust"), v("prometheus-client"), v("uvloop"))'
    find docker services loadtest bench prometheus .env .dockerignore -type f \
      ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum
  } | sha256sum | cut -c1-16
}

image_ids() {
  docker image inspect --format '{{.Id}}' "${IMAGES[@]}" 2>/dev/null | paste -sd, || echo missing
}

# What the bases are: Debian's, built here, or the upstream images asked for.
built_on() { if [ "$1" = 1 ]; then echo debian; else echo "$2"; fi; }

files=$(files_key)
asked=$(printf '%s\n' "$python_image" "$prometheus_image" | sha256sum | cut -c1-16)
old_files="" old_asked="" old_offline="" old_ids=""
if [ -s "$STAMP" ]; then
  read -r old_files old_asked old_offline old_ids <"$STAMP" || true
fi

offline=$offline_given
if [ -z "$offline" ] && [ "$old_asked" = "$asked" ] && [ -n "$old_offline" ]; then
  offline=$old_offline # decided for these very bases: the registry is not asked again
fi
offline=$(bash docker/base-source.sh "$offline" "$python_image" "$prometheus_image")

was="$old_files $(built_on "$old_offline" "$old_asked") $old_ids"
now="$files $(built_on "$offline" "$asked") $(image_ids)"
if [ "$was" = "$now" ]; then
  echo "make images: up to date (files $files, OFFLINE=$offline); nothing to build"
  exit 0
fi
"$@" OFFLINE="$offline"
mkdir -p "$(dirname "$STAMP")"
echo "$files $asked $offline $(image_ids)" >"$STAMP"
