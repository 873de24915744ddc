
# A completion notice that comes over NATS must not make the worker wait
# for a workflow another session holds.  Applying it locks the workflow and
# the task; a session that locked the workflow and left its transaction
# open (an administrator's psql in the middle of agog_cancel_workflow, a
# runner stalled mid-transaction) held up the worker's whole loop while the
# notice waited: every other workflow, and the outbox.  The worker now puts
# such a notice back (it comes again a second later) and goes on; once the
# session ends, the notice is applied, once.

use strict;
use warnings;

use JSON::PP ();
use Time::HiRes ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;
use AgogWorkflowTest;

my ($nats, $node) = AgogWorkflowTest::setup('noticelock');
sub psql { return $node->safe_psql('postgres', @_); }

is(psql(q{SELECT agog_define_pipeline('solo', '[{"stage": "build", "agent": "jen"}]')}),
	1, 'a one-stage pipeline for jen');

# Start a one-stage workflow for $feature and publish jen's report.
sub started_with_report
{
	my ($feature) = @_;
	my $w = AgogWorkflowTest::start_dispatched($node, $feature, 'solo');
	ok(AgogWorkflowTest::js_publish($nats, "agog.deliverables.jen.frontend.$feature",
			AgogWorkflowTest::jen_report($feature)),
		"$feature: jen publishes its report over NATS");
	return $w;
}

my $wf = started_with_report('held-notice');

# A session locks the workflow and leaves its transaction open.
my $holder = $node->background_psql('postgres');
$holder->query_safe('BEGIN');
$holder->query_safe("SELECT id FROM agog_nats.workflows WHERE id = $wf FOR UPDATE");

my $off = AgogNatsTest::log_offset($node);
ok(AgogWorkflowTest::js_publish($nats, 'agog.notices.jen.held-notice',
		AgogWorkflowTest::jen_notice('held-notice')),
	'jen sends its completion notice while the workflow is held');
my $ci;
ok(AgogNatsTest::wait_for(
		sub {
			$ci = AgogWorkflowTest::consumer_info($nats, 'agog_notices', 'agog_nats_worker');
			$ci && $ci->{delivered}{stream_seq} >= 1;
		},
		10),
	'the worker took the notice');
Time::HiRes::sleep(0.3);

# Meanwhile, the worker's other work: a report to publish.
AgogWorkflowTest::worker_not_held($node, 'a workflow is held');
is(psql("SELECT state FROM agog_nats.tasks WHERE workflow_id = $wf"), 'dispatched',
	'the notice is not applied while the workflow is held');
Time::HiRes::sleep(1.5);
$ci = AgogWorkflowTest::consumer_info($nats, 'agog_notices', 'agog_nats_worker') // {};
cmp_ok($ci->{num_ack_pending} // 0, '>=', 1, 'and not acknowledged');

# The session ends: the notice comes again and is applied, once.
$holder->query_safe('ROLLBACK');
$holder->quit;
ok(AgogNatsTest::wait_for(
		sub { psql("SELECT state FROM agog_nats.workflows WHERE id = $wf") eq 'completed' }, 15),
	'after the session ends, the notice completes the workflow');
is(psql("SELECT count(*) FROM agog_nats.notices n JOIN agog_nats.tasks t ON t.id = n.task_id WHERE t.workflow_id = $wf"),
	1, 'one notice recorded');
is(psql('SELECT count(*) FROM agog_nats.bad_notices'), 0, 'none filed as bad');
ok(AgogNatsTest::wait_for(
		sub {
			my $c = AgogWorkflowTest::consumer_info($nats, 'agog_notices', 'agog_nats_worker') // {};
			($c->{num_ack_pending} // 1) == 0 && ($c->{num_pending} // 1) == 0;
		},
		15),
	'the notice is acknowledged');
unlike(AgogNatsTest::log_since($node, $off), qr/exited with exit code/, 'the worker did not exit');

sub consumer_settled
{
	my $c = AgogWorkflowTest::consumer_info($nats, 'agog_notices', 'agog_nats_worker') // {};
	return ($c->{num_ack_pending} // 1) == 0 && ($c->{num_pending} // 1) == 0;
}

# --- a failure that would cancel a task another session holds ---------------------
# A failed notice with no attempt left fails the workflow and cancels its
# other tasks: one of them claimed in an open transaction held up the
# worker just the same.
is(psql(q{SELECT agog_define_pipeline('pair', '[{"stage": "b", "agent": "jen", "max_attempts": 1},
	{"stage": "c", "agent": "roy"}]')}), 2, 'a pipeline of two parallel stages, jen\'s with one attempt');
my $wp = AgogWorkflowTest::start_dispatched($node, 'pair-1', 'pair', 2);
$holder = $node->background_psql('postgres');
$holder->query_safe('BEGIN');
like($holder->query_safe(q{SELECT task_id FROM agog_claim_task('roy', 'stalled')}), qr/^\d+$/,
	'pair: roy\'s task is claimed in a transaction left open');
ok(AgogWorkflowTest::js_publish($nats, 'agog.notices.jen.pair-1',
		AgogWorkflowTest::jen_notice('pair-1', status => 'failed', ready_for_next_stage => JSON::PP::false,
			blockers => 'cannot build')),
	'pair: jen sends a failed notice (no attempt left)');
Time::HiRes::sleep(0.5);
AgogWorkflowTest::worker_not_held($node, 'a sibling task is held');
AgogWorkflowTest::release_then_failed($node, $holder, $wp, 'b failed, c cancelled', 'pair (notice)');
ok(AgogNatsTest::wait_for(\&consumer_settled, 15), 'pair: the notice is acknowledged');

# --- put back while busy, then a fault: not filed as bad ---------------------------
# Each time a busy notice is put back, JetStream counts a delivery; a
# notice is filed as bad at its fifth failed try, and the busy rounds must
# not count as failed tries.
my $wb = started_with_report('busy-then-fault');
$holder = $node->background_psql('postgres');
$holder->query_safe('BEGIN');
$holder->query_safe("SELECT id FROM agog_nats.workflows WHERE id = $wb FOR UPDATE");
ok(AgogWorkflowTest::js_publish($nats, 'agog.notices.jen.busy-then-fault',
		AgogWorkflowTest::jen_notice('busy-then-fault')),
	'busy-then-fault: the notice is sent while the workflow is held');
Time::HiRes::sleep(8);    # put back about once a second
$off = AgogNatsTest::log_offset($node);
$holder->query_safe('ALTER TABLE agog_nats.notices RENAME TO notices_x');
$holder->query_safe('COMMIT');
$holder->quit;
ok(AgogNatsTest::wait_for(
		sub { AgogNatsTest::log_since($node, $off) =~ /could not apply a completion notice on "agog\.notices\.jen\.busy-then-fault"/ },
		15),
	'busy-then-fault: the lock is gone, and the first try fails (agog_nats.notices renamed)');
is(psql("SELECT count(*) FROM agog_nats.bad_notices WHERE subject = 'agog.notices.jen.busy-then-fault'"), 0,
	'busy-then-fault: it is not filed as bad')
  or diag(psql("SELECT error FROM agog_nats.bad_notices WHERE subject = 'agog.notices.jen.busy-then-fault'"));
psql('ALTER TABLE agog_nats.notices_x RENAME TO notices');
ok(AgogNatsTest::wait_for(sub { psql("SELECT state FROM agog_nats.workflows WHERE id = $wb") eq 'completed' }, 20),
	'busy-then-fault: after the rename back, it completes the workflow');

$node->stop;
$nats->stop;
done_testing();
