
# agog-agent and SIGTERM: idle, it exits 0 at once; with a task running it
# stops claiming and lets the command finish within --grace (the task
# completes); when the grace runs out it stops the command and gives the
# task back with a failed notice saying it was interrupted (the workflow
# retries it, another runner completes it); a second SIGTERM does not wait
# for the grace; a SIGTERM that comes while a statement waits is not lost.

use strict;
use warnings;

use Time::HiRes qw(usleep);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;
use AgogAgentTest;

my ($nats, $node, $dir, $cap) = AgogAgentTest::setup();
my $dsn = $node->connstr('postgres');

sub psql { return $node->safe_psql('postgres', @_); }

# A command that says it started (a file), sleeps $AGOG_SLEEP_<attempt>
# seconds (default 0) and prints a report.
my $cmd = AgogAgentTest::script($dir, 'sleeper.sh', <<'EOS');
cat >/dev/null
echo $$ >"$CAPTURE/$AGOG_FEATURE.$AGOG_ATTEMPT.started"
var=SLEEP_$AGOG_ATTEMPT
echo "sleeping ${!var:-0} s" >&2
if [ "${IGNORE_TERM:-0}" = 1 ]; then
    (trap '' TERM; exec sleep "${!var:-0}") &
else
    sleep "${!var:-0}" &
