
# agog-agent when the database connection drops: its session terminated
# while a command runs, or just before it completes the task; PostgreSQL
# restarted while a command runs (the lease survives: the task completes,
# once); PostgreSQL down for longer than the lease (the worker retries the
# task, the runner stops the command when it learns the lease is lost, and
# the task is completed once, by the retry). After a reconnect it listens
# again: a new task is claimed at once, not at the next poll.

use strict;
use warnings;

use Time::HiRes qw(usleep);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use POSIX ();
use AgogNatsTest;
use AgogAgentTest;
use AgogProxy;

my ($nats, $node, $dir, $cap) = AgogAgentTest::setup();
my $dsn = $node->connstr('postgres');

sub psql { return $node->safe_psql('postgres', @_); }

# Sleeps $SLEEP_<attempt> seconds; with KILL_SESSION=1 it terminates the
# runner's database session just before it exits.
my $cmd = AgogAgentTest::script($dir, 'worker.sh', <<'EOS');
cat >/dev/null
echo $$ >"$CAPTURE/$AGOG_FEATURE.$AGOG_ATTEMPT.started"
var=SLEEP_$AGOG_ATTEMPT
sleep "${!var:-0}" &
echo $! >"$CAPTURE/$AGOG_FEATURE.$AGOG_ATTEMPT.child"
wait
if [ "${KILL_SESSION:-0}" = 1 ]; then
    psql -X -q -At -d "$AGOG_TEST_DSN" \
         -c "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'agog-agent jen'" >&2
