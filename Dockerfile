# Portcullis container image. Build from the repository root:
#   docker build -f deploy/Dockerfile -t portcullis .
# The top-level Dockerfile is an identical copy (tests/deploy.rs holds the two equal and checks the rules below).
#
# The image holds the binary and CA roots only: no config, no demo accounts, no keys. `run` (the default command)
# reads /etc/portcullis/gateway.toml, which you mount; `docker run -p 8443:8443 … portcullis demo --bind 0.0.0.0`
# runs the demo from the config and accounts built into the binary.

# 1. Dependencies only, built against a stub crate. This layer depends on Cargo.toml and Cargo.lock alone, so a
#    change to src/ reuses it instead of compiling aws-lc and every other crate again.
FROM rust:1-bookworm AS deps
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# The allocator's settings (jemalloc's malloc_conf) are fixed at build time from .cargo/config.toml.
COPY .cargo/config.toml ./.cargo/
# The stub needs every target Cargo.toml declares, or cargo refuses the manifest; the bench stub stays for the
# next stage, which does not build benches and so needs none of their real files.
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > benches/hot_path.rs \
    && cargo build --release --locked --bin portcullis \
    && rm -rf src

# 2. The gateway itself, then its debug info split off into portcullis.debug and the binary stripped.
FROM deps AS build
COPY src ./src
# Embedded by the binary for `portcullis demo` (the runtime stage copies neither).
COPY gateway.toml ./
COPY examples/demo-users.toml examples/demo-clients.toml ./examples/
# COPY keeps the context's mtimes, which may be older than the stub's build: touch so cargo rebuilds the crate.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin portcullis \
    && mkdir /out \
    && objcopy --only-keep-debug target/release/portcullis /out/portcullis.debug \
    && strip --strip-all -o /out/portcullis target/release/portcullis \
    && objcopy --add-gnu-debuglink=/out/portcullis.debug /out/portcullis \
    && /out/portcullis --version

# The split-off debug info, for symbolising a crash dump:
#   docker build -f deploy/Dockerfile --target debuginfo --output type=local,dest=debug .
FROM scratch AS debuginfo
COPY --from=build /out/portcullis.debug /

# 3. The runtime: the stripped binary on a small base, as a numeric non-root user (Kubernetes' runAsNonRoot can
#    only verify a numeric one).
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 portcullis \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home portcullis \
    && mkdir -p /etc/portcullis
COPY --from=build /out/portcullis /usr/local/bin/portcullis
USER 10001:10001
# An empty folder: `demo` finds no gateway.toml here, so it runs its built-in config (written under /tmp).
WORKDIR /var/lib/portcullis
EXPOSE 8443 8080 9090
# Asks the admin listener's /readyz (127.0.0.1:9090 by default). With the admin listener elsewhere, override it:
#   docker run --health-cmd 'portcullis healthcheck --url http://127.0.0.1:9191/readyz' …
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["/usr/local/bin/portcullis", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/portcullis"]
# Without a mounted config the gateway refuses to start, rather than fall back to the demo.
CMD ["run", "--config", "/etc/portcullis/gateway.toml"]
