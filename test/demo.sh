#!/usr/bin/env bash
# The agog_nats demo (the README's first command):
#
#   bash test/demo.sh [FEATURE]      # default feature: customer-search
#
# The main job, end to end, on one machine: the seed's six agents run as real
# programs (examples/agents/, run by agog-agent) and hand their reports to each
# other through JetStream while PostgreSQL runs the `feature` workflow.
#
# As root on a fresh Debian 12 machine it installs what is missing, builds and
# installs the extension and agog-agent, then (as `postgres`, on free loopback
# ports) starts a nats-server and a throwaway PostgreSQL 15, creates the
# extension, starts one agog-agent per agent, starts the workflow for FEATURE,
# waits until it completes (roy fails his first attempt on purpose, so a retry
# shows), prints the workflow's progress, task timeline, token savings and
# agog_stream_status(), and stops everything it started.
#
# Run as another user (the test suite runs it as `postgres`) it builds and
# installs nothing: the extension and agog-agent must be installed already.
#
# Environment: AGOG_SKIP_BUILD=1 (use what is installed), AGOG_DEMO_TIMEOUT
# (seconds to wait for the workflow, default 120), PG_CONFIG.
set -euo pipefail

FEATURE=${1:-customer-search}
if ! [[ "$FEATURE" =~ ^[A-Za-z0-9_-]{1,64}$ ]]; then
    echo "feature must be 1 to 64 characters from A-Z a-z 0-9 _ -" >&2
    exit 2
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
TIMEOUT=${AGOG_DEMO_TIMEOUT:-120}
AGENTS=(cynthia sylvia roy jen billy priya)

if ! bash "$REPO/test/install-deps.sh"; then
    echo "demo: missing packages (see above); run the demo as root once to install them" >&2
    exit 1
fi
# shellcheck source=test/lib.sh
source "$REPO/test/lib.sh"
PGBIN=$("$PG_CONFIG" --bindir)
AGOG_PG_BIN=$PGBIN

if [ "$(id -u)" -eq 0 ]; then
    as_pg() { runuser -u postgres -- "$@"; }
    if [ -z "${AGOG_SKIP_BUILD:-}" ]; then
        echo "== build and install agog_nats and agog-agent"
        make -C "$REPO" -s PG_CONFIG="$PG_CONFIG" >/dev/null
        make -C "$REPO" -s install PG_CONFIG="$PG_CONFIG" >/dev/null
    fi
else
    as_pg() { "$@"; }
fi
AGENT_BIN="$PGBIN/agog-agent"
if [ ! -x "$AGENT_BIN" ]; then
    echo "demo: $AGENT_BIN is not installed: run the demo as root (it runs make install)" >&2
    exit 1
fi
EXAMPLES="$REPO/examples/agents"
[ -d "$EXAMPLES" ] || EXAMPLES="$("$PG_CONFIG" --sharedir)/agog_nats/examples/agents"
for a in "${AGENTS[@]}"; do
    if [ ! -f "$EXAMPLES/$a" ]; then
        echo "demo: the example agent $a is missing from $EXAMPLES" >&2
        exit 1
    fi
done

# Everything lives in a work directory owned by postgres (the clone may sit
# where postgres cannot read, e.g. under /root).
WORK=$(agog_workdir agog_nats_demo)
PGDATA="$WORK/pgdata"
RUNNER_PIDS=()
NATS_PID=
stop_all() {
    local rc=$? p
    set +e
    trap - EXIT INT TERM
    for p in "${RUNNER_PIDS[@]}"; do agog_stop_pid "$p" 15; done
    if [ -f "$PGDATA/postmaster.pid" ]; then
        as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null 2>&1
    fi
    if [ -n "$NATS_PID" ] && agog_pid_is_nats "$NATS_PID"; then agog_stop_pid "$NATS_PID" 10; fi
    wait 2>/dev/null
    rm -rf "$WORK"
    exit "$rc"
}
trap stop_all EXIT
trap 'exit 130' INT TERM

