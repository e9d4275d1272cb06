#!/usr/bin/env bash
# Which base images `make images` builds on; prints the OFFLINE value to use:
#   0  the pinned upstream images (present here, or pullable)
#   1  images built here from Debian's packages (docker/offline-base.sh)
#
#   docker/base-source.sh OFFLINE IMAGE...
#
# OFFLINE as given: 1 or 0 is taken as is; empty means find out. An image that is
# neither present nor known to a registry within a few seconds sends the build down
# the Debian path, with one line on stderr saying why.
set -euo pipefail

choice=${1:-}
shift || true
case "$choice" in
  0 | 1) echo "$choice"; exit 0 ;;
  "") ;;
  *) echo "make images: OFFLINE must be 1, 0 or empty, not '$choice'" >&2; exit 2 ;;
esac

CHECK_SECONDS=${ECHO_REGISTRY_CHECK_SECONDS:-15}
for image in "$@"; do
  docker image inspect "$image" >/dev/null 2>&1 && continue
  # Asks the registry for the manifest only: quick, and nothing is downloaded yet.
  if ! timeout "$CHECK_SECONDS" docker manifest inspect "$image" >/dev/null 2>&1; then
    echo "make images: $image cannot be had here (no registry answers); building the base images from Debian's packages instead (OFFLINE=1)" >&2
    echo 1
    exit 0
  fi
done
echo 0
