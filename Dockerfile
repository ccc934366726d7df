# One image for the controller and the node plugin.
#   docker build -t ghcr.io/strata-csi/strata:0.1.0 .
# scripts/image.sh builds the same layout without Docker (mmdebstrap + an image writer): the
# release binary (debug info stripped by the release profile) at /usr/local/bin/strata on a
# bookworm runtime with the same packages, user 65532, that entrypoint.
# Build stage: the Rust toolchain (protoc comes from a crate; no system packages are needed).
FROM docker.io/library/rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked && cp target/release/strata /strata && strip --strip-all /strata

# Runtime: the tools the node plugin drives (loop devices, mkfs, mount, fsfreeze, resize, reflink cp).
# Lazy restore needs no package: its hydrator mounts FUSE itself (mount(2), no fusermount or
# libfuse), through /dev/fuse from the host /dev the privileged node pod mounts.
FROM docker.io/library/debian:12.12-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates e2fsprogs xfsprogs util-linux mount coreutils \
 && rm -rf /var/lib/apt/lists/* /usr/share/doc /usr/share/man /usr/share/locale
COPY --from=build /strata /usr/local/bin/strata
# Non-root by default (the controller); the node DaemonSet runs this image as root, privileged.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/strata"]