mkdir -p "$WORK/agents" "$WORK/nats/js" "$WORK/tmp"
cp "$EXAMPLES"/* "$WORK/agents/"
chmod 755 "$WORK/agents"/*
chown -R postgres:postgres "$WORK" 2>/dev/null || true
chmod 700 "$WORK"           # its socket lets in anyone who can reach it (trust)

# --- nats-server, as postgres, pid recorded (stopped by pid, never by name) --
NATS_PORT=$(agog_free_port)
MON_PORT=$(agog_free_port "$NATS_PORT")
PG_PORT=$(agog_free_port "$NATS_PORT" "$MON_PORT")
cat >"$WORK/nats/nats.conf" <<EOF
listen: 127.0.0.1:$NATS_PORT
http: 127.0.0.1:$MON_PORT
max_payload: 10485760
jetstream { store_dir: "$WORK/nats/js" }
EOF
chown -R postgres:postgres "$WORK/nats" 2>/dev/null || true
# shellcheck disable=SC2016  # $1/$2 expand in the inner sh
as_pg sh -c 'echo $$ >"$1/nats.pid"; exec "$2" -c "$1/nats.conf"' sh "$WORK/nats" "$AGOG_NATS_SERVER" \
    >>"$WORK/nats/nats.log" 2>&1 </dev/null &
for _ in $(seq 1 100); do
    NATS_PID=$(cat "$WORK/nats/nats.pid" 2>/dev/null || true)
    [ -n "$NATS_PID" ] && agog_port_accepts "$NATS_PORT" && break
    sleep 0.1
done
if ! agog_port_accepts "$NATS_PORT"; then
    echo "demo: nats-server did not start; its log:" >&2
    tail -n 20 "$WORK/nats/nats.log" >&2
    exit 1
fi

# --- a throwaway PostgreSQL that preloads agog_nats -------------------------
echo "== work directory $WORK"
echo "== nats-server on 127.0.0.1:$NATS_PORT, throwaway PostgreSQL on port $PG_PORT"
as_pg "$PGBIN/initdb" -D "$PGDATA" -A trust -U postgres >/dev/null
cat >>"$PGDATA/postgresql.conf" <<CONF
listen_addresses = ''
port = $PG_PORT
unix_socket_directories = '$WORK'
shared_preload_libraries = 'agog_nats'
agog_nats.url = 'nats://127.0.0.1:$NATS_PORT'
agog_nats.database = 'postgres'
CONF
as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$WORK/postgresql.log" -w start >/dev/null

DSN="host=$WORK port=$PG_PORT dbname=postgres user=postgres"
psql_demo() {
    as_pg "$PGBIN/psql" -X -q -d "$DSN" -v ON_ERROR_STOP=1 -v feature="$FEATURE" "$@"
}

psql_demo <<'SQL'
\echo == CREATE EXTENSION agog_nats: the worker provisions the six agent streams
CREATE EXTENSION agog_nats;
DO $$
BEGIN
    FOR i IN 1..300 LOOP
        EXIT WHEN (SELECT connected AND streams_ok = 6 FROM agog_worker_status());
        PERFORM pg_sleep(0.1);
    END LOOP;
END
$$;
SELECT connected, server, streams_ok FROM agog_worker_status();
-- The demo only: retry a failed stage after 1 s instead of 10 s.
UPDATE agog_nats.stages SET retry_backoff = '1 second' WHERE pipeline = 'feature';
SQL

# --- one agog-agent per agent -------------------------------------------------
echo "== six agents: agog-agent --agent NAME -- examples/agents/NAME"
for a in "${AGENTS[@]}"; do
    # shellcheck disable=SC2016
    as_pg env TMPDIR="$WORK/tmp" sh -c 'echo $$ >"$1"; shift; exec "$@"' sh "$WORK/runner-$a.pid" \
        "$AGENT_BIN" --agent "$a" --dsn "$DSN" --poll 5 --grace 10 -- "$WORK/agents/$a" \
        >"$WORK/runner-$a.log" 2>&1 </dev/null &
done
for a in "${AGENTS[@]}"; do
    for _ in $(seq 1 50); do [ -s "$WORK/runner-$a.pid" ] && break; sleep 0.1; done
    RUNNER_PIDS+=("$(cat "$WORK/runner-$a.pid")")
done
for a in "${AGENTS[@]}"; do
    for _ in $(seq 1 100); do grep -q 'ready' "$WORK/runner-$a.log" 2>/dev/null && break; sleep 0.1; done
    if ! grep -q 'ready' "$WORK/runner-$a.log"; then
        echo "demo: agog-agent for $a did not start:" >&2
        cat "$WORK/runner-$a.log" >&2
        exit 1
    fi
done
sed -n 's/.*\(agent [a-z]* ready\).*/   \1/p' "$WORK"/runner-*.log

# --- the workflow --------------------------------------------------------------
WF=$(echo "SELECT agog_start_workflow(:'feature')" | psql_demo -At)
echo "== workflow $WF: the feature pipeline for \"$FEATURE\" (research -> critique -> backend -> frontend -> qa -> statistics)"
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
T0=$(now_ms)
last=
state=running
while :; do
    line=$(psql_demo -At -F ' ' -c \
        "SELECT state, done, total, coalesce(array_to_string(current_agents, ','), '-') FROM agog_nats.workflow_progress WHERE workflow_id = $WF")
    state=${line%% *}
    if [ "$line" != "$last" ]; then
        read -r s d t cur <<<"$line"
        el=$(( $(now_ms) - T0 ))
        printf '   %3d.%d s  %-9s %s of %s stages done, now: %s\n' \
            $((el / 1000)) $((el % 1000 / 100)) "$s" "$d" "$t" "$cur"
        last=$line
    fi
    [ "$state" = running ] || break
    if [ $(( $(now_ms) - T0 )) -gt $(( TIMEOUT * 1000 )) ]; then
        echo "demo: the workflow did not finish within $TIMEOUT s" >&2
        break
    fi
    sleep 0.2
