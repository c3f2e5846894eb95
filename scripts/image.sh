#!/usr/bin/env bash
# Builds the Palisade container image with podman, offline: a Debian bookworm
# base made locally with debootstrap (no registry is reached), the release
# binaries built on this machine, and the Dockerfile's `prebuilt` stage.
# Prints the image tag last: localhost/palisade:<workspace version>.
#
#   ./scripts/image.sh              build (root; needs podman, runc, debootstrap)
#   ./scripts/image.sh --base-only  only make the base image
#   ./scripts/image.sh --debug      from the debug build, tagged <version>-debug
#   ./scripts/image.sh --prebuilt   from the binaries already in target/, not built again (what
#                                   tests use: other tests run those binaries meanwhile)
#
# Where docker.io is reachable, `docker build -t palisade .` builds the same
# image from source (the Dockerfile's default `runtime` stage) instead.
# podman runs with deploy/podman/containers.conf (runc, cgroupfs, ulimits).
set -euo pipefail
cd "$(dirname "$0")/.."
export CONTAINERS_CONF="$PWD/deploy/podman/containers.conf"

base_only=0
prebuilt=0
profile=release
for a in "$@"; do
  case "$a" in
    --base-only) base_only=1 ;;
    --debug) profile=debug ;;
    --prebuilt) prebuilt=1 ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $a (use --base-only, --debug, --prebuilt or --help)" >&2; exit 64 ;;
  esac
done
for t in podman runc debootstrap; do
  command -v "$t" >/dev/null || { echo "error: $t is not installed (apt-get install podman runc debootstrap)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "error: run as root (debootstrap and rootful podman)" >&2; exit 1; }

version=$(cargo metadata --no-deps --format-version 1 \
  | python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="palisade-cmd"))')
# The tag names the recipe below: change it when the recipe changes.
base=localhost/palisade-base:bookworm-r2
image=localhost/palisade:$version
[ "$profile" = debug ] && image=$image-debug

# 1. The base: Debian bookworm minbase with iptables, made once and kept.
if ! podman image exists "$base"; then
  root=$(mktemp -d /tmp/palisade-rootfs.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  echo "making $base with debootstrap (a few minutes, once)..." >&2
  debootstrap --variant=minbase --include=iptables bookworm "$root" http://deb.debian.org/debian >"$root.log" 2>&1 \
    || { tail -20 "$root.log" >&2; echo "error: debootstrap failed (log: $root.log)" >&2; exit 1; }
  # Nothing a container needs: package lists, caches, docs, logs, message
  # translations and iconv modules (the programs log in English, UTF-8 only).
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
         "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/* \
         "$root"/usr/share/locale/* "$root"/usr/lib/x86_64-linux-gnu/gconv
  tar -C "$root" -c . | podman import --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
  rm -f "$root.log"
fi
if [ "$base_only" = 1 ]; then
  echo "$base"
  exit 0
fi

# 2. The binaries, built here, into the build context.
if [ "$prebuilt" = 1 ]; then
  # Rebuilding could re-link binaries that other processes are running.
  for b in palisade palisade-control-plane palisade-sidecar palisadectl; do
    [ -x "target/$profile/$b" ] || { echo "error: --prebuilt: target/$profile/$b is missing (cargo build --workspace --bins)" >&2; exit 1; }
  done
elif [ "$profile" = release ]; then
  cargo build --release --locked --bins -p palisade-control-plane -p palisade-sidecar -p palisadectl -p palisade-cmd >&2
else
  cargo build --locked --bins -p palisade-control-plane -p palisade-sidecar -p palisadectl -p palisade-cmd >&2
fi
rm -rf image-bin && mkdir image-bin
trap 'rm -rf image-bin' EXIT
for b in palisade palisade-control-plane palisade-sidecar palisadectl; do
  cp "target/$profile/$b" image-bin/
done
strip image-bin/* 2>/dev/null || true

# 3. The image: the Dockerfile's prebuilt stage on the local base.
previous=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
podman build --quiet --target prebuilt --build-arg "BASE_IMAGE=$base" --build-arg "VERSION=$version" \
  -t "$image" -f Dockerfile . >&2
# The image this tag named before is left untagged: remove it (unless a container uses it).
current=$(podman image inspect --format '{{.Id}}' "$image")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
  podman rmi "$previous" >/dev/null 2>&1 || true
fi
echo "$image"
