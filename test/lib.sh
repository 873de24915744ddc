# shellcheck shell=bash
# Shared bash helpers for test/run.sh and demo scripts. Source it:
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# Everything here runs as root and starts servers as the `postgres` user,
# because PostgreSQL refuses to run as root. Processes are only ever stopped
# by the pid that was recorded when they were started, never by name: other
# clusters and nats-servers may run on the same machine.

AGOG_PG_BIN=${AGOG_PG_BIN:-/usr/lib/postgresql/15/bin}
AGOG_NATS_SERVER=${AGOG_NATS_SERVER:-/usr/sbin/nats-server}

agog_log() { echo "[agog] $*" >&2; }

# agog_port_in_use PORT: true when any TCP socket (listening or not) uses PORT.
agog_port_in_use() {
    [ -n "$(ss -Htan "( sport = :$1 )" 2>/dev/null)" ]
}

# agog_free_port [EXCLUDE...]: print a free TCP port on 127.0.0.1, in
# 20000-32000 (below Linux's ephemeral range, so outgoing connections cannot
# take it meanwhile). Ports given as arguments are never returned: pass the
# ports already handed out but not yet bound.
agog_free_port() {
    local p x clash
    for _ in $(seq 1 200); do
        p=$(( 20000 + RANDOM % 12000 ))
        clash=0
        for x in "$@"; do [ "$x" = "$p" ] && clash=1; done
        [ "$clash" = 0 ] || continue
        agog_port_in_use "$p" && continue
        echo "$p"
        return 0
    done
    agog_log "agog_free_port: no free port found"
    return 1
}

# agog_port_accepts PORT: true when 127.0.0.1:PORT accepts a TCP connection.
agog_port_accepts() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# agog_workdir NAME: create a fresh directory under /tmp owned by postgres
# and print its path.
agog_workdir() {
    local d
    d=$(mktemp -d "/tmp/${1:-agog}.XXXXXX")
    chmod 755 "$d"
    chown postgres:postgres "$d"
    echo "$d"
}

# agog_pid_alive PID: true while PID exists and is not a zombie.
agog_pid_alive() {
    local st
    kill -0 "$1" 2>/dev/null || return 1
    st=$(ps -o stat= -p "$1" 2>/dev/null || true)
    [ -n "$st" ] && [ "${st:0:1}" != Z ]
}

# agog_pid_is_nats PID: true when PID is a running nats-server (guards
# against a recorded pid that was reused by another program).
agog_pid_is_nats() {
    local exe
    agog_pid_alive "$1" || return 1
    exe=$(readlink "/proc/$1/exe" 2>/dev/null || true)
    [ "$exe" = "$(readlink -f "$AGOG_NATS_SERVER")" ]
}

# agog_start_nats DIR PORT: start nats-server as postgres, JetStream stored
# in DIR/js, config DIR/nats.conf, log DIR/nats.log, pid DIR/nats.pid, and
# HTTP monitoring on another free port (its number goes to DIR/monitor.port).
# Returns once 127.0.0.1:PORT accepts connections (at most ~10 s).
agog_start_nats() {
    local dir=$1 port=$2 mport pid
    mkdir -p "$dir/js"
    chown -R postgres:postgres "$dir"
    mport=$(agog_free_port "$port") || return 1
    cat >"$dir/nats.conf" <<EOF
# written by test/lib.sh agog_start_nats
listen: 127.0.0.1:$port
http: 127.0.0.1:$mport
max_payload: 10485760
jetstream {
    store_dir: "$dir/js"
}
EOF
    echo "$mport" >"$dir/monitor.port"
    chown postgres:postgres "$dir/nats.conf" "$dir/monitor.port"

    # runuser stays as a parent of what it runs, so the shell it starts writes
    # its own pid (which exec turns into nats-server's) to nats.pid.
    rm -f "$dir/nats.pid"
    # shellcheck disable=SC2016  # $1/$2 expand in the inner sh
    runuser -u postgres -- sh -c 'echo $$ >"$1/nats.pid"; exec "$2" -c "$1/nats.conf"' \
        sh "$dir" "$AGOG_NATS_SERVER" >>"$dir/nats.log" 2>&1 </dev/null &
    AGOG_NATS_WRAPPER_PID=$!
    for _ in $(seq 1 50); do
        [ -s "$dir/nats.pid" ] && break
        sleep 0.1
    done
    pid=$(cat "$dir/nats.pid" 2>/dev/null || true)
    if [ -z "$pid" ]; then
        agog_log "nats-server did not start; tail of $dir/nats.log:"
        tail -n 30 "$dir/nats.log" >&2 || true
        return 1
    fi

    for _ in $(seq 1 100); do
        if agog_port_accepts "$port"; then
            agog_log "nats-server pid $pid listening on 127.0.0.1:$port (monitor $mport)"
            return 0
        fi
        if ! agog_pid_alive "$pid"; then
            agog_log "nats-server exited at start; tail of $dir/nats.log:"
            tail -n 30 "$dir/nats.log" >&2 || true
            return 1
        fi
        sleep 0.1
    done
    agog_log "nats-server did not accept connections on port $port within 10 s; tail of $dir/nats.log:"
    tail -n 30 "$dir/nats.log" >&2 || true
    agog_stop_nats "$dir"
    return 1
}