fi
echo $! >"$CAPTURE/$AGOG_FEATURE.$AGOG_ATTEMPT.child"
wait
echo "# done with $AGOG_FEATURE on attempt $AGOG_ATTEMPT"
EOS
$node->safe_psql('postgres', q{SELECT agog_define_pipeline('one', '[{"stage": "work", "agent": "jen",
	"timeout": "120 seconds", "max_attempts": 3, "retry_backoff": "0 seconds"}]')});

sub runner
{
	my (%o) = @_;
	return AgogAgentTest::Runner->start(
		agent => 'jen', dsn => $dsn, command => [$cmd],
		%o, env => { CAPTURE => $cap, %{ $o{env} || {} } });
}

sub started
{
	my ($feature, $attempt, $timeout_s) = @_;
	return AgogNatsTest::wait_for(sub { -s "$cap/$feature.$attempt.started" }, $timeout_s // 20);
}

# The notices of workflow $wf: "attempt|status|outcome|summary" per line.
sub notices
{
	my ($wf) = @_;
	return psql(qq{
		SELECT n.attempt || '|' || (n.notice->>'status') || '|' || n.outcome || '|' || (n.notice->>'summary')
		  FROM agog_nats.notices n JOIN agog_nats.tasks t ON t.id = n.task_id
		 WHERE t.workflow_id = $wf ORDER BY n.attempt});
}

# --- idle --------------------------------------------------------------------------
my $r = runner();
ok($r->wait_log(qr/ready/, 20), 'a runner starts');
my $t0 = Time::HiRes::time();
$r->signal('TERM');
is($r->wait_exit(10), 0, 'idle, it exits 0 on SIGTERM');
cmp_ok(Time::HiRes::time() - $t0, '<', 1.5, '... within 1.5 s');
like($r->log_text, qr/stopping\n.*stopped after 0 tasks/s, '... and says so');

# --- SIGTERM, the command finishes within the grace: the task completes ----------
$r = runner(args => [ '--grace', '20' ], env => { SLEEP_1 => 3 });
ok($r->wait_log(qr/ready/, 20), 'a runner with --grace 20 starts');
my $wf = AgogAgentTest::start_workflow($node, 'graceful', 'one');
ok(started('graceful', 1), 'its command runs');
$t0 = Time::HiRes::time();
$r->signal('TERM');
ok($r->wait_log(qr/stopping: no new tasks; waiting up to 20 s for 1 running task/, 5),
	'on SIGTERM it stops claiming and waits for the running task');
# Another task for the same agent meanwhile: it must not be claimed.
my $wf2 = AgogAgentTest::start_workflow($node, 'not-claimed', 'one');
is($r->wait_exit(20), 0, 'it exits 0 once the command finished');
my $took = Time::HiRes::time() - $t0;
cmp_ok($took, '<', 10, sprintf('... after the command, within the grace (%.1f s)', $took));
is(AgogAgentTest::wait_workflow($node, $wf, 10), 'completed', 'the running task completed');
like(notices($wf), qr/^1\|complete\|advanced\|done with graceful on attempt 1$/, '... once, at its first attempt');
like($r->log_text, qr/graceful attempt 1 \(task \d+\): ok -> advanced/, 'the task line says so');
is(psql("SELECT state FROM agog_nats.tasks WHERE workflow_id = $wf2"), 'dispatched',
	'a task dispatched after the SIGTERM was not claimed');

# The next runner takes it; cancel it to keep the agent's queue empty.
$r = runner();
is(AgogAgentTest::wait_workflow($node, $wf2, 30), 'completed', 'the next runner takes the waiting task');
is($r->stop(10), 0, 'and stops');

# --- SIGTERM, the grace runs out: the task is given back and retried ----------------
$r = runner(args => [ '--grace', '1' ], env => { SLEEP_1 => 60 });
ok($r->wait_log(qr/ready/, 20), 'a runner with --grace 1 starts');
$wf = AgogAgentTest::start_workflow($node, 'given-back', 'one');
ok(started('given-back', 1), 'its command runs (60 s)');
my $child = AgogAgentTest::slurp("$cap/given-back.1.child");
chomp $child;
$t0 = Time::HiRes::time();
$r->signal('TERM');
is($r->wait_exit(15), 0, 'SIGTERM: it exits 0');
$took = Time::HiRes::time() - $t0;
cmp_ok($took, '>=', 0.9, sprintf('... after the grace (%.1f s)', $took));
cmp_ok($took, '<', 5, '... and not much later');
ok(!AgogAgentTest::pid_alive($child), 'the command (and its child) was stopped');
like(notices($wf),
	qr/^1\|failed\|retried\|agog-agent was stopped \(SIGTERM\) before the command finished: the task is given back to be retried$/,
	'the task was given back with a failed notice saying it was interrupted; the workflow retries it');
like($r->log_text, qr/given-back attempt 1 \(task \d+\): interrupted -> retried/, 'the task line says interrupted');
ok(AgogNatsTest::wait_for(
		sub { psql("SELECT state || ':' || attempt FROM agog_nats.tasks WHERE workflow_id = $wf") eq 'dispatched:2' },
		15),
	'the task is dispatched again (attempt 2)');
$r = runner();
is(AgogAgentTest::wait_workflow($node, $wf, 30), 'completed', 'another runner completes it');
like(notices($wf), qr/\n2\|complete\|advanced\|done with given-back on attempt 2$/, '... at attempt 2');
is($r->stop(10), 0, 'that runner stops');

# --- a child that ignores SIGTERM outlives the command: SIGKILL for it ---------------
# The command exits on SIGTERM; the sleep it started ignores it.  The runner
# stopped signalling once the command itself had exited, and the sleep lived on.
$r = runner(args => [ '--grace', '1' ], env => { SLEEP_1 => 60, IGNORE_TERM => 1 });
ok($r->wait_log(qr/ready/, 20), 'a runner with --grace 1 starts (its command\'s child ignores SIGTERM)');
$wf = AgogAgentTest::start_workflow($node, 'stubborn', 'one');
ok(started('stubborn', 1), 'its command runs (60 s)');
$child = AgogAgentTest::slurp("$cap/stubborn.1.child");
chomp $child;
$r->signal('TERM');
is($r->wait_exit(15), 0, 'SIGTERM: it exits 0 after the grace');
ok(AgogNatsTest::wait_for(sub { !AgogAgentTest::pid_alive($child) }, 5),
	'the child that ignored SIGTERM is killed too');
kill 'KILL', $child if AgogAgentTest::pid_alive($child);
$node->safe_psql('postgres', "SELECT agog_cancel_workflow($wf)");

# --- a second SIGTERM does not wait for the grace --------------------------------------
$r = runner(args => [ '--grace', '60' ], env => { SLEEP_1 => 60 });
ok($r->wait_log(qr/ready/, 20), 'a runner with --grace 60 starts');
$wf = AgogAgentTest::start_workflow($node, 'impatient', 'one');
ok(started('impatient', 1), 'its command runs');
$t0 = Time::HiRes::time();
$r->signal('TERM');
ok($r->wait_log(qr/stopping: no new tasks/, 5), 'first SIGTERM: waiting for the grace');
usleep(300_000);
ok($r->is_running, '... still running');
$r->signal('TERM');
is($r->wait_exit(10), 0, 'second SIGTERM: it exits 0');
cmp_ok(Time::HiRes::time() - $t0, '<', 5, '... without waiting for the 60 s grace');
like($r->log_text, qr/second signal: stopping the running commands now/, '... and says so');
like(notices($wf), qr/^1\|failed\|retried\|agog-agent was stopped \(SIGTERM\)/, 'the task was given back');
$node->safe_psql('postgres', "SELECT agog_cancel_workflow($wf)");

# --- SIGTERM while a statement waits: not lost ---------------------------------------
# A signal that came while the runner waited inside a statement (here its
# claim, held by a lock) was taken off the self-pipe by that wait; the
# runner then slept its whole --poll before it looked at it.
$r = runner(args => [ '--poll', '60' ]);
ok($r->wait_log(qr/ready/, 20), 'a runner with --poll 60 starts');
my $locker = $node->background_psql('postgres');
$locker->query_safe('BEGIN; LOCK TABLE agog_nats.tasks IN ACCESS EXCLUSIVE MODE');
psql("NOTIFY agog_task_jen, '0'");    # the runner claims at once, and waits on the lock
ok(AgogNatsTest::wait_for(
		sub {
			psql("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'agog-agent%' "
				  . "AND wait_event_type = 'Lock'") > 0;
		},
		10),
	'its claim waits on the lock');
$r->signal('TERM');
usleep(500_000);
ok($r->is_running, '... and still runs while it waits');
$locker->query_safe('ROLLBACK');
$t0 = Time::HiRes::time();
is($r->wait_exit(20), 0, 'once the claim returns, it exits 0');
cmp_ok(Time::HiRes::time() - $t0, '<', 3,
	sprintf('... within 3 s of the lock\'s release, not after its 60 s poll (%.1f s)', Time::HiRes::time() - $t0));
$locker->quit;

my @left = glob("$ENV{TMPDIR}/agog-agent.*");
is(scalar(@left), 0, 'no task directory is left in TMPDIR') or diag("@left");

$node->stop;
$nats->stop;
done_testing();
