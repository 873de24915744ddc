
# Scale (issue 5, point 8): 1,000 concurrent `feature` workflows with instant
# agents (six background psql processes, one per agent, each claiming,
# publishing its report and completing in one transaction, in a loop) all
# end completed; wall time and workflows/s are printed with where the time
# went; the event log is consistent (aggregate checks), the outbox drained,
# and JetStream holds every report and task notice exactly once.
#
# First, the handoff latency: ten workflows run one at a time by a single
# SQL agent that records the time right after each completion's COMMIT;
# the latency is the next stage's tasks.dispatched_at minus that time (and,
# for information, until the next task notice is in JetStream). p50/p99 over
# the 50 handoffs are printed; not a timed assertion.

use strict;
use warnings;

use Time::HiRes ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;
use AgogWorkflowTest;

my $t_start = Time::HiRes::time();
my $N = 1000;

my ($nats, $node) = AgogWorkflowTest::setup('wfscale', log_statement => 'none');
AgogWorkflowTest::install_agents($node);

# --- handoff latency -------------------------------------------------------------
$node->safe_psql('postgres', <<'EOSQL');
CREATE TABLE handoff (workflow_id bigint NOT NULL, task_id bigint, committed_at timestamptz NOT NULL);
CREATE PROCEDURE handoff_run(n int, prefix text)
LANGUAGE plpgsql AS $$
DECLARE
    wf bigint;
    a text;
    c record;
    tt text;
    res text;
BEGIN
    FOR i IN 1..n LOOP
        wf := agog_start_workflow(format('%s-%s', prefix, i));
        COMMIT;
        INSERT INTO handoff VALUES (wf, NULL, clock_timestamp());
        COMMIT;
        FOREACH a IN ARRAY ARRAY['cynthia', 'sylvia', 'roy', 'jen', 'billy', 'priya'] LOOP
            FOR k IN 1..20000 LOOP
                SELECT * INTO c FROM agog_claim_task(a, 'handoff');
                EXIT WHEN c.task_id IS NOT NULL;
                COMMIT;
                PERFORM pg_sleep(0.0005);
            END LOOP;
            IF c.task_id IS NULL THEN
                RAISE EXCEPTION 'no task for % within 10 s', a;
            END IF;
            IF c.workflow_id <> wf THEN
                RAISE EXCEPTION 'claimed task % of workflow %, expected workflow %', c.task_id, c.workflow_id, wf;
            END IF;
            tt := c.notice ->> 'taskType';
            PERFORM agog_publish_report(a, tt, c.feature, format('# %s on %s', tt, c.feature));
            res := agog_complete_task(c.task_id, agent_notice(a, tt, c.feature, c.task_id));
            IF res <> 'advanced' THEN
                RAISE EXCEPTION 'task %: %', c.task_id, res;
            END IF;
            COMMIT;
            INSERT INTO handoff VALUES (wf, c.task_id, clock_timestamp());
            COMMIT;
        END LOOP;
    END LOOP;
END
$$;
EOSQL