# agog_stop_pid PID [TIMEOUT_S]: SIGTERM (and SIGCONT, in case it was
# frozen), wait up to TIMEOUT_S (default 10), then SIGKILL.
agog_stop_pid() {
    local pid=$1 timeout=${2:-10}
    agog_pid_alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    kill -CONT "$pid" 2>/dev/null || true
    for _ in $(seq 1 $(( timeout * 10 ))); do
        agog_pid_alive "$pid" || return 0
        sleep 0.1
    done
    agog_log "pid $pid still alive after ${timeout}s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
        agog_pid_alive "$pid" || return 0
        sleep 0.1
    done
    agog_log "pid $pid did not exit"
    return 1
}

# agog_stop_nats DIR: stop the nats-server whose pid is in DIR/nats.pid.
agog_stop_nats() {
    local dir=$1 pid
    [ -f "$dir/nats.pid" ] || return 0
    pid=$(cat "$dir/nats.pid")
    if [ -n "$pid" ] && agog_pid_is_nats "$pid"; then
        agog_stop_pid "$pid" 10
    fi
    # Reap the runuser wrapper if this shell started it.
    if [ -n "${AGOG_NATS_WRAPPER_PID:-}" ]; then
        wait "$AGOG_NATS_WRAPPER_PID" 2>/dev/null || true
        AGOG_NATS_WRAPPER_PID=
    fi
    rm -f "$dir/nats.pid"
}

# agog_cleanup_workdir WORKDIR: stop everything started under WORKDIR:
#  - every nats-server recorded in a nats.pid file below WORKDIR (the runner's
#    and those of TAP tests, see test/perl/AgogNatsTest.pm), after checking
#    that the pid still is a nats-server;
#  - every postmaster whose data directory (postmaster.pid) is below WORKDIR,
#    e.g. a pg_regress temp instance or a TAP node left by a killed run, with
#    `pg_ctl -m immediate stop` as postgres.
# Safe to call more than once; meant for an EXIT trap.
agog_cleanup_workdir() {
    local work=$1 f pid datadir
    [ -n "$work" ] && [ -d "$work" ] || return 0
    while IFS= read -r f; do
        pid=$(head -n 1 "$f" 2>/dev/null || true)
        if [ -n "$pid" ] && agog_pid_is_nats "$pid"; then
            agog_log "stopping leftover nats-server pid $pid ($f)"
            agog_stop_pid "$pid" 10 || true
            wait "$pid" 2>/dev/null || true
        fi
        rm -f "$f"
    done < <(find "$work" -name nats.pid -type f 2>/dev/null)
    while IFS= read -r f; do
        datadir=$(dirname "$f")
        pid=$(head -n 1 "$f" 2>/dev/null || true)
        # Only a live process whose working directory is this data directory
        # is this postmaster (a stale pid file may name a reused pid).
        if [ -n "$pid" ] && agog_pid_alive "$pid" &&
           [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$(readlink -f "$datadir")" ]; then
            agog_log "stopping leftover postmaster pid $pid ($datadir)"
            runuser -u postgres -- "$AGOG_PG_BIN/pg_ctl" -D "$datadir" \
                -m immediate -w -t 30 stop >/dev/null 2>&1 || true
        fi
    done < <(find "$work" -name postmaster.pid -type f 2>/dev/null)
}

# agog_descendants PID: print the pids of all descendants of PID.
agog_descendants() {
    local c
    for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$c"
        agog_descendants "$c"
    done
}

# agog_kill_tree PID [SIGNAL]: signal (default TERM) every descendant of PID
# (by pid). Daemonised postmasters are not descendants: agog_cleanup_workdir
# stops them by their data directory.
agog_kill_tree() {
    local pids
    pids=$(agog_descendants "$1" | tr '\n' ' ')
    # shellcheck disable=SC2086
    [ -z "${pids// /}" ] || kill -"${2:-TERM}" $pids 2>/dev/null || true
}
