# syntax=docker/dockerfile:1
#
# T-Storinator: one image with both programs, storinator-worker and storinator-bot.
#
#   docker build -t t-storinator .
#   docker run --rm t-storinator --help                 # storinator-worker is the entrypoint
#   docker run --rm --entrypoint storinator-bot t-storinator
#
# docker-compose.yml runs the bot and the worker from this image, sharing the /data volume.
# Everything the programs keep (SQLite catalog and job table, Telegram session file, spool of
# packs waiting for upload) lives under /data.

# ---------------------------------------------------------------------------------------------
# Build stage: compile both binaries in release mode from the locked dependency set.
FROM rust:1-bookworm AS builder

WORKDIR /src
COPY . .

# The cache mounts keep the crate registry and the target directory between builds (BuildKit);
# the binaries are copied out of the cached target dir inside the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p storinator-worker -p storinator-bot \
 && install -D -m 0755 target/release/storinator-worker /out/storinator-worker \
 && install -D -m 0755 target/release/storinator-bot /out/storinator-bot

# ---------------------------------------------------------------------------------------------
# Runtime stage: a small Debian with CA certificates, the time zone database (schedules are
# evaluated in STORINATOR_TIMEZONE) and an unprivileged user.
FROM debian:bookworm-slim AS runtime

RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tzdata \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 10001 storinator \
 && useradd --uid 10001 --gid storinator --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin storinator \
 && mkdir -p /data \
 && chown storinator:storinator /data \
 && chmod 0700 /data

COPY --from=builder /out/storinator-worker /out/storinator-bot /usr/local/bin/

# The defaults both programs derive their paths from: database /data/storinator.db, session
# file /data/worker.session, spool /data/spool.
ENV STORINATOR_DATA_DIR=/data \
    DATABASE_URL=sqlite:///data/storinator.db \
    STORINATOR_SESSION_FILE=/data/worker.session

VOLUME ["/data"]
WORKDIR /data
USER storinator:storinator

# The worker is the default; the bot service overrides the entrypoint with storinator-bot.
# `docker compose run --rm worker init` therefore runs `storinator-worker init`.
ENTRYPOINT ["storinator-worker"]
CMD ["run"]
