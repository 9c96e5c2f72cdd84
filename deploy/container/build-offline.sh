#!/bin/sh
# Build ksift's image without an image registry: the Containerfile's base (Debian 12 slim) is made
# with mmdebstrap from Debian's package archive and imported into podman, then the same
# Containerfile runs on it. Tested by tests/kernel/test_container.py; docs/deploy.md, "Container image".
#
#   deploy/container/build-offline.sh dist/ksift-0.1.0-py3-none-manylinux_2_17_x86_64.whl ksift:0.1.0
#
# Environment: PODMAN (default "podman"), BUILD_OPTS (more `podman build` options, e.g. --ulimit or
# --secret id=ca,src=...), BASE (default localhost/debian-mmdebstrap:12-slim, made once and reused;
# REFRESH_BASE=1 makes it again, e.g. for security updates).
set -eu

if [ $# -ne 2 ] || [ ! -f "$1" ]; then
    echo "usage: $0 WHEEL IMAGE_TAG" >&2
    exit 2
fi
wheel=$1
tag=$2
podman=${PODMAN:-podman}
base=${BASE:-localhost/debian-mmdebstrap:12-slim}
here=$(cd "$(dirname "$0")" && pwd)

if [ "${REFRESH_BASE:-0}" = 1 ] || ! $podman image exists "$base"; then
    # minbase is what debian:12-slim is made from (debuerreotype): essential packages and apt, with the
    # same three suites in its sources; man pages, docs and locales are left out as slim does.
    rootfs=$(mktemp --suffix=.tar)
    trap 'rm -f "$rootfs"' EXIT
    mmdebstrap --variant=minbase --quiet \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        bookworm "$rootfs" \
        "deb http://deb.debian.org/debian bookworm main" \
        "deb http://deb.debian.org/debian bookworm-updates main" \
        "deb http://deb.debian.org/debian-security bookworm-security main"
    $podman import --change 'CMD ["bash"]' "$rootfs" "$base"
fi

# The build context holds the wheel only.
context=$(mktemp -d)
trap 'rm -rf "$context" ${rootfs:+"$rootfs"}' EXIT
cp "$wheel" "$context/"
# shellcheck disable=SC2086 # BUILD_OPTS is a list of options
$podman build ${BUILD_OPTS:-} --network host --build-arg BASE="$base" -f "$here/Containerfile" -t "$tag" "$context"
