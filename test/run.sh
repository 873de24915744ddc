#!/usr/bin/env bash
# The test command of agog_nats:
#
#   bash test/run.sh            # deps, build + install, pg_regress suite, TAP tests
#   bash test/run.sh regress    # deps, build + install, pg_regress suite only
#   bash test/run.sh tap        # deps, build + install, TAP tests only
#
# Environment:
#   TAP_TESTS="test/t/001_x.pl test/t/002_y.pl"  TAP files to run (default test/t/*.pl)
#   PG_CONFIG=...             default /usr/lib/postgresql/15/bin/pg_config
#   AGOG_SKIP_BUILD=1         use the extension already installed
#   AGOG_KEEP_WORKDIR=1       keep the work directory even when everything passed
#   AGOG_REGRESS_TIMEOUT=900  seconds for the whole pg_regress run
#   AGOG_TAP_TIMEOUT=900      seconds for each TAP file
#
# Runs as root (CI does): builds and installs as root, runs PostgreSQL,
# nats-server, pg_regress and prove as `postgres` in a work directory under
# /tmp that `postgres` owns. Ends with one line "N passed, N failed" counting
# pg_regress tests and TAP assertions; exits 0 iff nothing failed and at
# least one test ran. Leaves no process behind.
set -euo pipefail

MODE=${1:-all}
case "$MODE" in
    all|regress|tap) ;;
    *) echo "usage: bash test/run.sh [all|regress|tap]" >&2; exit 2 ;;
esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
REGRESS_TIMEOUT=${AGOG_REGRESS_TIMEOUT:-900}
TAP_TIMEOUT=${AGOG_TAP_TIMEOUT:-900}

PASSED=0
FAILED=0
FINISHED=0
FAILURES=()     # one line per failure, repeated just above the closing line
WORK=
NATS_DIR=

say() { echo "=== $*"; }

# fail_note TEXT: remember a failure for the summary that finish prints last,
# so that the tail of a CI log names what failed.
fail_note() { FAILURES+=("$*"); }

# Stop everything this run started (by recorded pid / data directory only).
cleanup() {
    [ -n "$WORK" ] || return 0
    if [ -n "$NATS_DIR" ]; then agog_stop_nats "$NATS_DIR" || true; fi
    agog_cleanup_workdir "$WORK" || true
}

