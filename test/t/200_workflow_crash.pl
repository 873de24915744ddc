
# Workflows survive crashes (issue 5, point 8): instant agents (six
# background psql processes, one per agent, each claiming a task,
# publishing its report and completing it with the seed's completion notice
# in one transaction, sleeping up to 60 ms inside it) run two rounds of 20
# `feature` workflows. In the middle of round 1 the worker is killed with
# SIGKILL: with restart_after_crash on the postmaster restarts the whole
# cluster, and the agents reconnect. In the middle of round 2 PostgreSQL is
# stopped with -m immediate and started again. At the end every workflow is
# completed, the event log holds every transition exactly once and in order,
# the notices table one advanced notice per task, and every report and task
# notice of the outbox is in JetStream exactly once.

use strict;
use warnings;

use Time::HiRes ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;
use AgogWorkflowTest;

my $t_start = Time::HiRes::time();
my $N = 20;    # workflows per round
my $TASKS = 6 * $N;

# PostgreSQL::Test::Cluster turns restart_after_crash off; PostgreSQL's
# default, and what a worker crash is about here, is on.
my ($nats, $node) = AgogWorkflowTest::setup('wfcrash', restart_after_crash => \'on');
is($node->safe_psql('postgres', 'SHOW restart_after_crash'), 'on', 'restart_after_crash is on');
AgogWorkflowTest::install_agents($node);

my $pool = AgogWorkflowTest::AgentPool->new($node, max_sleep => 0.06);
$pool->start;

sub count_tasks
{
	my ($round, $state) = @_;
	return AgogWorkflowTest::try_query($node,
		"SELECT count(*) FROM agog_nats.tasks t JOIN agog_nats.workflows w ON w.id = t.workflow_id "
		  . "WHERE w.feature LIKE '$round-%' AND t.state = '$state'") // -1;
}

sub count_workflows
{
	my ($round, $state) = @_;
	return AgogWorkflowTest::try_query($node,
		"SELECT count(*) FROM agog_nats.workflows WHERE feature LIKE '$round-%' AND state = '$state'") // -1;
}

# One round: start $N workflows, wait until a third of their tasks are done,
# crash as $crash says, and wait until all of them are completed.
sub round
{
	my ($round, $what, $crash) = @_;
	my $t0 = Time::HiRes::time();
	is($node->safe_psql('postgres',
			"SELECT count(agog_start_workflow(format('$round-%s', i))) FROM generate_series(1, $N) i"),
		$N, "$round: $N feature workflows started");

	ok(AgogWorkflowTest::wait_for(sub { count_tasks($round, 'completed') >= 40 }, 60, $pool),
		"$round: 40 of $TASKS tasks completed within 60 s");
	my $st      = AgogWorkflowTest::worker_status($node);
	my $done    = count_tasks($round, 'completed');
	my $pending = AgogWorkflowTest::try_query($node,
		q{SELECT count(*) FROM agog_nats.outbox WHERE state = 'pending'}) // '?';
	my $spawns = $pool->spawns;
	my $off    = AgogNatsTest::log_offset($node);
	cmp_ok($done, '<', $TASKS, "$round: the $what comes mid-run ($done of $TASKS tasks completed, $pending outbox rows pending)");
	note("$round: $what with $done of $TASKS tasks completed, $pending outbox rows pending, worker pid $st->{pid}");

	$crash->($st);

	ok(AgogWorkflowTest::wait_for(sub { AgogWorkflowTest::worker_ready($node, $st->{pid}) }, 60, $pool),
		"$round: a new worker is connected with six streams within 60 s of the $what");
	ok(AgogWorkflowTest::wait_for(sub { count_workflows($round, 'completed') == $N }, 120, $pool),
		"$round: all $N workflows completed within 120 s")
	  or diag($node->safe_psql('postgres',
			"SELECT state, current_agents, count(*) FROM agog_nats.workflow_progress WHERE feature LIKE '$round-%' GROUP BY 1, 2"));
	cmp_ok($pool->spawns, '>=', $spawns + 6, "$round: the six agents reconnected after the $what");
	note(sprintf('%s: %.1f s, agents started %d times so far', $round, Time::HiRes::time() - $t0, $pool->spawns));
	return AgogNatsTest::log_since($node, $off);
}

# --- round 1: SIGKILL of the worker -----------------------------------------
my $log1 = round('r1', 'SIGKILL of the worker', sub {
	my ($st) = @_;
	ok(kill('KILL', $st->{pid}), "r1: SIGKILL sent to the worker (pid $st->{pid})");
});
like($log1, qr/background worker "agog_nats worker" \(PID \d+\) was terminated by signal 9/,
	'r1: the postmaster saw the worker killed');
like($log1, qr/all server processes terminated; reinitializing/, 'r1: and restarted the whole cluster');

# --- round 2: PostgreSQL stopped with -m immediate ---------------------------
round('r2', 'immediate stop of PostgreSQL', sub {
	$node->stop('immediate');
	$node->start;
	pass('r2: PostgreSQL stopped with -m immediate and started again');
});

ok($pool->stop(30), 'the agents stop when told');
my @errors = $pool->errors;
is(scalar(@errors), 0, 'the agents saw no error other than the crashes and stops')
  or diag(join("\n", @errors[0 .. ($#errors < 30 ? $#errors : 29)]));

# --- the outbox drains ------------------------------------------------------------
ok(AgogWorkflowTest::wait_for(
		sub {
			(AgogWorkflowTest::try_query($node,
				q{SELECT count(*) FROM agog_nats.outbox WHERE state <> 'published'}) // -1) == 0;
		},
		30),
	'the outbox is drained within 30 s');
ok(AgogWorkflowTest::wait_for(
		sub {
			(AgogWorkflowTest::try_query($node,
				q{SELECT count(*) FROM agog_nats.tasks WHERE state = 'completed' AND report_message_id IS NULL}) // -1) == 0;
		},
		30),
	'the worker resolved the message id of every completed task\'s report within 30 s of the drain');

# --- the event log -------------------------------------------------------------
for my $round ('r1', 'r2')
{
	AgogWorkflowTest::check_event_log($node, $round, "w.feature LIKE '$round-%'",
		no_retries => 1, agent_log => 1, outbox_reports => 1);
}
is($node->safe_psql('postgres', 'SELECT count(*) FROM agog_nats.workflows'), 2 * $N,
	'no workflow other than the two rounds');
is($node->safe_psql('postgres', 'SELECT count(*) FROM agog_nats.bad_notices'), 0, 'no bad notice');

# --- JetStream holds each outbox row exactly once ----------------------------------
is($node->safe_psql('postgres', q{SELECT count(*) FROM agog_nats.outbox WHERE kind = 'report'}),
	$TASKS * 2, 'one report per task in the outbox');
is($node->safe_psql('postgres', q{SELECT count(*) FROM agog_nats.outbox WHERE kind = 'task'}),
	$node->safe_psql('postgres', q{SELECT count(*) FROM agog_nats.events WHERE kind = 'task_dispatched'}),
	'one task notice in the outbox per task_dispatched event');
AgogWorkflowTest::check_exactly_once($nats, $node, 'JetStream');

$node->stop;
note(sprintf('200_workflow_crash: %.1f s', Time::HiRes::time() - $t_start));
done_testing();
