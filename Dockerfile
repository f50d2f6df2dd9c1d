# outboxd, for docker-compose.yml (and any container platform).
#
#   docker build -t outboxd .
#
# The build stage is the official Rust image (Debian bookworm, with gcc and make) plus the
# OpenSSL and zlib headers librdkafka builds against. Every build has librdkafka with OpenSSL,
# so TLS and SASL (PLAIN, SCRAM-SHA-256/512) to Kafka work through [sink.kafka.options] alone.
FROM rust:1-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends pkg-config libssl-dev zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin outboxd \
    && cp target/release/outboxd /usr/local/bin/outboxd

# The runtime stage: the binary, the shared libraries librdkafka links (OpenSSL, zlib), CA
# certificates for TLS, and the entrypoint that runs `outboxd setup` then `outboxd run`.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --no-create-home --shell /usr/sbin/nologin outboxd
COPY --from=build /usr/local/bin/outboxd /usr/local/bin/outboxd
COPY docker/outboxd-entrypoint.sh /usr/local/bin/outboxd-entrypoint
USER outboxd
EXPOSE 9187
ENTRYPOINT ["/usr/local/bin/outboxd-entrypoint"]
