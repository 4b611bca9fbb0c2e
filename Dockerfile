# syntax=docker/dockerfile:1
# provider-proxy: one binary, every role a subcommand (controller, sidecar, check, crd).
#   make image                      # docker build -t ghcr.io/provider-proxy/provider-proxy:dev .
#   docker run --rm IMAGE --help

# Build: the release binary, glibc-linked (rustls with ring; no OpenSSL), optimised with a
# profile of its own hot path (bench/pgo.sh: an instrumented build runs the benchmark's
# workloads against nginx, Squid and Dante on loopback, then the profile guides the final
# build; ~20 % fewer instructions per request). Those servers and rustc's llvm-profdata
# are needed here only.
FROM rust:1-bookworm AS build
# `--build-arg PGO=off`: the plain release build (~20 % more CPU per request), e.g. where
# the builder cannot run the training.
ARG PGO=on
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      nginx-light squid dante-server apache2-utils \
 && rm -rf /var/lib/apt/lists/* \
 && rustup component add llvm-tools
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    PGO="$PGO" bench/pgo.sh \
 && install -D -m 0755 target/pgo/provider-proxy /out/provider-proxy

# Run: distroless with glibc and libgcc (cc), no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="provider-proxy" \
      org.opencontainers.image.description="Per-provider outbound proxies (HTTP, HTTPS, SOCKS5, SOCKS4) for AI APIs, Kubernetes-native" \
      org.opencontainers.image.source="https://github.com/provider-proxy/provider-proxy" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/provider-proxy /provider-proxy
# Numeric, so the kubelet can verify runAsNonRoot; 65532 is distroless' `nonroot`, the
# chart's runAsUser.
USER 65532:65532
# 15090 sidecar admin, 15091 controller admin, 15443 snapshots (the sidecar's 15080 is loopback only).
EXPOSE 15090 15091 15443
ENTRYPOINT ["/provider-proxy"]
