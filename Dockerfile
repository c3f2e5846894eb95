# syntax=docker/dockerfile:1
# Palisade: one image for the control plane, the sidecar, its init container
# and palisadectl. The entrypoint `palisade` runs the program named by its
# first argument (control-plane | sidecar | init | ctl); no shell is needed.
#
# Stages:
#   build     compiles the workspace on the official Rust image.
#   base      the run-time base: Debian bookworm, plus iptables for `init`.
#   prebuilt  the image from binaries built outside (context dir image-bin/);
#             what scripts/image.sh builds where no registry is reachable.
#   runtime   (default) the image from the build stage.
#
#   docker build -t palisade .                                  (needs docker.io)
#   ./scripts/image.sh                                          (offline: podman, host-built binaries)

ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
        -p palisade-control-plane -p palisade-sidecar -p palisadectl -p palisade-cmd \
    && mkdir /out \
    && cp target/release/palisade target/release/palisade-control-plane \
          target/release/palisade-sidecar target/release/palisadectl /out/

FROM ${BASE_IMAGE} AS base
# iptables (nft and legacy back ends) for the init container; nothing else.
RUN if ! command -v iptables-restore >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends iptables \
        && rm -rf /var/lib/apt/lists/*; \
    fi
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="palisade" \
      org.opencontainers.image.description="Palisade service mesh: control plane, sidecar proxy, init and palisadectl" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/palisade-mesh/palisade" \
      org.opencontainers.image.licenses="Apache-2.0"
# The control plane's user; pods set the sidecar's (1337) and init's (0) themselves.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/palisade"]
CMD ["--help"]

FROM base AS prebuilt
COPY image-bin/palisade image-bin/palisade-control-plane image-bin/palisade-sidecar image-bin/palisadectl /usr/local/bin/

FROM base AS runtime
COPY --from=build /out/ /usr/local/bin/
