
# Fault suite (issue 3, point 7): the worker hitting an error exits with
# code 1, so the postmaster starts it again, and never with code 0 (which
# would leave it stopped for good); the reports then get published exactly
# once.
#   A. agog_nats.outbox renamed while reports are pending. The worker looks
#      the outbox up by name (agog_worker.c: get_relname_relid("outbox")) and
#      skips it when missing, but a drain already under way fails on the
#      name (the claim function names agog_nats.outbox): either way the
#      reports wait, any exit is with code 1, and a worker runs.
#   B. The drain fails before anything is sent: a constraint refuses the
#      claim (attempts may not grow).
#   C. The drain fails between publish and mark-done: a constraint refuses
#      state 'published', so the transaction that records the PubAcks fails
#      after JetStream has stored the reports. The worker exits 1, is
#      restarted, sends them again (deduplicated), fails again, until the
#      constraint goes; then each report is in JetStream once.

use strict;
use warnings;

use Time::HiRes ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;
use AgogExactlyOnce;

my $t_start = Time::HiRes::time();
my $nats = AgogNatsTest::NatsServer->new(name => 'nats');
$nats->start;
my $node = AgogExactlyOnce::setup_node('wfault', $nats->url);

# The worker's exits (pid => exit code) logged since byte $from.
sub worker_exits
{
	my ($from) = @_;
	my $log = slurp_file($node->logfile, $from);
	my @e;
	push @e, [ $1, $2 ]
	  while $log =~ /background worker "agog_nats worker" \(PID (\d+)\) exited with exit code (\d+)/g;
	return @e;
}

sub exit_codes { my ($from) = @_; return join(',', map { $_->[1] } worker_exits($from)); }

# Wait for $n exits of the worker logged since $from.
sub wait_exits
{
	my ($from, $n, $timeout_s) = @_;
	return AgogExactlyOnce::wait_until(sub { worker_exits($from) >= $n }, $timeout_s, 0.2);
}

my $log_start = -s $node->logfile;

# --- A. the outbox renamed while reports are pending -----------------------------------
$nats->stop;
AgogExactlyOnce::commit_reports($node, 'wfa-', 20);
$node->safe_psql('postgres', 'ALTER TABLE agog_nats.outbox RENAME TO outbox_x');
my $from = -s $node->logfile;
$nats->start;
ok(AgogExactlyOnce::wait_until(
		sub { AgogExactlyOnce::try_query($node, 'SELECT connected FROM agog_worker_status()') eq 't' }, 15),
	'A: the worker reconnected to nats-server');
Time::HiRes::sleep(3);
is($node->safe_psql('postgres', "SELECT count(*) FROM agog_nats.outbox_x WHERE state = 'pending'"),
	'20', 'A: with the outbox renamed the 20 reports stay pending');
like(exit_codes($from), qr/^(1(,1)*)?$/, 'A: any exit of the worker was with code 1: "' . exit_codes($from) . '"');
ok(AgogExactlyOnce::wait_until(sub { AgogExactlyOnce::worker_pid($node) }, 10), 'A: a worker is running');
$node->safe_psql('postgres', 'ALTER TABLE agog_nats.outbox_x RENAME TO outbox');
ok(AgogExactlyOnce::wait_drained($node, 'wfa-', 15), 'A: renamed back: published within 15 s');
AgogExactlyOnce::check(node => $node, nats => $nats, prefix => 'wfa-', name => 'A: outbox renamed', expect => 20);

# --- B. the claim fails ----------------------------------------------------------------
$from = -s $node->logfile;
$node->safe_psql('postgres',
	'ALTER TABLE agog_nats.outbox ADD CONSTRAINT agog_test_no_claim CHECK (attempts = 0) NOT VALID');
AgogExactlyOnce::commit_reports($node, 'wfb-', 20);
ok(wait_exits($from, 2, 25), 'B: the failing drain ends the worker twice within 25 s');
like(slurp_file($node->logfile, $from), qr/agog_test_no_claim/, 'B: the log names the failing constraint');
like(exit_codes($from), qr/^1(,1)+$/, 'B: the worker exited with code 1 each time: ' . exit_codes($from));
my @pids = map { $_->[0] } worker_exits($from);
isnt($pids[0], $pids[1], 'B: the postmaster started it again (another pid)');
is(AgogExactlyOnce::count_state($node, 'wfb-', 'published'), '0', 'B: nothing was published');
$node->safe_psql('postgres', 'ALTER TABLE agog_nats.outbox DROP CONSTRAINT agog_test_no_claim');
ok(AgogExactlyOnce::wait_drained($node, 'wfb-', 20), 'B: constraint dropped: published within 20 s');
AgogExactlyOnce::check(node => $node, nats => $nats, prefix => 'wfb-', name => 'B: claim failed', expect => 20);

# --- C. mark-done fails after the publish ------------------------------------------------------
ok(AgogExactlyOnce::wait_until(sub { (AgogExactlyOnce::streams_ok($node) // 0) == 6 }, 15),
	'C: the worker is up with its streams');
$from = -s $node->logfile;
$node->safe_psql('postgres',
	"ALTER TABLE agog_nats.outbox ADD CONSTRAINT agog_test_no_publish CHECK (state <> 'published') NOT VALID");
AgogExactlyOnce::commit_reports($node, 'wfc-', 20);
ok(wait_exits($from, 2, 25), 'C: the failing mark-done ends the worker twice within 25 s');
like(slurp_file($node->logfile, $from), qr/agog_test_no_publish/, 'C: the log names the failing constraint');
like(exit_codes($from), qr/^1(,1)+$/, 'C: the worker exited with code 1 each time: ' . exit_codes($from));
is(AgogExactlyOnce::count_state($node, 'wfc-', 'published'), '0', 'C: nothing is marked published');
$node->safe_psql('postgres', 'ALTER TABLE agog_nats.outbox DROP CONSTRAINT agog_test_no_publish');
ok(AgogExactlyOnce::wait_drained($node, 'wfc-', 20), 'C: constraint dropped: published within 20 s');
my $res = AgogExactlyOnce::check(node => $node, nats => $nats, prefix => 'wfc-', name => 'C: mark-done failed',
	expect => 20);
is($res->{duplicates}, 20, 'C: each was already in JetStream and acked as a duplicate on the resend');

# --- never exit code 0 ---------------------------------------------------------------------
my @all = worker_exits($log_start);
ok(!grep({ $_->[1] == 0 } @all),
	'the worker never exited with code 0 (' . scalar(@all) . ' exits: ' . exit_codes($log_start) . ')');
unlike(slurp_file($node->logfile, $log_start), qr/"agog_nats worker" \(PID \d+\) exited with exit code 0/,
	'the log has no "exited with exit code 0" for the worker');

# Still exactly once for everything, at the end.
AgogExactlyOnce::check(node => $node, nats => $nats, prefix => 'wf', name => 'A+B+C', expect => 60);

$node->stop;
$nats->stop;
note(sprintf('160_worker_fault took %.1f s', Time::HiRes::time() - $t_start));
done_testing();
