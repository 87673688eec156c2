#!/usr/bin/env bash
# Build (and push) pneumoscope's images: serving, web, pipeline.
#
#   docker/build.sh [--registry REGISTRY] [--tag TAG] [--base-image IMAGE] [--push] [--build-arg K=V]... IMAGE...
#
# Images are tagged REGISTRY/NAME:TAG (default ghcr.io/pneumoscope/NAME:<package version>). The host's CA
# bundle and pip index settings go in as BuildKit secrets (never into a layer or the image history). A rebuild
# removes the image it untagged, unless a container still uses it.
# Prints one line per image: name, size, build seconds. Exits non-zero with one line when the Docker
# engine is missing or a build fails.
set -euo pipefail
cd "$(dirname "$0")/.."
DOCKER=${DOCKER:-/usr/bin/docker}
REGISTRY=ghcr.io/pneumoscope
TAG=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)
BASE_IMAGE=""
PUSH=0
EXTRA=()
IMAGES=()
while [ $# -gt 0 ]; do
    case "$1" in
        --registry) REGISTRY=${2%/}; shift 2 ;;
        --tag) TAG=$2; shift 2 ;;
        --base-image) BASE_IMAGE=$2; shift 2 ;;
        --push) PUSH=1; shift ;;
        --build-arg) EXTRA+=(--build-arg "$2"); shift 2 ;;
        serving|web|pipeline) IMAGES+=("$1"); shift ;;
        *) echo "docker/build.sh: unknown argument $1 (images: serving, web, pipeline)" >&2; exit 2 ;;
    esac
done
[ ${#IMAGES[@]} -gt 0 ] || IMAGES=(serving web pipeline)

if ! "$DOCKER" info >/dev/null 2>&1; then
    echo "make images: no working Docker engine ($DOCKER info fails): start dockerd or set DOCKER_HOST" >&2
    exit 1
fi

secrets=$(mktemp -d)
trap 'rm -rf "$secrets"' EXIT
SECRET_ARGS=()
for ca in "${PIP_CERT:-}" "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt; do
    if [ -n "$ca" ] && [ -s "$ca" ]; then SECRET_ARGS+=(--secret "id=hostca,src=$ca"); break; fi
done
# Only the index settings travel (not constraint files or local paths that the build cannot see).
PY=$(command -v python3)
"$PY" - "$secrets/pip.conf" <<'PYEOF'
import os, subprocess, sys
keys = ("index-url", "extra-index-url", "trusted-host", "timeout", "retries")
lines = {}
try:
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
except OSError:
    out = ""
for line in out.splitlines():
    name, _, value = line.partition("=")
    key = name.split(".", 1)[-1]
    if key in keys:
        value = value.strip().strip("'\"")
        # local file:// indexes do not exist inside the build
        value = " ".join(v for v in value.split() if not v.startswith("file:"))
        if value:
            lines[key] = value
for key in keys:
    env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
    if env:
        lines[key] = env
with open(sys.argv[1], "w") as f:
    f.write("[global]\n" + "".join(f"{k} = {v}\n" for k, v in lines.items()))
PYEOF
SECRET_ARGS+=(--secret "id=pipconf,src=$secrets/pip.conf")

commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
[ -z "$(git status --porcelain 2>/dev/null)" ] || commit="$commit-dirty"
for name in "${IMAGES[@]}"; do
    ref="$REGISTRY/$name:$TAG"
    args=(--build-arg "VERSION=$TAG" --build-arg "GIT_COMMIT=$commit")
    [ -z "$BASE_IMAGE" ] || args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
    start=$(date +%s)
    previous=$("$DOCKER" image inspect -f '{{.Id}}' "$ref" 2>/dev/null || true)
    if ! DOCKER_BUILDKIT=1 "$DOCKER" build --progress=plain -f "docker/$name.Dockerfile" -t "$ref" \
            "${args[@]}" "${EXTRA[@]}" "${SECRET_ARGS[@]}" . >"$secrets/build.log" 2>&1; then
        tail -n 30 "$secrets/build.log" >&2
        echo "make images: building $ref failed (last lines above)" >&2
        exit 1
    fi
    size=$("$DOCKER" image inspect -f '{{.Size}}' "$ref")
    # A rebuild moves the tag: the image it leaves untagged (half a GB each) goes, unless something still uses it.
    if [ -n "$previous" ] && [ "$previous" != "$("$DOCKER" image inspect -f '{{.Id}}' "$ref")" ] &&
            [ -z "$("$DOCKER" image inspect -f '{{join .RepoTags ""}}' "$previous" 2>/dev/null)" ]; then
        "$DOCKER" image rm "$previous" >/dev/null 2>&1 || true
    fi
    echo "built $ref  $((size / 1000000)) MB  $(( $(date +%s) - start )) s"
    if [ "$PUSH" = 1 ]; then
        host=${REGISTRY%%/*}
        if ! "$PY" -c "import socket,sys; h,_,p=sys.argv[1].partition(':'); socket.create_connection((h, int(p or 443)), 5)" "$host" 2>/dev/null; then
            echo "not pushed: registry $host cannot be reached from here"
            continue
        fi
        "$DOCKER" push "$ref" >/dev/null || { echo "make images: pushing $ref failed" >&2; exit 1; }
        echo "pushed $ref"
    fi
done
