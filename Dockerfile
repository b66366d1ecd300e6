# Multi-stage build: a release binary on a small non-root runtime image.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin portcullis

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /var/lib/portcullis portcullis \
    && mkdir -p /etc/portcullis && chown portcullis /etc/portcullis
COPY --from=build /src/target/release/portcullis /usr/local/bin/portcullis
COPY gateway.toml /etc/portcullis/gateway.toml
COPY examples /etc/portcullis/examples
USER portcullis
WORKDIR /etc/portcullis
EXPOSE 8443 8080 9090
# Mount your own gateway.toml (listening on 0.0.0.0, with real certificates) over this one.
ENTRYPOINT ["/usr/local/bin/portcullis"]
CMD ["run", "--config", "/etc/portcullis/gateway.toml"]
