#!/usr/bin/env bash
# A local stand-in for the official python:3.11-slim-bookworm image, for machines that cannot pull
# from a registry: debootstrap a minimal Debian bookworm with Debian's python3 (3.11), python3-venv and
# ca-certificates, then `docker import` it. Cached by tag: built once per machine (~1 min).
#
#   docker/base-image.sh [TAG]        # prints the tag; default pneumoscope-base:bookworm-python3.11
set -euo pipefail
TAG=${1:-${PNEUMOSCOPE_BASE_TAG:-pneumoscope-base:bookworm-python3.11}}
DOCKER=${DOCKER:-/usr/bin/docker}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if "$DOCKER" image inspect "$TAG" >/dev/null 2>&1; then
    echo "$TAG"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "base image: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "base image: debootstrap needs root" >&2; exit 1; }

exec 9>/tmp/pneumoscope-base-image.lock
flock 9
if "$DOCKER" image inspect "$TAG" >/dev/null 2>&1; then  # built by someone else while we waited
    echo "$TAG"
    exit 0
fi
root=$(mktemp -d /tmp/pneumoscope-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$MIRROR" \
    >"$root.log" 2>&1 || { echo "base image: debootstrap failed: $(tail -n 1 "$root.log")" >&2; exit 1; }
rm -f "$root.log"
# What a slim image leaves out: package lists, caches, docs, man pages, locales.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
       "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*.log
find "$root"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
tar -C "$root" -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "debootstrap minbase bookworm + python3 + python3-venv + ca-certificates" - "$TAG" >/dev/null
echo "$TAG"
