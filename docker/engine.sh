#!/usr/bin/env bash
# Make sure a Docker engine answers: install Debian's docker.io when it is missing and start dockerd
# (as root, no systemd) when it is not running. Used by `make docker-engine` (and so by `make test`,
# `make images`). Prints one line and exits non-zero when no engine can be had.
set -uo pipefail
DOCKER=${DOCKER:-/usr/bin/docker}
LOG=${DOCKERD_LOG:-/var/log/pneumoscope-dockerd.log}

fail() { echo "docker: $*" >&2; exit 1; }

"$DOCKER" info >/dev/null 2>&1 && exit 0

if [ ! -x /usr/sbin/dockerd ] || [ ! -x "$DOCKER" ]; then
    [ "$(id -u)" = 0 ] || fail "no Docker engine here and not root: install docker.io (Debian) or point DOCKER_HOST at an engine"
    command -v apt-get >/dev/null || fail "no Docker engine here and no apt-get to install docker.io"
    flock /tmp/apt.lock sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null' \
        || fail "apt-get install docker.io failed"
fi

[ "$(id -u)" = 0 ] || fail "the Docker engine is not running and only root can start dockerd"
(
    flock 9
    if ! "$DOCKER" info >/dev/null 2>&1; then
        # setsid: dockerd outlives this shell (and make); its log goes to $LOG.
        setsid /usr/sbin/dockerd >>"$LOG" 2>&1 < /dev/null &
        for _ in $(seq 1 60); do
            "$DOCKER" info >/dev/null 2>&1 && break
            sleep 0.5
        done
    fi
) 9>/tmp/dockerd.lock
"$DOCKER" info >/dev/null 2>&1 || fail "dockerd did not start; see $LOG ($(tail -n 1 "$LOG" 2>/dev/null))"
