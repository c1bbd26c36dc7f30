# pgwarp as a sidecar: a small, non-root image that listens on 0.0.0.0:6432.
#
#   docker build -t pgwarp .
#   docker run -p 6432:6432 -e DATABASE_URL=postgres://app:secret@db:5432/app pgwarp
#
# Flags can be appended (`docker run ... pgwarp --pool-size 10`); configuration can also be
# mounted and passed with --config /etc/pgwarp/pgwarp.toml.

FROM rust:1-bookworm AS build
WORKDIR /src
# cmake and clang are needed by the TLS library's build (boring).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends cmake clang libclang-dev \
    && rm -rf /var/lib/apt/lists/*
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src bench && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > bench/idle_clients.rs \
    && cargo build --release --locked \
    && rm -rf src bench
COPY src ./src
COPY bench ./bench
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin pgwarp \
    && strip target/release/pgwarp

FROM debian:bookworm-slim
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin pgwarp \
    && mkdir -p /var/run/pgwarp && chown 10001 /var/run/pgwarp
COPY --from=build /src/target/release/pgwarp /usr/local/bin/pgwarp
COPY configs/pgwarp.toml /etc/pgwarp/pgwarp.example.toml
USER 10001
ENV PGWARP_LISTEN=0.0.0.0:6432 PGWARP_ADMIN_LISTEN=0.0.0.0:9930
EXPOSE 6432 9930
ENTRYPOINT ["/usr/local/bin/pgwarp"]
