
# The worker's orchestration step must not wait on a task another session
# holds.  It locks the workflow with SKIP LOCKED, but then waited for the
# task's lock: a session that claimed a task and left its transaction open
# (a runner stalled mid-transaction, an administrator's psql) held up the
# step once that task was overdue, and with it everything else the worker
# does in its loop (every other workflow, the outbox).  The step now skips
# such a task until the next step.

use strict;
use warnings;

use Time::HiRes ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;
use AgogWorkflowTest;

my ($nats, $node) = AgogWorkflowTest::setup('skiplock');
sub psql { return $node->safe_psql('postgres', @_); }
psql(q{SELECT agog_define_pipeline('quick', '[{"stage": "s", "agent": "jen", "timeout": "1 second", "max_attempts": 3, "retry_backoff": "0 seconds"}]')});

my $wf = AgogWorkflowTest::start_dispatched($node, 'held', 'quick');

# A session claims it and keeps its transaction open past the deadline.
my $holder = $node->background_psql('postgres');
$holder->query_safe('BEGIN');
like($holder->query_safe("SELECT task_id FROM agog_claim_task('jen', 'stalled')"), qr/^\d+$/,
	'a session claims it in a transaction it leaves open');
Time::HiRes::sleep(1.5);    # the committed task is now past its deadline

# Meanwhile, the worker's other work: a report to publish.
AgogWorkflowTest::worker_not_held($node, 'a task is held');

# Once the session ends (its claim rolled back), the step times the task out.
$holder->query_safe('ROLLBACK');
$holder->quit;
ok(AgogNatsTest::wait_for(
		sub { psql("SELECT attempt >= 2 FROM agog_nats.tasks WHERE workflow_id = $wf") eq 't' }, 15),
	'after the session ends, the overdue task is retried');
psql("SELECT agog_cancel_workflow($wf)");

# --- a timeout that would cancel a task another session holds -------------------
# A task out of attempts fails its workflow and cancels the other tasks:
# one of them claimed in an open transaction held up the step as well.
psql(q{SELECT agog_define_pipeline('pair', '[{"stage": "x", "agent": "jen", "timeout": "1 second", "max_attempts": 1},
	{"stage": "y", "agent": "roy", "timeout": "10 minutes"}]')});
my $wp = AgogWorkflowTest::start_dispatched($node, 'pair', 'pair', 2);
$holder = $node->background_psql('postgres');
$holder->query_safe('BEGIN');
like($holder->query_safe("SELECT task_id FROM agog_claim_task('roy', 'stalled')"), qr/^\d+$/,
	'pair: roy\'s task is claimed in a transaction left open');
Time::HiRes::sleep(1.5);    # jen's task is now past its deadline
AgogWorkflowTest::worker_not_held($node, 'a sibling task is held');
AgogWorkflowTest::release_then_failed($node, $holder, $wp, 'x failed, y cancelled', 'pair (timeout)');

$node->stop;
$nats->stop;
done_testing();