# Print the closing line and exit with the verdict.
finish() {
    local rc=0
    set +e
    FINISHED=1
    cleanup
    if [ "$FAILED" -ne 0 ] || [ "$PASSED" -eq 0 ]; then rc=1; fi
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if [ "$rc" -eq 0 ] && [ -z "${AGOG_KEEP_WORKDIR:-}" ]; then
            rm -rf "$WORK"
        else
            rm -f "$WORK/runner.pid"
            say "work directory kept: $WORK"
        fi
    fi
    WORK=
    if [ "$PASSED" -eq 0 ] && [ "$FAILED" -eq 0 ]; then
        say "no test ran"
    fi
    if [ ${#FAILURES[@]} -gt 0 ]; then
        say "what failed:"
        printf '  %s\n' "${FAILURES[@]}"
    fi
    echo "$PASSED passed, $FAILED failed"
    exit "$rc"
}

# On INT/TERM/HUP: stop our child processes (by pid), count a failure, finish.
# Long steps run in the background with `wait` (run_logged) so that these
# traps fire at once instead of after the step.
on_signal() {
    trap - INT TERM HUP
    say "interrupted"
    fail_note "interrupted by a signal"
    if declare -F agog_kill_tree >/dev/null; then agog_kill_tree $$ TERM; fi
    FAILED=$((FAILED + 1))
    finish
}
# An unexpected exit (a failing command under set -e) still cleans up and
# prints the closing line.
on_exit() {
    local rc=$?
    [ "$FINISHED" = 1 ] && return 0
    say "FAILED: test/run.sh stopped unexpectedly (status $rc)"
    fail_note "test/run.sh stopped unexpectedly (status $rc)"
    FAILED=$((FAILED + 1))
    finish
}
trap on_exit EXIT
trap on_signal INT TERM HUP

# run_logged LOG CMD...: run CMD showing its output and saving it to LOG;
# returns CMD's exit status.
run_logged() {
    local log=$1 rc=0
    shift
    ( "$@" 2>&1 | tee "$log" ) </dev/null &
    wait $! || rc=$?
    return "$rc"
}

# --- a. dependencies -------------------------------------------------------
say "dependencies"
if ! bash "$REPO/test/install-deps.sh"; then
    say "FAILED: installing dependencies"
    FAILED=1
    finish
fi
# shellcheck source=test/lib.sh
source "$REPO/test/lib.sh"
PGBIN=$("$PG_CONFIG" --bindir)
AGOG_PG_BIN=$PGBIN
PGXS_DIR=$(dirname "$(dirname "$("$PG_CONFIG" --pgxs)")")   # .../lib/pgxs/src

# --- b. build and install (as root) -----------------------------------------
if [ -z "${AGOG_SKIP_BUILD:-}" ]; then
    say "build and install"
    cd "$REPO"
    build_rc=0
    (
        make clean PG_CONFIG="$PG_CONFIG" >/dev/null 2>&1 || true
        make -j"$(nproc)" PG_CONFIG="$PG_CONFIG" && make install PG_CONFIG="$PG_CONFIG" >/dev/null
    ) </dev/null &
    wait $! || build_rc=$?
    if [ "$build_rc" -ne 0 ]; then
        say "FAILED: build or install of agog_nats (see the compiler output above)"
        FAILED=1
        finish
    fi
else
    say "build skipped (AGOG_SKIP_BUILD set)"
fi

# --- c. work directory owned by postgres -------------------------------------
# First stop servers left by an earlier run that was killed (its runner.pid
# names a dead process); its directory stays for inspection.
for d in /tmp/agog_nats_test.*; do
    [ -f "$d/runner.pid" ] || continue
    if ! kill -0 "$(cat "$d/runner.pid")" 2>/dev/null; then
        agog_cleanup_workdir "$d" || true
        rm -f "$d/runner.pid"
    fi
done
WORK=$(agog_workdir agog_nats_test)
echo $$ >"$WORK/runner.pid"
say "work directory $WORK"
cd "$REPO"
cp -r Makefile agog_nats.control sql expected test "$WORK/"
for d in specs examples data input output; do      # optional test inputs, if the project has them
    if [ -d "$d" ]; then cp -r "$d" "$WORK/"; fi
done
mkdir -p "$WORK/tmp" "$WORK/tap"
chown -R postgres:postgres "$WORK"
cd "$WORK"

# Run a command as postgres in $WORK with the test environment.
as_pg() {
    runuser -u postgres -- env \
        PATH="$PGBIN:$PATH" TMPDIR="$WORK/tmp" HOME="$WORK" LANG=C.UTF-8 LC_ALL=C.UTF-8 \
        "$@"
}

# --- d + e. nats-server and pg_regress ----------------------------------------
run_regress() {
    local nats_port mon_port pg_port rc=0 p f
    NATS_DIR="$WORK/nats"
    nats_port=$(agog_free_port)
    if ! agog_start_nats "$NATS_DIR" "$nats_port"; then
        say "FAILED: could not start nats-server for pg_regress"
        fail_note "could not start nats-server for pg_regress"
        FAILED=$((FAILED + 1))
        return
    fi
    mon_port=$(cat "$NATS_DIR/monitor.port")
    pg_port=$(agog_free_port "$nats_port" "$mon_port")

    cat >"$WORK/regress.conf" <<EOF
shared_preload_libraries = 'agog_nats'
agog_nats.url = 'nats://127.0.0.1:$nats_port'
agog_nats.database = 'contrib_regression'
agog_nats.timeout_ms = 2000
max_prepared_transactions = 10
log_min_messages = info
EOF
    chown postgres:postgres "$WORK/regress.conf"

    say "pg_regress (nats 127.0.0.1:$nats_port, postgres port $pg_port)"
    # TAP_TESTS (this script's list of TAP files) is also a PGXS variable:
    # left in the environment it makes installcheck run prove on t/*.pl too.
    run_logged "$WORK/regress.log" \
        as_pg env -u TAP_TESTS timeout -k 30 "$REGRESS_TIMEOUT" make installcheck PG_CONFIG="$PG_CONFIG" \
        EXTRA_REGRESS_OPTS="--temp-instance=$WORK/tmp_instance --temp-config=$WORK/regress.conf --port=$pg_port" \
        || rc=$?

    # PG15 prints one line per test: "test name   ... ok   12 ms" (or, in a
    # parallel group, indented without "test"), "... FAILED" or "... failed (ignored)".
    # An ignored failure is still a failure here: nothing hides one.
    local failed_re='^(test +| +)[^ ]+ +\.\.\. +(FAILED|failed \(ignored\))'
    p=$(grep -cE '^(test +| +)[^ ]+ +\.\.\. +ok' "$WORK/regress.log" || true)
    f=$(grep -cE "$failed_re" "$WORK/regress.log" || true)
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        say "FAILED: pg_regress timed out after ${REGRESS_TIMEOUT}s"
    fi
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        f=1     # pg_regress (or make) failed without a failing test: setup error
    fi
    say "pg_regress: $p passed, $f failed (exit status $rc)"
    if [ "$f" -ne 0 ]; then
        fail_note "pg_regress (exit status $rc):" \
            $(grep -oE "$failed_re" "$WORK/regress.log" \
              | awk '{print ($1 == "test") ? $2 : $1}' | tr '\n' ' ')
    fi
    PASSED=$((PASSED + p))
    FAILED=$((FAILED + f))

    if [ "$f" -ne 0 ]; then
        for diffs in "$WORK/regression.diffs" "$WORK/output_iso/regression.diffs"; do
            if [ -s "$diffs" ]; then
                say "$diffs (first 200 lines)"
                head -n 200 "$diffs"
            fi
        done
        if [ -f "$WORK/log/postmaster.log" ]; then
            say "tail of postmaster.log"
            tail -n 60 "$WORK/log/postmaster.log"
        fi
        say "tail of nats.log"
        tail -n 20 "$NATS_DIR/nats.log" || true
    fi
    agog_stop_nats "$NATS_DIR" || true
}

# --- f. TAP tests ---------------------------------------------------------------
run_tap() {
    local files=() f rel base rc p n out
    if [ -n "${TAP_TESTS:-}" ]; then
        for f in $TAP_TESTS; do
            rel=${f#"$REPO"/}           # accept absolute paths into the repo too
            if [ ! -f "$WORK/$rel" ]; then
                say "FAILED: TAP file $f not found"
                fail_note "TAP file $f not found"
                FAILED=$((FAILED + 1))
                continue
            fi
            files+=("$rel")
        done
    else
        for f in "$WORK"/test/t/*.pl; do
            [ -e "$f" ] && files+=("test/t/$(basename "$f")")
        done
    fi
    if [ ${#files[@]} -eq 0 ]; then
        say "no TAP tests (test/t/*.pl): skipped"
        return
    fi

    for f in "${files[@]}"; do
        base=$(basename "$f" .pl)
        out="$WORK/tap/$base.out"
        say "TAP $f"
        rc=0
        run_logged "$out" \
            as_pg PERL5LIB="$PGXS_DIR/test/perl:$WORK/test/perl" \
            PG_REGRESS="$PGXS_DIR/test/regress/pg_regress" \
            TESTDIR="$WORK/tap" PG_TEST_PORT_DIR="$WORK/tap/portlock" \
            NATS_SERVER="$AGOG_NATS_SERVER" \
            timeout -k 30 "$TAP_TIMEOUT" prove -v "$f" \
            || rc=$?
        # Top-level TAP assertions only (subtest lines are indented).
        # A TODO or skipped assertion counts as failed: nothing may hide one.
        p=$(grep -E '^ok [0-9]+' "$out" | grep -cvE '# *(TODO|SKIP)' || true)
        n=$(grep -E '^(not )?ok [0-9]+' "$out" | grep -cE '^not ok|# *(TODO|SKIP)' || true)
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            say "FAILED: $f timed out after ${TAP_TIMEOUT}s"
        fi
        if [ "$rc" -ne 0 ] && [ "$n" -eq 0 ]; then
            n=1     # died, bad plan or timeout without a failing assertion
        fi
        say "TAP $f: $p passed, $n failed (exit status $rc)"
        PASSED=$((PASSED + p))
        FAILED=$((FAILED + n))
        if [ "$n" -ne 0 ]; then
            # The failing assertions, what prove said of a death or a bad
            # plan, and the last assertion that passed (where a death came).
            fail_note "TAP $f: $p passed, $n failed (exit status $rc)"
            while IFS= read -r line; do
                fail_note "    $line"
            done < <( { grep -E '^not ok|# *(TODO|SKIP)' "$out" | head -n 10
                        grep -E '^# Looks like|Dubious|died|^Bail out|timed out|Parse errors|^error running SQL|[^#].* line [0-9]+\.$' "$out" | head -n 8
                        grep -E '^ok [0-9]+' "$out" | tail -n 1 | sed 's/^/last passing: /'; } | cut -c1-200)
            for log in "$WORK/tap/tmp_check/log/regress_log_$base" "$WORK/tap/tmp_check/log/${base}_"*.log; do
                [ -f "$log" ] || continue
                say "tail of $log"
                tail -n 80 "$log"
            done
        fi
        # A test killed by the timeout may leave servers behind: stop them now.
        agog_cleanup_workdir "$WORK/tap" || true
    done
    say "TAP logs in $WORK/tap/tmp_check/log (kept if anything failed)"
}

if [ "$MODE" = all ] || [ "$MODE" = regress ]; then run_regress; fi
if [ "$MODE" = all ] || [ "$MODE" = tap ]; then run_tap; fi

finish
