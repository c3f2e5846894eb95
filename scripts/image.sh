#!/usr/bin/env bash
# Builds the Palisade container image with podman, offline: no registry and no
# package mirror is reached. The image holds only the four programs (built on
# this machine), the C library they link, and iptables for `init`: the nft and
# legacy back ends with their shared libraries and the four xtables extensions
# init's rules use. They are copied, with their shared-object closure (ldd),
# from this machine's own files (Debian 12, with iptables installed: the
# system the programs are linked on) into a root file system that the
# Dockerfile's `prebuilt` stage (FROM scratch) takes whole.
# Prints the image tag last: localhost/palisade:<workspace version>.
#
#   ./scripts/image.sh                  build (root; needs podman, runc, iptables, binutils)
#   ./scripts/image.sh --debug          from the debug build, tagged <version>-debug
#   ./scripts/image.sh --prebuilt       from the binaries already in $CARGO_TARGET_DIR (default
#                                       target/), not built again (what tests use: other tests run
#                                       those binaries meanwhile)
#   ./scripts/image.sh --rootfs DIR BIN_DIR
#                                       only assemble the root file system into DIR (new) from the
#                                       four programs in BIN_DIR (what the Dockerfile's `rootfs`
#                                       stage runs; no root or podman needed)
#   ./scripts/image.sh --apps           the test and demo apps' image, localhost/palisade-testapp:e2e
#                                       (tests/podman/app.Containerfile, prints the tag last) on
#                                       localhost/palisade-demo-base:bookworm-r1 (Debian bookworm
#                                       minbase with python3), made once with debootstrap: that
#                                       needs the Debian mirror, http://deb.debian.org
#
# Where docker.io is reachable, `docker build -t palisade .` builds the same
# image from source (the Dockerfile's default `runtime` stage) instead.
# podman runs with deploy/podman/containers.conf (runc, cgroupfs, ulimits).
set -euo pipefail

programs=(palisade palisade-control-plane palisade-sidecar palisadectl)
# The xtables extensions of init's rules (sidecar/src/init.rs): -j RETURN and
# user chains (standard), -m tcp --dport, -m owner --uid-owner, -j REDIRECT.
extensions=(libxt_standard.so libxt_tcp.so libxt_owner.so libxt_REDIRECT.so)

