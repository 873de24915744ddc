#!/usr/bin/env bash
# The agog_nats demo (the README's first command):
#
#   bash test/demo.sh [FEATURE]      # default feature: customer-search
#
# On a fresh Debian 12 machine, as root: installs what is missing, builds and
# installs the extension, starts a local nats-server and a throwaway
# PostgreSQL 15 (both as `postgres`, on free loopback ports), creates the
# extension, publishes one report from each of the seed's six agents for
# FEATURE, fetches one back, prints agog_stream_status(), and stops
# everything it started.
set -euo pipefail

FEATURE=${1:-customer-search}
if ! [[ "$FEATURE" =~ ^[A-Za-z0-9_-]{1,64}$ ]]; then
    echo "feature must be 1 to 64 characters from A-Z a-z 0-9 _ -" >&2
    exit 2
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}

bash "$REPO/test/install-deps.sh"
# shellcheck source=test/lib.sh
source "$REPO/test/lib.sh"
PGBIN=$("$PG_CONFIG" --bindir)

echo "== build and install agog_nats"
make -C "$REPO" -s PG_CONFIG="$PG_CONFIG" >/dev/null
make -C "$REPO" -s install PG_CONFIG="$PG_CONFIG" >/dev/null

WORK=$(agog_workdir agog_nats_demo)
PGDATA="$WORK/pgdata"
stop_all() {
    set +e
    if [ -f "$PGDATA/postmaster.pid" ]; then
        runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA" -m fast stop >/dev/null 2>&1
    fi
    agog_stop_nats "$WORK/nats" >/dev/null 2>&1
    rm -rf "$WORK"
}
trap stop_all EXIT

NATS_PORT=$(agog_free_port)
agog_start_nats "$WORK/nats" "$NATS_PORT"
PG_PORT=$(agog_free_port "$NATS_PORT" "$(cat "$WORK/nats/monitor.port")")

echo "== throwaway PostgreSQL on port $PG_PORT, nats-server on port $NATS_PORT"
runuser -u postgres -- "$PGBIN/initdb" -D "$PGDATA" -A trust -U postgres >/dev/null
cat >>"$PGDATA/postgresql.conf" <<CONF
listen_addresses = ''
port = $PG_PORT
unix_socket_directories = '$WORK'
shared_preload_libraries = 'agog_nats'
agog_nats.url = 'nats://127.0.0.1:$NATS_PORT'
agog_nats.database = 'postgres'
CONF
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA" -l "$WORK/postgresql.log" -w start >/dev/null

psql_demo() {
    runuser -u postgres -- "$PGBIN/psql" -X -q -h "$WORK" -p "$PG_PORT" -d postgres \
        -v ON_ERROR_STOP=1 -v feature="$FEATURE" "$@"
}

psql_demo <<'SQL'
\pset footer off
\echo == CREATE EXTENSION agog_nats; the worker provisions the six agent streams
CREATE EXTENSION agog_nats;
DO $$
BEGIN
    FOR i IN 1..200 LOOP
        EXIT WHEN (SELECT connected AND streams_ok = 6 FROM agog_worker_status());
        PERFORM pg_sleep(0.1);
    END LOOP;
END
$$;
SELECT pid, connected, server, streams_ok FROM agog_worker_status();

\echo == each agent publishes its report for the feature, in one transaction
BEGIN;
SELECT agent, task_type,
       agog_publish_report(agent, task_type, :'feature',
           format(E'# %s report on %s\n\n%s', initcap(task_type), :'feature',
                  repeat('Findings, decisions and next steps. ', 40)),
           jsonb_build_object('files_analyzed', 15, 'demo', true)) AS report_id
  FROM agog_nats.agents ORDER BY array_position(
       ARRAY['research','critique','backend','frontend','qa','statistics'], task_type);
COMMIT;

\echo == the worker publishes them after commit, exactly once
DO $$
BEGIN
    FOR i IN 1..200 LOOP
        EXIT WHEN NOT EXISTS (SELECT 1 FROM agog_nats.outbox WHERE state = 'pending');
        PERFORM pg_sleep(0.05);
    END LOOP;
END
$$;
SELECT id, agent, feature, state, message_id, bytes, publish_lag
  FROM agog_nats.reports WHERE feature = :'feature' ORDER BY id;

\echo == the next agent fetches the research report
SELECT message_id, subject, published_at, length(content) AS content_bytes,
       metadata->>'agent' AS agent, metadata->>'timestamp' AS timestamp,
       split_part(content, E'\n', 1) AS title
  FROM agog_fetch_report('cynthia', 'research', :'feature');

\echo == agog_stream_status()
SELECT name, messages, bytes, first_seq, last_seq, consumer_count,
       max_msgs, pg_size_pretty(max_bytes) AS max_bytes, max_age,
       round(msgs_used_pct::numeric, 2) AS msgs_pct, health
  FROM agog_stream_status() ORDER BY name;
SQL
echo "== done; stopping PostgreSQL and nats-server"
