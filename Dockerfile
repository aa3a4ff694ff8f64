# sidekey container image.
#
#   docker build -t sidekey:0.1.0 --build-arg VERSION=0.1.0 .
#
# Two stages: compile with the official Rust image, run on distroless (no shell, no package
# manager, uid 65532). CI cannot pull these base images (no registry), so it builds this file's
# runtime stage FROM scratch instead (the release binary and the libraries ldd lists, every other
# runtime instruction copied from here) and runs it as the manifests do: deploy/image/smoke.sh.
# It fails on any runtime-stage instruction it cannot mirror. .ci/validate-deploy.sh lints this
# file (hadolint); .ci/rust-version.sh checks the rust pin below against Cargo.toml.
#
# The image needs a config: mount one at /etc/sidekey/sidekey.toml (see deploy/), or replace the
# CMD, e.g. `docker run ... sidekey:0.1.0 --config /path/in/container.toml`.

# ---- build ----------------------------------------------------------------------------------
# Pinned to the crate's rust-version (Cargo.toml) so the image is built by the compiler we
# promise to support; bump the two together. bookworm matches the runtime's glibc (Debian 12).
FROM rust:1.88-bookworm AS build

# bash with pipefail for the version check below (a failing command in a pipe fails the build).
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when Cargo.toml or Cargo.lock
# changes, not on every source edit.
COPY Cargo.toml Cargo.lock ./

# Stub targets let cargo compile every dependency without our sources. Cargo checks that every
# target Cargo.toml declares exists even when it does not build it, so the benchmark helpers
# ([[example]], [[bench]]) get stubs too; they stay stubs, as a release build never compiles
# them (.ci/validate-deploy.sh checks this list against Cargo.toml). --locked: build exactly the
# versions in Cargo.lock, fail if it is out of date.
RUN mkdir -p src bench benches \
 && for f in src/main.rs bench/upstream.rs bench/client.rs bench/floor.rs benches/request_path.rs; do \
      echo 'fn main() {}' > "$f"; \
    done \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src

# The real sources.
COPY src ./src

# COPY keeps the files' old mtimes, which can be older than the stub build above; touching the
# crate roots makes cargo rebuild sidekey itself (dependencies stay cached).
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked

# Fails the build if the stub binary slipped through: the real one prints "sidekey <version>".
RUN ./target/release/sidekey --version | grep '^sidekey '

# ---- runtime --------------------------------------------------------------------------------
# distroless/cc: glibc, libgcc and CA certificates, nothing else. The binary links glibc
# dynamically; TLS is rustls with ring and webpki roots compiled in, so no OpenSSL. The :nonroot
# tag's default user is 65532 as well.
FROM gcr.io/distroless/cc-debian12:nonroot

# Set at build time: --build-arg VERSION=... --build-arg SOURCE=...
ARG VERSION=0.1.0
ARG SOURCE=https://example.invalid/sidekey

# OCI image labels (shown by registries and `docker inspect`).
LABEL org.opencontainers.image.title="sidekey" \
      org.opencontainers.image.description="A local sidecar proxy that keeps short-lived cloud LLM tokens fresh for any OpenAI SDK" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"

# The one file the image adds.
COPY --from=build /src/target/release/sidekey /usr/local/bin/sidekey

# Numeric, so Kubernetes can verify runAsNonRoot without looking the name up in /etc/passwd.
USER 65532:65532

# 8181: the OpenAI-format proxy (server.listen; loopback by default, so reachable from the same
# pod or network namespace only).
# 9191: admin: /healthz, /readyz, /metrics (server.admin_listen).
# EXPOSE only documents; the config decides what is listened on.
EXPOSE 8181 9191

# Exec form: sidekey is PID 1 and receives SIGTERM directly (first signal: graceful shutdown;
# second: exit at once). No HEALTHCHECK: there is no shell or curl in the image; Kubernetes
# probes /readyz and /healthz instead.
ENTRYPOINT ["/usr/local/bin/sidekey"]
CMD ["--config", "/etc/sidekey/sidekey.toml"]
