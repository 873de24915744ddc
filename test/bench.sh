#!/usr/bin/env bash
# The agog_nats benchmarks (issue 4; docs/benchmarks.md says what each figure is):
#
#   bash test/bench.sh
#
# On a Debian 12 machine, as root: installs what is missing, builds and
# installs the extension, starts a nats-server (max_payload 10 MB) and a
# throwaway PostgreSQL 15 (both as `postgres`, on free loopback ports),
# creates the extension, waits for the worker's six streams, builds
# test/bench/agog_bench.c and runs it. It prints one table: every figure next
# to its baseline measured in the same run, as a ratio, against its target.
# It stops everything it started. Not part of test/run.sh: speeds live here,
# not in timed tests. About 5 minutes on a 2-core machine.
#
# Environment:
#   AGOG_BENCH_ROUNDS=5      rounds per figure (median, min..max)
#   AGOG_BENCH_QUICK=1       every count divided by 10: a smoke run, not figures
#   AGOG_SKIP_BUILD=1        use the extension already installed
#   AGOG_KEEP_WORKDIR=1      keep the work directory (logs, bench output)
#   PG_CONFIG=...            default /usr/lib/postgresql/15/bin/pg_config
# Exit status: 0 when the benchmark ran (whatever the targets), 1 on a failure.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}

bash "$REPO/test/install-deps.sh"
# shellcheck source=test/lib.sh
source "$REPO/test/lib.sh"
PGBIN=$("$PG_CONFIG" --bindir)

if [ -z "${AGOG_SKIP_BUILD:-}" ]; then
    echo "== build and install agog_nats"
    make -C "$REPO" -s PG_CONFIG="$PG_CONFIG" >/dev/null
    make -C "$REPO" -s install PG_CONFIG="$PG_CONFIG" >/dev/null
fi

WORK=$(agog_workdir agog_nats_bench)
PGDATA="$WORK/pgdata"
stop_all() {
    set +e
    if [ -f "$PGDATA/postmaster.pid" ]; then
        runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w -t 60 stop >/dev/null 2>&1
    fi
    agog_stop_nats "$WORK/nats" >/dev/null 2>&1
    agog_cleanup_workdir "$WORK"
    if [ -n "${AGOG_KEEP_WORKDIR:-}" ]; then
        echo "== work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap stop_all EXIT
trap 'exit 130' INT TERM HUP

NATS_PORT=$(agog_free_port)
agog_start_nats "$WORK/nats" "$NATS_PORT"
NATS_PID=$(cat "$WORK/nats/nats.pid")
PG_PORT=$(agog_free_port "$NATS_PORT" "$(cat "$WORK/nats/monitor.port")")

echo "== throwaway PostgreSQL on port $PG_PORT, nats-server on port $NATS_PORT"
runuser -u postgres -- "$PGBIN/initdb" -D "$PGDATA" -A trust -U postgres >/dev/null
# Durable settings (synchronous_commit and fsync on, as the defaults), enough
# WAL that no checkpoint is forced by volume during the run (about 3 GB of
# reports are written), and commit timestamps for the lag figure.
cat >>"$PGDATA/postgresql.conf" <<CONF
listen_addresses = ''
port = $PG_PORT
unix_socket_directories = '$WORK'
shared_preload_libraries = 'agog_nats'
agog_nats.url = 'nats://127.0.0.1:$NATS_PORT'
agog_nats.database = 'postgres'
shared_buffers = 256MB
synchronous_commit = on
fsync = on
max_wal_size = 8GB
checkpoint_timeout = 30min
track_commit_timestamp = on
log_autovacuum_min_duration = 0
log_checkpoints = on
log_timezone = 'UTC'
CONF
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA" -l "$WORK/postgresql.log" -w start >/dev/null

runuser -u postgres -- "$PGBIN/psql" -X -q -h "$WORK" -p "$PG_PORT" -d postgres \
    -v ON_ERROR_STOP=1 <<'SQL'
CREATE EXTENSION agog_nats;
DO $$
BEGIN
    FOR i IN 1..300 LOOP
        EXIT WHEN (SELECT connected AND streams_ok = 6 FROM agog_worker_status());
        PERFORM pg_sleep(0.1);
    END LOOP;
    IF NOT (SELECT connected AND streams_ok = 6 FROM agog_worker_status()) THEN
        RAISE EXCEPTION 'the agog_nats worker did not provision the six streams within 30 s';
    END IF;
END
$$;
SQL

# WAL in its steady state: a server that has run a while writes its WAL into
# recycled segment files, while a fresh cluster creates and zero-fills a new
# 16 MB file (with an fsync) every second or so under this load, and every
# commit waits behind that for 25-60 ms. Write 2 GB of WAL (messages only, no
# table) and checkpoint, so the segments the run needs exist and are recycled.
echo "== WAL warm-up: 2 GB of WAL messages, then CHECKPOINT (segments recycled)"
runuser -u postgres -- "$PGBIN/psql" -X -q -h "$WORK" -p "$PG_PORT" -d postgres \
    -v ON_ERROR_STOP=1 <<'SQL'
SELECT count(pg_logical_emit_message(false, 'agog_bench_wal_warmup', repeat('x', 1048576)))
  FROM generate_series(1, 2048);
CHECKPOINT;
SQL

echo "== build agog_bench and the floor functions"
gcc -O2 -Wall -Wextra -Werror -I"$("$PG_CONFIG" --includedir)" \
    -o "$WORK/agog_bench" "$REPO/test/bench/agog_bench.c" -lnats -lpq -lpthread -lm
# The floor (test/bench/agog_bench_floor.c): two bare C functions that do in a
# backend what the raw baselines do, and nothing else. Built into the work
# directory and loaded from there by path; nothing is installed.
# shellcheck disable=SC2046  # pg_config's flags are meant to split
gcc $("$PG_CONFIG" --cflags) $("$PG_CONFIG" --cflags_sl) -Wall -Wextra -Werror \
    -Wno-unused-parameter -shared -I"$("$PG_CONFIG" --includedir-server)" \
    -o "$WORK/agog_bench_floor.so" "$REPO/test/bench/agog_bench_floor.c" -lnats
chmod 755 "$WORK/agog_bench_floor.so"
runuser -u postgres -- "$PGBIN/psql" -X -q -h "$WORK" -p "$PG_PORT" -d postgres \
    -v ON_ERROR_STOP=1 -v so="$WORK/agog_bench_floor.so" <<'SQL'
CREATE FUNCTION agog_bench_floor_publish(text, text, text) RETURNS bigint
    LANGUAGE C STRICT AS :'so', 'agog_bench_floor_publish';
CREATE FUNCTION agog_bench_floor_get_loop(text, text, text) RETURNS text
    LANGUAGE C STRICT AS :'so', 'agog_bench_floor_get_loop';
CREATE FUNCTION agog_bench_floor_publish_loop(text, text, text) RETURNS bigint
    LANGUAGE C STRICT AS :'so', 'agog_bench_floor_publish_loop';
CREATE FUNCTION agog_bench_floor_get(text, text, text) RETURNS text
    LANGUAGE C STRICT AS :'so', 'agog_bench_floor_get';
SQL

echo "== run agog_bench (progress on stderr; the table at the end)"
AGOG_BENCH_PGLOG="$WORK/postgresql.log" AGOG_BENCH_NATS_PID="$NATS_PID" \
    "$WORK/agog_bench" "nats://127.0.0.1:$NATS_PORT" \
    "host=$WORK port=$PG_PORT dbname=postgres user=postgres" | tee "$WORK/bench.out"