# copy_path ROOT PATH: PATH from this machine into ROOT at the same place;
# a symbolic link is copied as a link, then what it points to.
copy_path() {
  local root=$1 dir file target
  dir=$(realpath -e -- "$(dirname -- "$2")")
  file=$dir/$(basename -- "$2")
  [ -e "$root$file" ] || [ -L "$root$file" ] && return 0
  mkdir -p "$root$dir"
  if [ -L "$file" ]; then
    target=$(readlink -- "$file")
    ln -s -- "$target" "$root$file"
    case "$target" in /*) ;; *) target=$dir/$target ;; esac
    copy_path "$root" "$target"
  else
    cp -p -- "$file" "$root$file"
  fi
}

# copy_libs ROOT FILE: the shared objects FILE loads (ldd), which must all be
# found on this machine.
copy_libs() {
  local root=$1 file=$2 out lib
  out=$(ldd "$file" 2>&1) || { case "$out" in *"not a dynamic executable"*) return 0 ;; esac; echo "error: ldd $file: $out" >&2; exit 1; }
  if grep -q 'not found' <<<"$out"; then
    echo "error: $file needs shared objects this machine lacks:" >&2
    grep 'not found' <<<"$out" >&2
    exit 1
  fi
  for lib in $(awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' <<<"$out"); do
    copy_path "$root" "$lib"
  done
}

copy_with_libs() {
  copy_path "$1" "$2"
  copy_libs "$1" "$2"
}

# assemble ROOT BIN_DIR: the image's whole root file system.
assemble() {
  local root=$1 bins=$2 b xtables
  [ ! -e "$root" ] || { echo "error: $root exists (the root file system is made in a new directory)" >&2; exit 1; }
  for t in ldd xtables-nft-multi xtables-legacy-multi; do
    command -v "$t" >/dev/null || { echo "error: $t is not installed (apt-get install libc-bin iptables)" >&2; exit 1; }
  done
  mkdir -p "$root"/usr/local/bin "$root"/usr/sbin "$root"/etc "$root"/run "$root"/tmp "$root"/root
  chmod 1777 "$root/tmp"
  chmod 0700 "$root/root"
  # Merged /usr: the loader is found as /lib64/ld-linux-*.so.2.
  for d in /lib /lib32 /lib64; do
    [ -L "$d" ] && ln -s "$(readlink "$d")" "$root$d"
  done
  for b in "${programs[@]}"; do
    [ -x "$bins/$b" ] || { echo "error: $bins/$b is missing" >&2; exit 1; }
    install -m 0755 "$bins/$b" "$root/usr/local/bin/$b"
    if command -v strip >/dev/null; then strip "$root/usr/local/bin/$b"; fi
    copy_libs "$root" "$bins/$b"
  done
  # iptables: both back ends; `iptables` is iptables-nft, as on Debian (init
  # runs `iptables`, or what --iptables / PALISADE_IPTABLES names).
  for b in xtables-nft-multi xtables-legacy-multi; do
    copy_with_libs "$root" "$(command -v "$b")"
  done
  for b in iptables ip6tables; do
    ln -s xtables-nft-multi "$root/usr/sbin/$b"
    ln -s xtables-nft-multi "$root/usr/sbin/$b-nft"
    ln -s xtables-legacy-multi "$root/usr/sbin/$b-legacy"
  done
  xtables=$(dirname "$(realpath -e "$(ldd "$(command -v xtables-nft-multi)" | awk '$1 == "libxtables.so.12" {print $3}')")")/xtables
  for b in "${extensions[@]}"; do
    copy_with_libs "$root" "$xtables/$b"
  done
  # Names for the image's users, and files-then-DNS name lookups (glibc's
  # default without this file asks DNS first, even for localhost).
  printf '%s\n' 'root:x:0:0:root:/root:/usr/sbin/nologin' \
    'palisade-proxy:x:1337:1337:palisade sidecar:/nonexistent:/usr/sbin/nologin' \
    'nonroot:x:65532:65532:palisade control plane:/nonexistent:/usr/sbin/nologin' >"$root/etc/passwd"
  printf '%s\n' 'root:x:0:' 'palisade-proxy:x:1337:' 'nonroot:x:65532:' >"$root/etc/group"
  printf '%s\n' 'passwd: files' 'group: files' 'hosts: files dns' >"$root/etc/nsswitch.conf"
  # Reproducible: the same inputs give the same files, owners and times.
  chown -hR 0:0 "$root" 2>/dev/null || true
  find "$root" -exec touch -h -d @"${SOURCE_DATE_EPOCH:-0}" {} +
}

mode=image
prebuilt=0
profile=release
while [ $# -gt 0 ]; do
  case "$1" in
    --debug) profile=debug ;;
    --prebuilt) prebuilt=1 ;;
    --apps) mode=apps ;;
    --rootfs)
      [ $# -ge 3 ] || { echo "error: --rootfs needs DIR and BIN_DIR" >&2; exit 64; }
      assemble "$(realpath -m -- "$2")" "$(realpath -e -- "$3")"
      exit 0 ;;
    -h|--help) sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $1 (use --debug, --prebuilt, --rootfs, --apps or --help)" >&2; exit 64 ;;
  esac
  shift
done
# Relative to where the script is called from, as cargo takes it.
target=$(realpath -m -- "${CARGO_TARGET_DIR:-$(dirname "$0")/../target}")
cd "$(dirname "$0")/.."
export CONTAINERS_CONF="$PWD/deploy/podman/containers.conf"
need=(podman runc)
[ "$mode" = apps ] && need+=(debootstrap)
for t in "${need[@]}"; do
  command -v "$t" >/dev/null || { echo "error: $t is not installed (apt-get install ${need[*]})" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "error: run as root (rootful podman)" >&2; exit 1; }

# replace IMAGE: the image this tag named before is left untagged; remove it
# (unless a container uses it).
replace() {
  local current
  current=$(podman image inspect --format '{{.Id}}' "$1")
  if [ -n "$2" ] && [ "$2" != "$current" ]; then
    podman rmi "$2" >/dev/null 2>&1 || true
  fi
}

if [ "$mode" = apps ]; then
  # The tag names the recipe below: change it when the recipe changes.
  base=localhost/palisade-demo-base:bookworm-r1
  apps=localhost/palisade-testapp:e2e
  if ! podman image exists "$base"; then
    root=$(mktemp -d /tmp/palisade-demo-rootfs.XXXXXX)
    trap 'rm -rf "$root" "$root.log"' EXIT
    echo "making $base with debootstrap from http://deb.debian.org (a few minutes, once)..." >&2
    debootstrap --variant=minbase --include=python3 bookworm "$root" http://deb.debian.org/debian >"$root.log" 2>&1 \
      || { tail -20 "$root.log" >&2; echo "error: debootstrap failed (it needs http://deb.debian.org)" >&2; exit 1; }
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
           "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/* \
           "$root"/usr/share/locale/*
    tar -C "$root" -c . | podman import --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
  fi
  previous=$(podman image inspect --format '{{.Id}}' "$apps" 2>/dev/null || true)
  podman build --quiet --build-arg "BASE_IMAGE=$base" -t "$apps" -f tests/podman/app.Containerfile . >&2
  replace "$apps" "$previous"
  echo "$apps"
  exit 0
fi

version=$(cargo metadata --no-deps --format-version 1 \
  | python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="palisade-cmd"))')
image=localhost/palisade:$version
[ "$profile" = debug ] && image=$image-debug

# 1. The binaries, built here.
if [ "$prebuilt" = 1 ]; then
  # Rebuilding could re-link binaries that other processes are running.
  for b in "${programs[@]}"; do
    [ -x "$target/$profile/$b" ] || { echo "error: --prebuilt: $target/$profile/$b is missing (cargo build --workspace --bins)" >&2; exit 1; }
  done
elif [ "$profile" = release ]; then
  cargo build --release --locked --bins -p palisade-control-plane -p palisade-sidecar -p palisadectl -p palisade-cmd >&2
else
  cargo build --locked --bins -p palisade-control-plane -p palisade-sidecar -p palisadectl -p palisade-cmd >&2
fi

# 2. The root file system, in the build context.
rm -rf image-rootfs
trap 'rm -rf image-rootfs' EXIT
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)} \
  assemble "$PWD/image-rootfs" "$target/$profile"

# 3. The image: the Dockerfile's prebuilt stage, FROM scratch.
previous=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
podman build --quiet --target prebuilt --build-arg "VERSION=$version" -t "$image" -f Dockerfile . >&2
replace "$image" "$previous"
echo "$image"
