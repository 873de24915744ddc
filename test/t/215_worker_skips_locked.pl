
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

my $nats = AgogNatsTest::NatsServer->new(name => 'natslock');
$nats->start;
my $node = AgogNatsTest::new_node('skiplock', $nats);
$node->start;
$node->safe_psql('postgres', q{
	CREATE EXTENSION agog_nats;
	SELECT agog_define_pipeline('quick', '[{"stage": "s", "agent": "jen", "timeout": "1 second", "max_attempts": 3, "retry_backoff": "0 seconds"}]');
});
ok(AgogNatsTest::wait_for(sub { AgogNatsTest::worker_ready($node) }, 30),
	'the worker is connected with its streams');

sub psql { return $node->safe_psql('postgres', @_); }

my $wf = psql("SELECT agog_start_workflow('held', 'quick')");
ok(AgogNatsTest::wait_for(
		sub { psql("SELECT count(*) FROM agog_nats.tasks WHERE workflow_id = $wf AND state = 'dispatched'") == 1 },
		10),
	'the task is dispatched (1 s timeout)');

# A session claims it and keeps its transaction open past the deadline.
my $holder = $node->background_psql('postgres');
$holder->query_safe('BEGIN');
like($holder->query_safe("SELECT task_id FROM agog_claim_task('jen', 'stalled')"), qr/^\d+$/,
	'a session claims it in a transaction it leaves open');
Time::HiRes::sleep(1.5);    # the committed task is now past its deadline

# Meanwhile, the worker's other work: a report to publish.
my $t0 = Time::HiRes::time();
my $id = psql("SELECT agog_publish_report('roy', 'backend', 'meanwhile', 'published while a task is held')");
ok(AgogNatsTest::wait_for(
		sub { psql("SELECT state FROM agog_nats.outbox WHERE id = $id") eq 'published' }, 10),
	'a report committed meanwhile is published')
  or diag(psql("SELECT pid, wait_event_type, wait_event, left(query, 60) FROM pg_stat_activity "
		  . "WHERE backend_type = 'agog_nats worker'"));
note(sprintf('published %.2f s after its commit', Time::HiRes::time() - $t0));
is(psql("SELECT wait_event_type IS DISTINCT FROM 'Lock' FROM pg_stat_activity WHERE backend_type = 'agog_nats worker'"),
	't', 'the worker does not wait on the held task');

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
my $wp = psql("SELECT agog_start_workflow('pair', 'pair')");
ok(AgogNatsTest::wait_for(
		sub { psql("SELECT count(*) FROM agog_nats.tasks WHERE workflow_id = $wp AND state = 'dispatched'") == 2 }, 10),
	'pair: both tasks are dispatched (jen\'s with a 1 s timeout and one attempt)');
$holder = $node->background_psql('postgres');
$holder->query_safe('BEGIN');
like($holder->query_safe("SELECT task_id FROM agog_claim_task('roy', 'stalled')"), qr/^\d+$/,
	'pair: roy\'s task is claimed in a transaction left open');
Time::HiRes::sleep(1.5);    # jen's task is now past its deadline
$id = psql("SELECT agog_publish_report('roy', 'backend', 'meanwhile', 'published while a sibling is held')");
ok(AgogNatsTest::wait_for(
		sub { psql("SELECT state FROM agog_nats.outbox WHERE id = $id") eq 'published' }, 10),
	'pair: a report committed meanwhile is published')
  or diag(psql("SELECT pid, wait_event_type, wait_event, left(query, 60) FROM pg_stat_activity "
		  . "WHERE backend_type = 'agog_nats worker'"));
is(psql("SELECT wait_event_type IS DISTINCT FROM 'Lock' FROM pg_stat_activity WHERE backend_type = 'agog_nats worker'"),
	't', 'pair: the worker does not wait on the held sibling');
$holder->query_safe('ROLLBACK');
$holder->quit;
ok(AgogNatsTest::wait_for(sub { psql("SELECT state FROM agog_nats.workflows WHERE id = $wp") eq 'failed' }, 15),
	'pair: after the session ends, the timeout fails the workflow');
is(psql("SELECT string_agg(stage || ' ' || state, ', ' ORDER BY stage) FROM agog_nats.tasks WHERE workflow_id = $wp"),
	'x failed, y cancelled', 'pair: and cancels roy\'s task');

$node->stop;
$nats->stop;
done_testing();
