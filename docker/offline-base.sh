#!/usr/bin/env bash
# Build the project's base images from Debian's packages, for machines with no
# container registry: mmdebstrap makes a root filesystem tarball, `docker import`
# turns it into an image. Both steps are slow (minutes), so the tarball is cached
# under $ECHO_CACHE_DIR keyed by its package list, and nothing is rebuilt while an
# image built from the same list exists.
#
#   docker/offline-base.sh python        -> echo-cluster/python-base:bookworm
#   docker/offline-base.sh prometheus    -> echo-cluster/prometheus-base:bookworm
set -euo pipefail

SUITE=bookworm
CACHE=${ECHO_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/echo-cluster}
REVISION=2  # bump to force a rebuild when the recipe below changes

hook=true
case "${1:-}" in
  python) packages="python3,libstdc++6" ;;  # libstdc++: greenlet (locust image); apt-based images have it
  prometheus)
    packages="prometheus,wget"
    # The data directory, owned by the unprivileged user Prometheus runs as (as upstream).
    hook='mkdir -p "$1/prometheus" && chown 65534:65534 "$1/prometheus"'
    ;;
  *) echo "usage: $0 python|prometheus" >&2; exit 2 ;;
esac
name=$1
tag="echo-cluster/$name-base:$SUITE"
key=$(printf '%s %s %s\n' "$SUITE" "$packages" "$REVISION" | sha256sum | cut -c1-16)

have=$(docker image inspect --format '{{ index .Config.Labels "echo-cluster.key" }}' "$tag" 2>/dev/null || true)
if [ "$have" = "$key" ]; then
  echo "offline-base: $tag is up to date ($key)"
  exit 0
fi

if ! command -v mmdebstrap >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "offline-base: installing mmdebstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null
  else
    echo "offline-base: mmdebstrap is needed (apt-get install mmdebstrap) to build $tag" >&2
    exit 1
  fi
fi

mkdir -p "$CACHE"
tarball="$CACHE/$name-$SUITE-$key.tar"
find "$CACHE" -maxdepth 1 -name "$name-$SUITE-*.tar*" ! -name "$(basename "$tarball")" -delete
if [ ! -s "$tarball" ]; then
  echo "offline-base: building the $name root filesystem from Debian $SUITE ($packages); this takes minutes"
  start=$SECONDS
  mmdebstrap --quiet --format=tar --variant=essential --include="$packages" \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*' \
    --customize-hook="$hook" \
    "$SUITE" "$tarball.part"
  mv "$tarball.part" "$tarball"
  echo "offline-base: root filesystem built in $((SECONDS - start)) s"
fi

echo "offline-base: importing $tarball as $tag"
start=$SECONDS
docker import \
  --change "LABEL echo-cluster.key=$key" \
  --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  "$tarball" "$tag" >/dev/null
echo "offline-base: imported in $((SECONDS - start)) s"