my $t_ho = Time::HiRes::time();
my ($rc, $out, $err) = $node->psql('postgres', q{CALL handoff_run(10, 'handoff')});
is($rc, 0, 'ten workflows run one at a time by a SQL agent') or diag($err);
note(sprintf('handoff run: %.2f s', Time::HiRes::time() - $t_ho));
ok(AgogWorkflowTest::wait_for(
		sub {
			(AgogWorkflowTest::try_query($node,
				q{SELECT count(*) FROM agog_nats.workflows WHERE feature LIKE 'handoff-%' AND state = 'completed'}) // 0) == 10
			  && (AgogWorkflowTest::try_query($node,
				q{SELECT count(*) FROM agog_nats.outbox WHERE state = 'pending'}) // 1) == 0;
		},
		30),
	'the ten workflows completed and their outbox drained within 30 s');

# commit of a completion -> next stage dispatched, and -> its notice in JetStream
my $rows = $node->safe_psql('postgres', <<'EOSQL');
SELECT extract(epoch FROM nt.dispatched_at - h.committed_at) * 1000,
       extract(epoch FROM o.published_at - h.committed_at) * 1000
  FROM handoff h
  JOIN agog_nats.tasks t ON t.id = h.task_id
  JOIN agog_nats.tasks nt ON nt.workflow_id = t.workflow_id AND t.stage = ANY (nt.depends_on)
  LEFT JOIN agog_nats.outbox o ON o.kind = 'task' AND o.subject = 'agog.tasks.' || nt.agent || '.' || (nt.notice ->> 'feature')
 ORDER BY h.committed_at
EOSQL
my (@dispatch_ms, @published_ms);
for (split /\n/, $rows)
{
	my ($d, $p) = split /\|/;
	push @dispatch_ms, $d;
	push @published_ms, $p if $p ne '';
}
is(scalar(@dispatch_ms), 50, '50 handoffs measured');
my $starts = $node->safe_psql('postgres', <<'EOSQL');
SELECT extract(epoch FROM t.dispatched_at - h.committed_at) * 1000
  FROM handoff h JOIN agog_nats.tasks t ON t.workflow_id = h.workflow_id AND t.stage = 'research'
 WHERE h.task_id IS NULL
EOSQL
my @start_ms = split /\n/, $starts;
my $fmt = sub {
	my ($name, @v) = @_;
	return sprintf('%s: n=%d p50 %.2f ms, p99 %.2f ms, min %.2f, max %.2f', $name, scalar(@v),
		AgogWorkflowTest::percentile(50, @v), AgogWorkflowTest::percentile(99, @v),
		AgogWorkflowTest::percentile(0, @v), AgogWorkflowTest::percentile(100, @v));
};
diag('handoff latency, ' . $fmt->('completion COMMIT -> next stage dispatched (tasks.dispatched_at)', @dispatch_ms));
diag('handoff latency, ' . $fmt->('completion COMMIT -> next task notice published in JetStream (outbox.published_at)', @published_ms))
  if @published_ms;
diag('start latency, ' . $fmt->('agog_start_workflow COMMIT -> first stage dispatched', @start_ms));

# --- 1,000 concurrent workflows -----------------------------------------------------
my $pool = AgogWorkflowTest::AgentPool->new($node);
my $t0 = Time::HiRes::time();
is($node->safe_psql('postgres',
		"SELECT count(agog_start_workflow(format('scale-%s', i))) FROM generate_series(1, $N) i"),
	$N, "$N feature workflows started in one transaction");
my $t_started = Time::HiRes::time();
$pool->start;

my $last_note = 0;
my $done = 0;
my $ok = AgogWorkflowTest::wait_for(
	sub {
		$done = AgogWorkflowTest::try_query($node,
			q{SELECT count(*) FROM agog_nats.workflows WHERE feature LIKE 'scale-%' AND state = 'completed'}) // $done;
		if (Time::HiRes::time() - $last_note >= 10)
		{
			$last_note = Time::HiRes::time();
			note(sprintf('%5.1f s: %d of %d workflows completed', $last_note - $t0, $done, $N));
		}
		return $done == $N;
	},
	150, $pool);
my $wall = Time::HiRes::time() - $t0;
ok($ok, "all $N workflows completed within 150 s") or diag("only $done completed");
diag(sprintf('%d workflows (%d tasks) in %.1f s wall (start %.2f s): %.1f workflows/s, %.0f tasks/s',
		$N, 6 * $N, $wall, $t_started - $t0, $N / $wall, 6 * $N / $wall));
ok($pool->stop(30), 'the agents stop when told');
my @errors = $pool->errors;
is(scalar(@errors), 0, 'the agents saw no error') or diag(join("\n", @errors[0 .. ($#errors < 30 ? $#errors : 29)]));

# Where the time went, per stage: ready -> dispatched (the worker), dispatched
# -> claimed (the agents), claimed -> completed (in the agent's transaction),
# completed -> next ready (same transaction), task notice committed ->
# published (the outbox drain).
diag("where the time went (ms; avg / p50 / p95 / max):\n" . $node->safe_psql('postgres', <<'EOSQL'));
WITH t AS (
    SELECT t.*, extract(epoch FROM t.dispatched_at - t.ready_at) * 1000 AS to_dispatch,
           extract(epoch FROM t.claimed_at - t.dispatched_at) * 1000 AS to_claim,
           extract(epoch FROM t.completed_at - t.claimed_at) * 1000 AS to_complete
      FROM agog_nats.tasks t JOIN agog_nats.workflows w ON w.id = t.workflow_id
     WHERE w.feature LIKE 'scale-%'),
o AS (
    SELECT extract(epoch FROM o.published_at - o.created_at) * 1000 AS to_publish, o.kind
      FROM agog_nats.outbox o WHERE o.feature LIKE 'scale-%'),
f AS (
    SELECT x.name, x.v FROM t, LATERAL (VALUES ('ready -> dispatched (worker)', t.to_dispatch),
                                               ('dispatched -> claimed (agents)', t.to_claim),
                                               ('claimed -> completed (agent txn)', t.to_complete)) x(name, v)
    UNION ALL
    SELECT 'outbox ' || o.kind || ' committed -> published', o.to_publish FROM o)
SELECT rpad(name, 40) || to_char(avg(v), '99990.0') || ' /' || to_char(percentile_cont(0.5) WITHIN GROUP (ORDER BY v), '99990.0')
       || ' /' || to_char(percentile_cont(0.95) WITHIN GROUP (ORDER BY v), '99990.0') || ' /' || to_char(max(v), '99990.0')
  FROM f GROUP BY name ORDER BY name
EOSQL
diag("per stage, first dispatch -> last completion (s):\n" . $node->safe_psql('postgres', <<'EOSQL'));
SELECT rpad(t.stage, 12) || to_char(extract(epoch FROM max(t.completed_at) - min(t.dispatched_at)), '990.00')
       || '  (wall clock from the first start: ' || to_char(extract(epoch FROM max(t.completed_at) - (SELECT min(created_at) FROM agog_nats.workflows WHERE feature LIKE 'scale-%')), '990.00') || ')'
  FROM agog_nats.tasks t JOIN agog_nats.workflows w ON w.id = t.workflow_id
 WHERE w.feature LIKE 'scale-%' GROUP BY t.stage, t.position ORDER BY t.position
EOSQL

diag("per stage, ready -> dispatched (s; avg / max):\n" . $node->safe_psql('postgres', <<'EOSQL'));
SELECT rpad(t.stage, 12) || to_char(avg(extract(epoch FROM t.dispatched_at - t.ready_at)), '990.00') || ' /'
       || to_char(max(extract(epoch FROM t.dispatched_at - t.ready_at)), '990.00')
  FROM agog_nats.tasks t JOIN agog_nats.workflows w ON w.id = t.workflow_id
 WHERE w.feature LIKE 'scale-%' GROUP BY t.stage, t.position ORDER BY t.position
EOSQL
# The worker's steps, seen from their rows: every task notice of one
# orchestrate step has that transaction's now() as created_at, every row
# recorded by one drain transaction the same published_at.
diag("worker steps:\n" . $node->safe_psql('postgres', <<'EOSQL'));
WITH s AS (
    SELECT created_at AS at, count(*) AS n FROM agog_nats.outbox
     WHERE kind = 'task' AND feature LIKE 'scale-%' GROUP BY created_at),
g AS (SELECT n, extract(epoch FROM at - lag(at) OVER (ORDER BY at)) * 1000 AS gap FROM s),
p AS (
    SELECT published_at AS at, count(*) AS n FROM agog_nats.outbox
     WHERE feature LIKE 'scale-%' GROUP BY published_at),
q AS (SELECT n, extract(epoch FROM at - lag(at) OVER (ORDER BY at)) * 1000 AS gap FROM p)
SELECT format('orchestrate steps that dispatched: %s, tasks per step avg %s max %s, ms between steps avg %s p50 %s max %s',
              count(*), round(avg(n), 1), max(n), round(avg(gap)::numeric, 1),
              round(percentile_cont(0.5) WITHIN GROUP (ORDER BY gap)::numeric, 1), round(max(gap)::numeric, 1))
  FROM g
UNION ALL
SELECT format('outbox drain transactions: %s, rows per transaction avg %s max %s, ms between them avg %s p50 %s max %s',
              count(*), round(avg(n), 1), max(n), round(avg(gap)::numeric, 1),
              round(percentile_cont(0.5) WITHIN GROUP (ORDER BY gap)::numeric, 1), round(max(gap)::numeric, 1))
  FROM q
EOSQL

# --- consistency ---------------------------------------------------------------------
ok(AgogWorkflowTest::wait_for(
		sub {
			(AgogWorkflowTest::try_query($node,
				q{SELECT count(*) FROM agog_nats.outbox WHERE state <> 'published'}) // -1) == 0;
		},
		30),
	'the outbox is drained (no pending row) within 30 s');
is($node->safe_psql('postgres', q{SELECT count(*) FROM agog_nats.outbox WHERE feature LIKE 'scale-%'}),
	12 * $N, 'the outbox holds one report and one task notice per task of the 1,000 workflows');
ok(AgogWorkflowTest::wait_for(
		sub {
			(AgogWorkflowTest::try_query($node,
				q{SELECT count(*) FROM agog_nats.tasks WHERE state = 'completed' AND report_message_id IS NULL}) // -1) == 0;
		},
		30),
	'the worker resolved the message id of every completed task\'s report within 30 s of the drain');
AgogWorkflowTest::check_event_log($node, 'scale', "w.feature LIKE 'scale-%'",
	no_retries => 1, agent_log => 1, outbox_reports => 1);
AgogWorkflowTest::check_event_log($node, 'handoff', "w.feature LIKE 'handoff-%'",
	no_retries => 1, outbox_reports => 1);
is($node->safe_psql('postgres', 'SELECT count(*) FROM agog_nats.bad_notices'), 0, 'no bad notice');
my $t_js = Time::HiRes::time();
AgogWorkflowTest::check_exactly_once($nats, $node, 'JetStream');
note(sprintf('exactly-once check: %.1f s', Time::HiRes::time() - $t_js));

$node->stop;
note(sprintf('210_workflow_scale: %.1f s', Time::HiRes::time() - $t_start));
done_testing();