done

# The worker publishes the last report from the outbox just after the commit,
# then records its message id on the task: wait (bounded) for both.
psql_demo <<'SQL'
SET demo.feature = :'feature';
DO $$
BEGIN
    FOR i IN 1..100 LOOP
        EXIT WHEN NOT EXISTS (SELECT 1 FROM agog_nats.reports
                               WHERE kind = 'report' AND feature = current_setting('demo.feature')
                                 AND state = 'pending')
              AND NOT EXISTS (SELECT 1 FROM agog_nats.tasks t JOIN agog_nats.workflows w ON w.id = t.workflow_id
                               WHERE w.feature = current_setting('demo.feature')
                                 AND t.state = 'completed' AND t.report_message_id IS NULL);
        PERFORM pg_sleep(0.1);
    END LOOP;
END
$$;
SQL

echo "== what the agents printed (agog-agent: one line per task)"
# In the pipeline's order: by task, then attempt.
cat "$WORK"/runner-*.log | grep -E 'attempt [0-9]+ \(task' |
    sed -E 's/^(.* attempt ([0-9]+) \(task ([0-9]+)\).*)$/\3 \2 \1/' | sort -n -k1,1 -k2,2 |
    cut -d' ' -f3- | sed 's/^/   /'

psql_demo -v wf="$WF" <<'SQL'
\pset footer off
\echo == agog_nats.workflow_progress
SELECT workflow_id, pipeline, feature, state, stage_reached, done, total,
       date_trunc('millisecond', elapsed) AS elapsed
  FROM agog_nats.workflow_progress WHERE workflow_id = :wf;

\echo == agog_nats.task_timeline
SELECT stage, agent, outcome, attempts,
       date_trunc('millisecond', wait) AS wait, date_trunc('millisecond', run) AS run,
       notice_bytes, report_bytes, report_message_id
  FROM agog_nats.task_timeline WHERE workflow_id = :wf ORDER BY task_id;

\echo == the retry (agog_nats.events)
SELECT stage, kind, detail->>'attempt' AS attempt,
       left(regexp_replace(detail->>'reason', '\s+', ' ', 'g'), 110) AS reason
  FROM agog_nats.events WHERE workflow_id = :wf AND kind IN ('task_retry', 'task_failed')
 ORDER BY id;

\echo == agog_nats.token_savings (bytes / 4)
SELECT workflow_id, feature, tokens_without_nats, tokens_with_nats, tokens_saved, saved_pct
  FROM agog_nats.token_savings WHERE workflow_id = :wf;

\echo == the statistics report, fetched back from JetStream
SELECT message_id, length(content) AS bytes, metadata->>'agent' AS agent,
       metadata->>'runner' IS NOT NULL AS by_agog_agent
  FROM agog_fetch_report('priya', 'statistics', :'feature');
\pset tuples_only on
SELECT content FROM agog_fetch_report('priya', 'statistics', :'feature');
\pset tuples_only off

\echo == agog_stream_status()
SELECT name, messages, bytes, first_seq, last_seq, consumer_count,
       max_msgs, pg_size_pretty(max_bytes) AS max_bytes, max_age, health
  FROM agog_stream_status() ORDER BY name;
SQL

summary=$(psql_demo -At -F '|' -c "
    SELECT w.state, p.done, p.total, round(extract(epoch FROM p.elapsed)::numeric, 1),
           (SELECT count(*) FROM agog_nats.events e WHERE e.workflow_id = w.id AND e.kind = 'task_retry'),
           (SELECT count(DISTINCT r.subject) FROM agog_nats.reports r
             WHERE r.kind = 'report' AND r.feature = w.feature AND r.state = 'published')
      FROM agog_nats.workflows w JOIN agog_nats.workflow_progress p ON p.workflow_id = w.id
     WHERE w.id = $WF")
IFS='|' read -r state done total secs retries in_js <<<"$summary"
echo "== workflow $WF ($FEATURE): $state, $done of $total stages, $retries retr$([ "$retries" = 1 ] && echo y || echo ies), $in_js reports in JetStream, in $secs s"
if [ "$state" != completed ]; then
    for a in "${AGENTS[@]}"; do
        echo "== the end of agog-agent's output for $a"
        tail -n 15 "$WORK/runner-$a.log"
    done
fi
echo "== stopping the agents, PostgreSQL and nats-server"
[ "$state" = completed ]
