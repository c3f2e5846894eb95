# syntax=docker/dockerfile:1
# Palisade: one image for the control plane, the sidecar, its init container
# and palisadectl. The entrypoint `palisade` runs the program named by its
# first argument (control-plane | sidecar | init | ctl); no shell is needed.
#
# Stages:
#   build     compiles the workspace on the official Rust image.
#   rootfs    the image's root file system, on Debian bookworm with iptables:
#             the four programs, the C library they link and iptables (both
#             back ends, the xtables extensions of init's rules), copied with
#             their shared objects by `scripts/image.sh --rootfs`.
#   base      the image's settings (labels, user, entrypoint) on scratch.
#   prebuilt  base plus a root file system assembled outside (context dir
#             image-rootfs/): what scripts/image.sh builds, offline, from
#             this machine's own files.
#   runtime   (default) base plus the rootfs stage's.
# No shell, package manager, perl or coreutils: nothing runs in the image but
# the programs and iptables.
#
#   docker build -t palisade .          (needs docker.io and the Debian mirror; not run on the
#                                        machines this is tested on, where neither is reachable)
#   ./scripts/image.sh                  (offline: podman, host-built binaries and host files)

ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG DEBIAN_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
        -p palisade-control-plane -p palisade-sidecar -p palisadectl -p palisade-cmd \
    && mkdir /out \
    && cp target/release/palisade target/release/palisade-control-plane \
          target/release/palisade-sidecar target/release/palisadectl /out/ \
    && strip /out/*

FROM ${DEBIAN_IMAGE} AS rootfs
RUN apt-get update && apt-get install -y --no-install-recommends iptables \
    && rm -rf /var/lib/apt/lists/*
COPY scripts/image.sh /usr/local/lib/palisade/image.sh
COPY --from=build /out/ /out/
RUN /usr/local/lib/palisade/image.sh --rootfs /rootfs /out

FROM scratch AS base
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="palisade" \
      org.opencontainers.image.description="Palisade service mesh: control plane, sidecar proxy, init and palisadectl" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/palisade-mesh/palisade" \
      org.opencontainers.image.licenses="Apache-2.0"
# init runs `iptables` from PATH; the programs are found beside `palisade`.
ENV PATH=/usr/local/bin:/usr/sbin
# The control plane's user; pods set the sidecar's (1337) and init's (0) themselves.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/palisade"]
CMD ["--help"]

FROM base AS prebuilt
COPY image-rootfs/ /

FROM base AS runtime
COPY --from=rootfs /rootfs/ /
