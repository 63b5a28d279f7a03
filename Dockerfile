# syntax=docker/dockerfile:1
# The shop's image: the `shoal` binary (control plane, gateway) and every shop
# service, built once. One image for all of them, on purpose: the thirteen programs
# share almost every dependency, so one build and one set of layers is far smaller
# and faster than thirteen; each container (deploy/compose.yaml, deploy/k8s/shop.yaml)
# picks its program with its command. See docs/deployment.md.
#
#   docker build -t shoal:latest .

# --- build ---------------------------------------------------------------------------
FROM rust:1.89-bookworm AS builder
WORKDIR /build
COPY . .
# The package list is `[build]` in shoal.toml, plus the CLI. The cache mounts keep
# the registry and target/ between builds; the binaries are copied out of target/
# in the same step, since a cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/build/target \
    cargo build --release --locked -p shoal-cli \
      -p shop-identity -p shop-catalog -p shop-customers -p shop-inventory \
      -p shop-payment-provider -p shop-payments -p shop-orders -p shop-shipping \
      -p shop-notifications -p shop-legacy -p shop-reviews -p shop-depot \
 && mkdir -p /out/bin /out/app/shop/api /out/app/.shoal /out/data \
 && cp target/release/shoal target/release/shop-* /out/bin/ \
 && rm -f /out/bin/*.d \
 && cp shoal.toml /out/app/ \
 && cp shop/api/*.json /out/app/shop/api/ \
 && mkdir -p /out/app/shop/recommendations \
 && cp shop/recommendations/*.py shop/recommendations/*.toml /out/app/shop/recommendations/

# --- run -----------------------------------------------------------------------------
# distroless python3: the cc base (glibc and libgcc: TLS is rustls on ring, SQLite
# is compiled in) plus Python 3 for the one app in another language
# (shop/recommendations, behind `shoal sidecar`); no shell, no package manager; its
# `nonroot` user is 65532. Its python3 entrypoint is replaced below.
FROM gcr.io/distroless/python3-debian12:nonroot
COPY --from=builder /out/bin/ /usr/local/bin/
# The gateway reads shop/api/*.json relative to the system file, so both live in
# /app, with the recommendations app and its sidecar's config. /app/.shoal (the control plane's state) and /data (a service's files) are
# owned by the user, so that volumes mounted there start writable.
COPY --from=builder --chown=65532:65532 /out/app/ /app/
COPY --from=builder --chown=65532:65532 /out/data/ /data/
WORKDIR /app
USER 65532:65532
# The control plane, the gateway, a service's main and health ports.
EXPOSE 7070 8080 7000 8081
ENTRYPOINT ["/usr/local/bin/shoal"]
CMD ["--help"]
