# syntax=docker/dockerfile:1
#
# T-Storinator: one image with both programs, storinator-worker and storinator-bot.
#
#   docker build -t t-storinator .
#   docker run --rm t-storinator --help                 # storinator-worker is the entrypoint
#   docker run --rm --entrypoint storinator-bot t-storinator
#
# docker-compose.yml runs the worker and the bot from this image as two users: the worker
# (storinator, uid 10001) keeps its Telegram session and spool under /data (0700, its alone);
# the SQLite catalog and job table live under /db, shared with the bot (storinator-bot, uid
# 10002) through the group storinator-db (gid 10003).

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
 && groupadd --gid 10002 storinator-bot \
 && groupadd --gid 10003 storinator-db \
 && useradd --uid 10001 --gid storinator --groups storinator-db --home-dir /data \
        --no-create-home --shell /usr/sbin/nologin storinator \
 && useradd --uid 10002 --gid storinator-bot --groups storinator-db --home-dir /nonexistent \
        --no-create-home --shell /usr/sbin/nologin storinator-bot \
 && mkdir -p /data /db \
 && chown storinator:storinator /data \
 && chmod 0700 /data \
 && chown root:storinator-db /db \
 && chmod 2770 /db

COPY --from=builder /out/storinator-worker /out/storinator-bot /usr/local/bin/

# The worker's paths: database /db/storinator.db (shared with the bot), session file
# /data/worker.session, spool /data/spool. The bot's service sets its own DATABASE_URL.
ENV STORINATOR_DATA_DIR=/data \
    DATABASE_URL=sqlite:///db/storinator.db \
    STORINATOR_SESSION_FILE=/data/worker.session

VOLUME ["/data", "/db"]
WORKDIR /data
USER storinator:storinator

# The worker is the default; the bot service overrides the entrypoint with storinator-bot.
# `docker compose run --rm worker init` therefore runs `storinator-worker init`.
ENTRYPOINT ["storinator-worker"]
CMD ["run"]
