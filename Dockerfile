# syntax=docker/dockerfile:1
# One image for every service: `ecars up | ingest | persist | anomaly | relay | migrate | simulate`.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p ecars \
 && cp target/release/ecars /usr/local/bin/ecars

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl openssl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/ecars --create-home ecars
COPY --from=build /usr/local/bin/ecars /usr/local/bin/ecars
USER 10001:10001
WORKDIR /var/lib/ecars
# Containers listen on every interface; logs are JSON for collectors. The spool and the SQLite
# file of the embedded default live in /var/lib/ecars (mount a volume there).
# The internal listener (health, readiness, metrics) listens on every interface too, for the
# kubelet and Prometheus; publish only 1883, 8083 and 8080.
ENV ECARS_HTTP_ADDR=0.0.0.0:8080 \
    ECARS_ADMIN_ADDR=0.0.0.0:9090 \
    ECARS_MQTT_ADDR=0.0.0.0:1883 \
    ECARS_MQTT_WS_ADDR=0.0.0.0:8083 \
    ECARS_LOG_FORMAT=json \
    ECARS_KAFKA_SPOOL_DIR=/var/lib/ecars/spool \
    DATABASE_URL=sqlite:///var/lib/ecars/ecars.db
EXPOSE 1883 8083 8080 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD curl -fsS http://127.0.0.1:9090/healthz || exit 1
ENTRYPOINT ["ecars"]
CMD ["up"]