fi
touch "$CAPTURE/$AGOG_FEATURE.$AGOG_ATTEMPT.finished"
echo "# done with $AGOG_FEATURE on attempt $AGOG_ATTEMPT"
EOS
psql(q{SELECT agog_define_pipeline('one', '[{"stage": "work", "agent": "jen",
	"timeout": "120 seconds", "max_attempts": 3, "retry_backoff": "0 seconds"}]')});

sub runner
{
	my (%o) = @_;
	return AgogAgentTest::Runner->start(
		agent => 'jen', dsn => $dsn, command => [$cmd],
		%o, env => { CAPTURE => $cap, AGOG_TEST_DSN => $dsn, %{ $o{env} || {} } });
}

sub started
{
	my ($feature, $attempt, $timeout_s) = @_;
	return AgogNatsTest::wait_for(sub { -s "$cap/$feature.$attempt.started" }, $timeout_s // 20);
}

sub notices
{
	my ($wf) = @_;
	return psql(qq{
		SELECT n.attempt || '|' || (n.notice->>'status') || '|' || n.outcome
		  FROM agog_nats.notices n JOIN agog_nats.tasks t ON t.id = n.task_id
		 WHERE t.workflow_id = $wf ORDER BY n.attempt});
}

sub reports
{
	my ($feature) = @_;
	return psql("SELECT count(*) FROM agog_nats.outbox WHERE kind = 'report' AND feature = '$feature'");
}

# --- the session is terminated while the command runs ---------------------------
my $r = runner(args => [ '--lease', '10', '--poll', '60' ], env => { SLEEP_1 => 3 });
ok($r->wait_log(qr/ready/, 20), 'a runner starts (lease 10 s, poll 60 s)');
my $wf = AgogAgentTest::start_workflow($node, 'terminated', 'one');
ok(started('terminated', 1), 'its command runs');
is(psql(q{SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'agog-agent jen'}),
	'1', 'its database session is terminated');
ok($r->wait_log(qr/lost the database connection: .*; reconnecting/, 10), 'it notices');
ok($r->wait_log(qr/reconnected to the database after/, 10), 'and reconnects');
is(AgogAgentTest::wait_workflow($node, $wf, 30), 'completed', 'the task completes');
is(notices($wf), '1|complete|advanced', '... once, at its first attempt');
is(reports('terminated'), '1', 'one report');

# --- the session is terminated just before the completion --------------------------
$r->stop(10);
$r = runner(args => [ '--lease', '10', '--poll', '60' ], env => { KILL_SESSION => 1 });
ok($r->wait_log(qr/ready/, 20), 'a runner whose command terminates the runner\'s session as it ends');
$wf = AgogAgentTest::start_workflow($node, 'cut-off', 'one');
is(AgogAgentTest::wait_workflow($node, $wf, 30), 'completed', 'the completion is made after the reconnect');
is(notices($wf), '1|complete|advanced', '... once');
is(reports('cut-off'), '1', 'one report');
like($r->log_text, qr/lost the database connection.*\n(.*\n)*.*reconnected.*\n(.*\n)*.*cut-off attempt 1 \(task \d+\): ok -> advanced/,
	'lost, reconnected, completed');

# After the reconnect it listens again: a new task is claimed at once.
my $t0 = Time::HiRes::time();
$wf = AgogAgentTest::start_workflow($node, 'after-reconnect', 'one');
is(AgogAgentTest::wait_workflow($node, $wf, 30), 'completed', 'a task dispatched after the reconnect completes');
cmp_ok(Time::HiRes::time() - $t0, '<', 10, '... at once (LISTEN again; the poll is every 60 s)');
is($r->stop(10), 0, 'the runner stops');

# --- PostgreSQL restarted while the command runs: the lease survives -----------------
$r = runner(args => [ '--lease', '20' ], env => { SLEEP_1 => 6 });
ok($r->wait_log(qr/ready/, 20), 'a runner starts (lease 20 s)');
$wf = AgogAgentTest::start_workflow($node, 'restarted', 'one');
ok(started('restarted', 1), 'its command runs (6 s)');
$node->restart;
ok($r->wait_log(qr/lost the database connection/, 10), 'PostgreSQL restarted: the runner lost its connection');
ok($r->wait_log(qr/reconnected to the database after/, 20), 'it reconnects');
is(AgogAgentTest::wait_workflow($node, $wf, 40), 'completed', 'the task completes');
is(notices($wf), '1|complete|advanced', '... once, at its first attempt (the lease was kept)');
is(reports('restarted'), '1', 'one report');
ok(AgogNatsTest::wait_for(
		sub { psql(q{SELECT state FROM agog_nats.reports WHERE kind = 'report' AND feature = 'restarted'}) eq 'published' },
		20),
	'the report reaches JetStream (the worker has its PubAck)');
is($r->stop(10), 0, 'the runner stops');

# --- PostgreSQL down for longer than the lease: the task is retried, completed once ------
$r = runner(args => [ '--lease', '3' ], env => { SLEEP_1 => 12, SLEEP_2 => 0 });
ok($r->wait_log(qr/ready/, 20), 'a runner starts (lease 3 s)');
$wf = AgogAgentTest::start_workflow($node, 'outage', 'one');
ok(started('outage', 1), 'its command runs (12 s)');
my $child = AgogAgentTest::slurp("$cap/outage.1.child");
chomp $child;
$node->stop;
ok($r->wait_log(qr/lost the database connection/, 10), 'PostgreSQL stopped: the runner lost its connection');
sleep 5;                   # the outage: longer than the lease
$node->start;
ok($r->wait_log(qr/is no longer ours .*: stopping its command/, 40),
	'after the outage the runner learns that the lease was lost and stops the command');
ok($r->wait_log(qr/outage attempt 1 \(task \d+\): lease lost -> lost/, 20), 'the task line says lost');
is(AgogAgentTest::wait_workflow($node, $wf, 40), 'completed', 'the retried task completes');
is(notices($wf), '2|complete|advanced', 'completed once, by attempt 2; attempt 1 sent no notice');
ok(!-e "$cap/outage.1.finished", 'the command of attempt 1 never finished');
ok(!AgogAgentTest::pid_alive($child), '... it was stopped');
is(reports('outage'), '1', 'one report');
like(psql("SELECT detail->>'reason' FROM agog_nats.events WHERE workflow_id = $wf AND kind = 'task_retry'"),
	qr/lease lost/, 'the worker retried attempt 1 because its lease was lost');
is($r->stop(10), 0, 'the runner stops');

# --- PostgreSQL down when the command ends: the runner waits, it does not spin ------
# A task whose command has ended is completed as soon as the database is
# back; until then the runner waited 0 s at every turn of its loop (one
# core at 100 % for the whole outage).
sub cpu_s
{
	my ($pid) = @_;
	my $stat = AgogAgentTest::slurp("/proc/$pid/stat");
	$stat =~ s/^.*\) //s;    # past the command name
	my @f = split ' ', $stat;
	return ($f[11] + $f[12]) / POSIX::sysconf(POSIX::_SC_CLK_TCK());    # utime, stime
}
$r = runner(env => { SLEEP_1 => 1 });
ok($r->wait_log(qr/ready/, 20), 'a runner starts');
$wf = AgogAgentTest::start_workflow($node, 'ended', 'one');
ok(started('ended', 1), 'its command runs (1 s)');
$node->stop;
ok(AgogNatsTest::wait_for(sub { -e "$cap/ended.1.finished" }, 10), 'the command ends while PostgreSQL is down');
my $cpu0 = cpu_s($r->pid);
sleep 3;
my $cpu = cpu_s($r->pid) - $cpu0;
cmp_ok($cpu, '<', 0.5, sprintf('the runner waits for the database without spinning (%.2f s of CPU in 3 s)', $cpu));
$node->start;
is(AgogAgentTest::wait_workflow($node, $wf, 40), 'completed', 'once PostgreSQL is back, the task completes');
is(notices($wf), '1|complete|advanced', '... by its first attempt');
is($r->stop(10), 0, 'the runner stops');

# --- the reply to a failed notice is lost after its commit ----------------------------
# The runner sends the notice again after its reconnect; the database
# refuses it (the task is no longer running).  The runner must look up
# whether its first one was recorded, as it does for a completion: it said
# "lost", although the notice had been applied and the task retried.
$node->append_conf('postgresql.conf', "listen_addresses = '127.0.0.1'\n");
$node->restart;
my $proxy = AgogProxy->new(target_port => $node->port, name => 'pgproxy');
$proxy->start;
my $failer = AgogAgentTest::script($dir, 'failer.sh', <<'EOS');
cat >/dev/null
echo $$ >"$CAPTURE/$AGOG_FEATURE.$AGOG_ATTEMPT.started"
while [ ! -e "$CAPTURE/$AGOG_FEATURE.go" ]; do sleep 0.05; done
echo "failing on purpose" >&2
exit 3
EOS
$r = AgogAgentTest::Runner->start(
	agent => 'jen', dsn => 'host=127.0.0.1 port=' . $proxy->port . ' dbname=postgres',
	command => [$failer], env => { CAPTURE => $cap });
ok($r->wait_log(qr/ready/, 20), 'a runner connected through a proxy starts');
$wf = AgogAgentTest::start_workflow($node, 'cut-failed', 'one');
ok(started('cut-failed', 1), 'its command runs');
$proxy->mode('drop_s2c');
open my $go, '>', "$cap/cut-failed.go" or die "cannot write $cap/cut-failed.go: $!";
close $go;
ok(AgogNatsTest::wait_for(sub { ((split /\n/, notices($wf))[0] // '') eq '1|failed|retried' }, 15),
	'the command fails: its notice is recorded, and the reply never reaches the runner');
$proxy->mode('pass');
$proxy->reset;
ok($r->wait_log(qr/reconnected to the database after/, 30), 'the runner reconnects');
ok($r->wait_log(qr/cut-failed attempt 1 \(task \d+\): exit 3 -> retried/, 20),
	'it learns that its notice was recorded: retried, not lost')
  or diag($r->log_text);
unlike($r->log_text, qr/cut-failed attempt 1 \(task \d+\): .* -> lost/, 'it does not say lost');
is(AgogAgentTest::wait_workflow($node, $wf, 20), 'failed', 'attempts 2 and 3 fail as well: the workflow fails');
is(notices($wf), "1|failed|retried\n2|failed|retried\n3|failed|failed", '... one notice each');
is($r->stop(10), 0, 'the runner stops');
$proxy->stop;

my @left = glob("$ENV{TMPDIR}/agog-agent.*");
is(scalar(@left), 0, 'no task directory is left in TMPDIR') or diag("@left");

$node->stop;
$nats->stop;
done_testing();
