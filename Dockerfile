# tidegate: multi-stage build of a static-ish binary into a minimal, non-root runtime image.
#
#   docker build -t tidegate .
#   docker run --rm tidegate --help
#
# Supervisor mode (tidegate as the app container's entrypoint): copy the binary into the app
# image instead and make it the entrypoint:
#   COPY --from=tidegate /usr/local/bin/tidegate /usr/local/bin/tidegate
#   ENTRYPOINT ["/usr/local/bin/tidegate", "--max-concurrency", "4", "--"]
#   CMD ["gunicorn", "-w", "4", "-b", "127.0.0.1:8000", "app:app"]

FROM rust:1.95.0-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY examples ./examples
COPY benches ./benches
RUN cargo build --release --locked --bin tidegate

# glibc and libgcc only; no shell, no package manager; runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/tidegate /usr/local/bin/tidegate
USER 65532:65532
# 8080: proxied traffic; 9901: admin lane (probes, metrics, /prestop). Kubernetes probes
# check health, so there is no HEALTHCHECK.
EXPOSE 8080 9901
ENTRYPOINT ["/usr/local/bin/tidegate"]
