# embgate: build with `docker build -t embgate .`, run with
# `docker run -p 8080:8080 -v embgate-data:/data embgate` (the cache in the
# embedded store, /data/cache.redb on that volume), or with
# `-e EMBGATE__STORE__URL=redis://HOST:6379/0` for a Redis shared by gateways.

# ---- build -----------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src

# Dependencies first: with only the manifests and stub sources, this layer
# stays cached until Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
COPY fake-vendor/Cargo.toml fake-vendor/Cargo.toml
RUN mkdir -p src fake-vendor/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs fake-vendor/src/lib.rs \
    && echo 'fn main() {}' > fake-vendor/src/main.rs \
    && cargo build --release --locked --bin embgate \
    && rm -rf src fake-vendor/src

# Then the sources. touch: the stubs above are newer than the checked-out
# files, and cargo must not take the stub build for up to date.
COPY . .
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin embgate \
    && cp target/release/embgate /usr/local/bin/embgate

# ---- runtime ---------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 embgate \
    && useradd --system --uid 10001 --gid embgate --no-create-home --shell /usr/sbin/nologin embgate \
    && mkdir /data && chown 10001:10001 /data
COPY --from=builder /usr/local/bin/embgate /usr/local/bin/embgate

USER 10001:10001
ENV EMBGATE__LISTEN=0.0.0.0:8080 \
    EMBGATE__STORE__PATH=/data/cache.redb \
    RUST_LOG=info
VOLUME /data
EXPOSE 8080

# No curl in the slim image: bash's /dev/tcp asks /healthz on the default port.
HEALTHCHECK --interval=30s --timeout=3s --start-period=5s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /healthz HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]

ENTRYPOINT ["embgate"]
CMD ["serve"]
