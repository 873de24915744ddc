-- The workflow engine: pipelines as data, tasks claimed and completed from
-- SQL, the worker dispatching, timing out and retrying.

-- With no task scheduled the worker's step names no deadline (NULL, not 0),
-- so the worker sleeps until its poll instead of stepping again at once.
SELECT agog_nats.orchestrate() IS NULL AS nothing_scheduled;

-- A SQL agent for the tests: wait (bounded) for the worker to dispatch a
-- task to the agent, claim it, publish its report and complete it, all in
-- the caller's transaction.
CREATE FUNCTION play(who text, status text DEFAULT 'complete', lease interval DEFAULT NULL)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    c record;
    tt text;
BEGIN
    FOR i IN 1..200 LOOP
        SELECT * INTO c FROM agog_claim_task(who, 'sql-test', lease);
        EXIT WHEN c.task_id IS NOT NULL;
        PERFORM pg_sleep(0.05);
    END LOOP;
    IF c.task_id IS NULL THEN
        RETURN 'nothing dispatched to ' || who;
    END IF;
    tt := c.notice ->> 'taskType';
    PERFORM agog_publish_report(who, tt, c.feature,
        format('# %s on %s (attempt %s)%s', tt, c.feature, c.attempt, repeat(' words', 200)));
    RETURN format('%s/%s attempt %s: ', who, c.stage, c.attempt) ||
        agog_complete_task(c.task_id, jsonb_build_object(
            'status', status, 'agent', who, 'task', c.feature,
            'nats_channel', format('agog.deliverables.%s.%s.%s', who, tt, c.feature),
            'summary', 'did ' || tt, 'complexity', 'Medium',
            'blockers', CASE WHEN status = 'complete' THEN 'None' ELSE 'tests are red' END,
            'ready_for_next_stage', status = 'complete',
            'completion_time', '2026-01-01T00:00:00.000Z', 'files_modified', 2,
            'metadata', '{"by": "play"}'::jsonb));
END
$$;

CREATE FUNCTION wait_for(cond text, seconds int DEFAULT 15) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    ok boolean;
BEGIN
    FOR i IN 1..seconds * 20 LOOP
        EXECUTE 'SELECT ' || cond INTO ok;
        IF ok THEN RETURN true; END IF;
        PERFORM pg_sleep(0.05);
    END LOOP;
    RETURN false;
END
$$;

-- The seed's feature pipeline.
SELECT stage, agent, task_type, depends_on, timeout, max_attempts, retry_backoff
  FROM agog_nats.stages WHERE pipeline = 'feature' ORDER BY position;

-- A user pipeline with stages in parallel.
SELECT agog_define_pipeline('review', '[
    {"stage": "research", "agent": "cynthia"},
    {"stage": "critique", "agent": "sylvia", "depends_on": ["research"]},
    {"stage": "stats",    "agent": "priya",  "depends_on": ["research"]},
    {"stage": "qa",       "agent": "billy",  "depends_on": ["critique", "stats"],
     "timeout": "10 minutes", "max_attempts": 2, "retry_backoff": "0 seconds"}]',
    'research, then critique and statistics in parallel, then qa');
SELECT stage, agent, task_type, depends_on, max_attempts FROM agog_nats.stages
 WHERE pipeline = 'review' ORDER BY position;

-- Refused when defined: a cycle, an unknown agent or stage, a bad token.
SELECT try($$SELECT agog_define_pipeline('loop', '[{"stage": "a", "agent": "cynthia", "depends_on": ["b"]},
                                                   {"stage": "b", "agent": "sylvia", "depends_on": ["a"]}]')$$);
SELECT try($$SELECT agog_define_pipeline('self', '[{"stage": "a", "agent": "cynthia", "depends_on": ["a"]}]')$$);
SELECT try($$SELECT agog_define_pipeline('ghost', '[{"stage": "a", "agent": "casper"}]')$$);
SELECT try($$SELECT agog_define_pipeline('dangling', '[{"stage": "a", "agent": "cynthia", "depends_on": ["zz"]}]')$$);
SELECT try($$SELECT agog_define_pipeline('bad', '[{"stage": "a.b", "agent": "cynthia"}]')$$);
SELECT try($$SELECT agog_define_pipeline('empty', '[]')$$);
-- A timeout or backoff past its bounds: a deadline of now() + 300000 years
-- once failed every orchestration step, and the worker with it.
SELECT try($$SELECT agog_define_pipeline('forever', '[{"stage": "a", "agent": "cynthia", "timeout": "300000 years"}]')$$);
SELECT try($$SELECT agog_define_pipeline('never', '[{"stage": "a", "agent": "cynthia", "timeout": "0 seconds"}]')$$);
SELECT try($$SELECT agog_define_pipeline('patient', '[{"stage": "a", "agent": "cynthia", "retry_backoff": "2 days"}]')$$);
SELECT count(*) AS none_defined FROM agog_nats.pipelines
 WHERE pipeline IN ('loop', 'self', 'ghost', 'dangling', 'bad', 'empty', 'forever', 'never', 'patient');
-- A lease out of agog_nats.task_lease's range (a negative one started a
-- claim already lost).
SELECT try($$SELECT * FROM agog_claim_task('jen', 'tests', '-1 second')$$) AS negative_lease;
SELECT try($$SELECT agog_heartbeat_task(1, '25 hours')$$) AS long_lease;
-- A direct edit that makes a cycle fails at commit.
BEGIN;
UPDATE agog_nats.stages SET depends_on = '{qa}' WHERE pipeline = 'review' AND stage = 'research';
COMMIT;
SELECT depends_on FROM agog_nats.stages WHERE pipeline = 'review' AND stage = 'research';
-- So does a delete of a stage others depend on: a workflow of the pipeline
-- would wait for the missing stage for good.
BEGIN;
DELETE FROM agog_nats.stages WHERE pipeline = 'review' AND stage = 'research';
COMMIT;
SELECT count(*) AS review_stages FROM agog_nats.stages WHERE pipeline = 'review';

-- Starting: bad input is refused and nothing is created.
SELECT try($$SELECT agog_start_workflow('bad.feature')$$);
SELECT try($$SELECT agog_start_workflow('f1', 'no-such-pipeline')$$);
SELECT try($$SELECT agog_start_workflow('f1', 'feature', '[1]')$$);
SELECT count(*) AS no_workflows FROM agog_nats.workflows;

-- The seed's six-stage workflow, end to end, from SQL alone.
SELECT agog_start_workflow('customer-search', 'feature', '{"requested_by": "tests"}') AS wf \gset
SELECT stage, CASE WHEN state IN ('ready', 'dispatched') THEN 'ready' ELSE state END AS state
  FROM agog_nats.tasks WHERE workflow_id = :wf ORDER BY position;
SELECT play('cynthia');
-- The notice for the next stage is tiny, and names the research report.
SELECT wait_for($$EXISTS (SELECT 1 FROM agog_nats.tasks WHERE stage = 'critique' AND state = 'dispatched'
                            AND notice -> 'inputs' -> 0 ->> 'message_id' IS NOT NULL)$$);
SELECT notice ->> 'stage' AS stage, notice ->> 'agent' AS agent, notice ->> 'feature' AS feature,
       notice ->> 'attempt' AS attempt, jsonb_array_length(notice -> 'inputs') AS inputs,
       notice -> 'inputs' -> 0 ->> 'subject' AS input_subject,
       notice -> 'inputs' -> 0 ->> 'message_id' ~ '^agog_features_research\.[0-9]+$' AS input_id,
       notice ->> 'report_subject' AS report_subject,
       notice_bytes < 1024 AS tiny
  FROM agog_nats.tasks WHERE workflow_id = :wf AND stage = 'critique';
-- It went through the outbox to agog.tasks.<agent>.<feature>.
SELECT wait_for($$NOT EXISTS (SELECT 1 FROM agog_nats.outbox WHERE kind = 'task' AND state = 'pending')$$);
SELECT kind, subject, state, message_id ~ '^agog_tasks\.[0-9]+$' AS in_agog_tasks
  FROM agog_nats.reports WHERE kind = 'task' AND feature = 'customer-search' ORDER BY id;
SELECT play('sylvia');
SELECT play('roy');
SELECT play('jen');
SELECT play('billy');
SELECT play('priya');
SELECT wait_for($$(SELECT state = 'completed' FROM agog_nats.workflows WHERE id = $$ || :wf || $$)$$);
SELECT pipeline, feature, state, stage_reached, done, total, current_agents, elapsed > '0' AS elapsed_ok
  FROM agog_nats.workflow_progress WHERE workflow_id = :wf;
-- The worker resolves each report's message id once it has published it.
SELECT wait_for($$NOT EXISTS (SELECT 1 FROM agog_nats.tasks WHERE workflow_id = $$ || :wf || $$
                                 AND report_message_id IS NULL)$$);
SELECT stage, agent, outcome, attempts, wait >= '0' AS wait_ok, run >= '0' AS run_ok,
       report_message_id ~ '^agog_features_' AS has_report
  FROM agog_nats.task_timeline WHERE workflow_id = :wf ORDER BY task_id;
SELECT kind, count(*) FROM agog_nats.events WHERE workflow_id = :wf GROUP BY kind ORDER BY kind;
SELECT tokens_without_nats > 5 * tokens_with_nats AS saves, saved_pct > 80 AS most
  FROM agog_nats.token_savings WHERE workflow_id = :wf;
SELECT agent, tasks, completed, failures FROM agog_nats.agent_performance ORDER BY agent;

-- Bad input on completion: a clear error, and the workflow unchanged.
SELECT agog_start_workflow('bad-notices', 'review') AS wf2 \gset
SELECT wait_for($$EXISTS (SELECT 1 FROM agog_nats.tasks WHERE workflow_id = $$ || :wf2 || $$ AND state = 'dispatched')$$);
SELECT task_id AS t2 FROM agog_claim_task('cynthia') \gset
CREATE TEMP TABLE before_bad AS SELECT id, state, attempt FROM agog_nats.tasks WHERE workflow_id = :wf2;
CREATE TEMP TABLE good AS SELECT jsonb_build_object(
    'status', 'complete', 'agent', 'cynthia', 'task', 'bad-notices',
    'nats_channel', 'agog.deliverables.cynthia.research.bad-notices', 'summary', 's',
    'complexity', 'Low', 'blockers', 'None', 'ready_for_next_stage', true,
    'completion_time', '2026-01-01T00:00:00.000Z', 'files_modified', 0, 'metadata', '{}'::jsonb) AS n;
SELECT try(format('SELECT agog_complete_task(%s, %L)', 999999, (SELECT n FROM good)));
SELECT try(format('SELECT agog_complete_task(%s, %L)', :t2, (SELECT n - 'summary' FROM good)));
SELECT try(format('SELECT agog_complete_task(%s, %L)', :t2, (SELECT n || '{"files_modified": "two"}' FROM good)));
SELECT try(format('SELECT agog_complete_task(%s, %L)', :t2, (SELECT n || '{"ready_for_next_stage": "yes"}' FROM good)));
SELECT try(format('SELECT agog_complete_task(%s, %L)', :t2, (SELECT n || '{"status": "done"}' FROM good)));
SELECT try(format('SELECT agog_complete_task(%s, %L)', :t2, (SELECT n || '{"completion_time": "yesterday-ish"}' FROM good)));
SELECT try(format('SELECT agog_complete_task(%s, %L)', :t2, (SELECT n || '{"agent": "roy"}' FROM good)));
SELECT try(format('SELECT agog_complete_task(%s, %L)', :t2, (SELECT n || '{"task": "other"}' FROM good)));
SELECT try(format('SELECT agog_complete_task(%s, %L)', :t2, (SELECT n FROM good)));
SELECT try(format('SELECT agog_complete_task(%s, %L)', :t2, (SELECT n || '{"nats_channel": "agog.tasks.x"}' FROM good)));
SELECT try(format('SELECT agog_complete_task(%s, %L)',
                  (SELECT id FROM agog_nats.tasks WHERE workflow_id = :wf2 AND stage = 'qa'), (SELECT n FROM good)));
SELECT count(*) AS changed FROM agog_nats.tasks t JOIN before_bad b USING (id)
 WHERE (t.state, t.attempt) IS DISTINCT FROM (b.state, b.attempt);
-- With its report the same notice is accepted; sent again, it is refused.
SELECT agog_publish_report('cynthia', 'research', 'bad-notices', '# the report') IS NOT NULL AS published;
SELECT agog_complete_task(:t2, (SELECT n FROM good));
SELECT try(format('SELECT agog_complete_task(%s, %L)', :t2, (SELECT n FROM good)));

-- Parallel stages, then a cancel: every open task is cancelled, and a
-- completion that comes after it is refused.
SELECT wait_for($$(SELECT count(*) = 2 FROM agog_nats.tasks WHERE workflow_id = $$ || :wf2 || $$ AND state = 'dispatched')$$);
SELECT stage, state FROM agog_nats.tasks WHERE workflow_id = :wf2 ORDER BY position;
SELECT task_id AS t3 FROM agog_claim_task('sylvia') \gset
SELECT agog_cancel_workflow(:wf2, 'requirements changed');
SELECT state, reason FROM agog_nats.workflows WHERE id = :wf2;
SELECT stage, state FROM agog_nats.tasks WHERE workflow_id = :wf2 ORDER BY position;
SELECT try(format('SELECT agog_complete_task(%s, %L)', :t3, (SELECT n || '{"agent": "sylvia", "nats_channel": "agog.deliverables.cynthia.research.bad-notices"}' FROM good)));
SELECT try(format('SELECT agog_cancel_workflow(%s)', :wf2));
SELECT try('SELECT agog_cancel_workflow(424242)');

-- A stage that fails is retried with backoff up to its attempts, then the
-- workflow fails and its other tasks are cancelled; it can be retried.
SELECT agog_define_pipeline('flaky', '[
    {"stage": "build", "agent": "roy", "max_attempts": 2, "retry_backoff": "0 seconds"},
    {"stage": "test", "agent": "billy", "depends_on": ["build"]}]');
SELECT agog_start_workflow('flaky-feature', 'flaky') AS wf3 \gset
SELECT play('roy', 'failed');
SELECT play('roy', 'failed');
SELECT wait_for($$(SELECT state = 'failed' FROM agog_nats.workflows WHERE id = $$ || :wf3 || $$)$$);
SELECT state, reason FROM agog_nats.workflows WHERE id = :wf3;
SELECT stage, state, attempt, last_error FROM agog_nats.tasks WHERE workflow_id = :wf3 ORDER BY position;
SELECT outcome, count(*) FROM agog_nats.notices n JOIN agog_nats.tasks t ON t.id = n.task_id
 WHERE t.workflow_id = :wf3 GROUP BY outcome ORDER BY outcome;
SELECT try(format('SELECT agog_retry_workflow(%s)', :wf)); -- completed: not retried
SELECT agog_retry_workflow(:wf3);
SELECT play('roy');
SELECT play('billy');
SELECT wait_for($$(SELECT state = 'completed' FROM agog_nats.workflows WHERE id = $$ || :wf3 || $$)$$);
SELECT kind, count(*) FROM agog_nats.events WHERE workflow_id = :wf3 GROUP BY kind ORDER BY kind;

-- Each retry of a workflow gives its failed task its budget again, once,
-- and the backoff doubles from the retry on, not from the first attempt.
SELECT agog_define_pipeline('flaky2', '[{"stage": "build", "agent": "roy", "max_attempts": 2, "retry_backoff": "10 milliseconds"}]');
SELECT agog_start_workflow('flaky2-feature', 'flaky2') AS wf3b \gset
SELECT play('roy', 'failed');
SELECT play('roy', 'failed');
SELECT agog_retry_workflow(:wf3b);
SELECT play('roy', 'failed');
SELECT play('roy', 'failed');
SELECT agog_retry_workflow(:wf3b);
SELECT play('roy', 'failed');
SELECT play('roy', 'failed');
SELECT state, reason FROM agog_nats.workflows WHERE id = :wf3b;
SELECT detail ->> 'attempt' AS attempt, detail ->> 'backoff_ms' AS backoff_ms
  FROM agog_nats.events WHERE workflow_id = :wf3b AND kind = 'task_retry' ORDER BY id;

-- A task nobody claims before its deadline is retried, then fails the
-- workflow; a lease that runs out is lost.
SELECT agog_define_pipeline('slow', '[{"stage": "s", "agent": "jen", "timeout": "1 second", "max_attempts": 2, "retry_backoff": "0 seconds"}]');
SELECT agog_start_workflow('slow-feature', 'slow') AS wf4 \gset
SELECT wait_for($$(SELECT state = 'failed' FROM agog_nats.workflows WHERE id = $$ || :wf4 || $$)$$);
SELECT state, reason FROM agog_nats.workflows WHERE id = :wf4;
SELECT kind, detail ->> 'reason' AS reason FROM agog_nats.events
 WHERE workflow_id = :wf4 AND kind IN ('task_retry', 'task_failed', 'workflow_failed') ORDER BY id;

SELECT agog_define_pipeline('leased', '[{"stage": "s", "agent": "jen", "max_attempts": 2, "retry_backoff": "0 seconds"}]');
SELECT agog_start_workflow('leased-feature', 'leased') AS wf5 \gset
SELECT wait_for($$EXISTS (SELECT 1 FROM agog_nats.tasks WHERE workflow_id = $$ || :wf5 || $$ AND state = 'dispatched')$$);
SELECT task_id AS t5 FROM agog_claim_task('jen', 'tests', '1 second') \gset
SELECT agog_heartbeat_task(:t5, '1 second') > now() AS extended;
SELECT pg_sleep(1.2);
-- Refused: the lease was lost (or the worker has already retried the task).
SELECT try(format('SELECT agog_heartbeat_task(%s)', :t5)) ~ '^55000: (the lease on task [0-9]+ was lost|task [0-9]+ is not running)$' AS refused;
SELECT wait_for($$(SELECT attempt = 2 AND state = 'dispatched' FROM agog_nats.tasks WHERE id = $$ || :t5 || $$)$$);
SELECT state, attempt, last_error FROM agog_nats.tasks WHERE id = :t5;
SELECT play('jen');
SELECT wait_for($$(SELECT state = 'completed' FROM agog_nats.workflows WHERE id = $$ || :wf5 || $$)$$);

-- A dispatched task already past its deadline (the worker has not timed it
-- out yet: it was down, or busy) is not claimed: its lease would have run
-- out before the runner began.
SELECT agog_start_workflow('overdue-feature', 'leased') AS wf5b \gset
SELECT wait_for($$EXISTS (SELECT 1 FROM agog_nats.tasks WHERE workflow_id = $$ || :wf5b || $$ AND state = 'dispatched')$$);
BEGIN;
UPDATE agog_nats.tasks SET deadline = clock_timestamp() - interval '1 second' WHERE workflow_id = :wf5b;
SELECT count(*) AS claimed FROM agog_claim_task('jen', 'late');
ROLLBACK;
SELECT stage, attempt, lease_until > now() AS leased FROM agog_claim_task('jen', 'on-time');
SELECT agog_cancel_workflow(:wf5b);

-- Notices from agents that speak only NATS: applied once; a malformed one
-- is kept with its error.
SELECT agog_start_workflow('nats-agent', 'slow') AS wf6 \gset
SELECT wait_for($$EXISTS (SELECT 1 FROM agog_nats.tasks WHERE workflow_id = $$ || :wf6 || $$ AND state = 'dispatched')$$);
UPDATE agog_nats.tasks SET deadline = now() + interval '1 hour' WHERE workflow_id = :wf6;
SELECT agog_publish_report('jen', 'frontend', 'nats-agent', '# from a NATS agent') IS NOT NULL AS published;
CREATE TEMP TABLE nats_notice AS SELECT jsonb_build_object(
    'status', 'complete', 'agent', 'jen', 'task', 'nats-agent',
    'nats_channel', 'agog.deliverables.jen.frontend.nats-agent', 'summary', 's',
    'complexity', 'Low', 'blockers', 'None', 'ready_for_next_stage', true,
    'completion_time', '2026-01-01T00:00:00.000Z', 'files_modified', 1, 'metadata', '{}'::jsonb)::text AS body;
SELECT agog_nats.apply_nats_notice('agog.notices.jen.nats-agent', (SELECT body FROM nats_notice));
SELECT agog_nats.apply_nats_notice('agog.notices.jen.nats-agent', (SELECT body FROM nats_notice));
SELECT agog_nats.apply_nats_notice('agog.notices.jen.nats-agent', 'not json at all');
SELECT agog_nats.apply_nats_notice('agog.notices.jen.nats-agent', '{"status": "complete"}');
SELECT agog_nats.apply_nats_notice('agog.notices.nobody.nowhere', (SELECT body FROM nats_notice));
SELECT subject, left(body, 20) AS body, error FROM agog_nats.bad_notices ORDER BY id;
SELECT state FROM agog_nats.workflows WHERE id = :wf6;
SELECT source, outcome FROM agog_nats.notices n JOIN agog_nats.tasks t ON t.id = n.task_id
 WHERE t.workflow_id = :wf6;

-- Redefining the built-in pipeline marks it customized (pg_dump keeps it and
-- its stages); a restore's insert of it replaces the built-in stages.
BEGIN;
SELECT agog_define_pipeline('feature', '[{"stage": "research", "agent": "cynthia"}]', 'short');
SELECT pipeline, description, builtin, customized FROM agog_nats.pipelines WHERE pipeline = 'feature';
SELECT stage, builtin FROM agog_nats.stages WHERE pipeline = 'feature';
ROLLBACK;
BEGIN;
INSERT INTO agog_nats.pipelines (pipeline, description, builtin, customized)
VALUES ('feature', 'restored', true, true);
SELECT pipeline, description, builtin, customized FROM agog_nats.pipelines WHERE pipeline = 'feature';
SELECT count(*) AS builtin_stages_left FROM agog_nats.stages WHERE pipeline = 'feature';
ROLLBACK;
SELECT count(*) AS stages FROM agog_nats.stages WHERE pipeline = 'feature' AND builtin;

-- The longest allowed: a task's backoff doubles at every attempt, up to a
-- day, where it once left the range of an interval (attempt 60 of a 1-day
-- backoff) and failed the worker's step.  All rolled back.
BEGIN;
SELECT agog_define_pipeline('long', '[{"stage": "a", "agent": "cynthia", "timeout": "30 days", "max_attempts": 100, "retry_backoff": "1 day"}]');
SELECT agog_start_workflow('long-feature', 'long') AS wfl \gset
UPDATE agog_nats.tasks SET attempt = 60 WHERE workflow_id = :wfl;
SELECT agog_nats.retry_or_fail(t, 'test') AS outcome FROM agog_nats.tasks t WHERE t.workflow_id = :wfl;
SELECT state, next_attempt_at - now() AS backoff FROM agog_nats.tasks WHERE workflow_id = :wfl;
ROLLBACK;

-- A runner whose lease was lost is refused once another claim holds the
-- task: its heartbeat and its completion name their attempt.  Without it
-- both were taken for the new attempt's (its stale result completed it).
SELECT agog_define_pipeline('relay', '[{"stage": "s", "agent": "jen", "max_attempts": 3, "retry_backoff": "0 seconds"}]');
SELECT agog_start_workflow('relay-feature', 'relay') AS wf7 \gset
SELECT wait_for($$EXISTS (SELECT 1 FROM agog_nats.tasks WHERE workflow_id = $$ || :wf7 || $$ AND state = 'dispatched')$$);
SELECT task_id AS t7, attempt FROM agog_claim_task('jen', 'runner-a', '1 second') \gset
SELECT pg_sleep(1.2);
SELECT wait_for($$(SELECT attempt = 2 AND state = 'dispatched' FROM agog_nats.tasks WHERE id = $$ || :t7 || $$)$$);
SELECT task_id = :t7 AS same_task, attempt FROM agog_claim_task('jen', 'runner-b');
SELECT try(format('SELECT agog_heartbeat_task(%s, NULL, 1)', :t7)) AS stale_heartbeat;
SELECT agog_heartbeat_task(:t7, NULL, 2) > now() AS heartbeat_of_attempt_2;
SELECT agog_heartbeat_task(:t7) > now() AS heartbeat_without_attempt;
SELECT agog_publish_report('jen', 'frontend', 'relay-feature', '# from runner-a') IS NOT NULL AS published;
SELECT try(format('SELECT agog_complete_task(%s, %L)', :t7, jsonb_build_object(
    'status', 'complete', 'agent', 'jen', 'task', 'relay-feature',
    'nats_channel', 'agog.deliverables.jen.frontend.relay-feature', 'summary', 's',
    'complexity', 'Low', 'blockers', 'None', 'ready_for_next_stage', true,
    'completion_time', '2026-01-01T00:00:00.000Z', 'files_modified', 1,
    'metadata', jsonb_build_object('attempt', 1)))) AS stale_completion;
SELECT state, attempt, claimed_by FROM agog_nats.tasks WHERE id = :t7;
SELECT agog_cancel_workflow(:wf7);

-- NATS notices: one naming a task that does not exist is bad (it was taken
-- for a duplicate and dropped without a word); one without a task id sent
-- again after its stage completed is a duplicate, not the completion of the
-- agent's next stage (which had not run).
SELECT agog_nats.apply_nats_notice('agog.notices.jen.nats-agent',
    (SELECT (body::jsonb || '{"metadata": {"task_id": 999999, "attempt": 1}}')::text FROM nats_notice));
SELECT error FROM agog_nats.bad_notices ORDER BY id DESC LIMIT 1;
SELECT agog_define_pipeline('twice', '[{"stage": "s1", "agent": "jen", "timeout": "10 minutes"},
    {"stage": "s2", "agent": "jen", "depends_on": ["s1"], "timeout": "10 minutes"}]');
SELECT agog_start_workflow('twice-feature', 'twice') AS wf8 \gset
SELECT wait_for($$EXISTS (SELECT 1 FROM agog_nats.tasks WHERE workflow_id = $$ || :wf8 || $$ AND stage = 's1' AND state = 'dispatched')$$);
SELECT agog_publish_report('jen', 'frontend', 'twice-feature', '# s1 from a NATS agent') IS NOT NULL AS published;
CREATE TEMP TABLE twice_notice AS SELECT (body::jsonb || jsonb_build_object(
    'task', 'twice-feature', 'nats_channel', 'agog.deliverables.jen.frontend.twice-feature',
    'summary', 's1 done'))::text AS body FROM nats_notice;
SELECT agog_nats.apply_nats_notice('agog.notices.jen.twice-feature', (SELECT body FROM twice_notice)) AS first;
SELECT wait_for($$EXISTS (SELECT 1 FROM agog_nats.tasks WHERE workflow_id = $$ || :wf8 || $$ AND stage = 's2' AND state = 'dispatched')$$);
SELECT agog_nats.apply_nats_notice('agog.notices.jen.twice-feature', (SELECT body FROM twice_notice)) AS again;
SELECT stage, state FROM agog_nats.tasks WHERE workflow_id = :wf8 ORDER BY stage;
SELECT agog_cancel_workflow(:wf8);

-- A report sent straight to JetStream (a NATS agent, or
-- agog_publish_report_now) after an earlier attempt's report went through
-- the outbox: the task records the new one, not the outbox's older row.
SELECT agog_define_pipeline('mixed', '[{"stage": "s", "agent": "billy", "max_attempts": 2, "retry_backoff": "0 seconds"}]');
SELECT agog_start_workflow('mixed-feature', 'mixed') AS wf9 \gset
SELECT play('billy', 'failed');
SELECT wait_for($$(SELECT state = 'published' FROM agog_nats.outbox WHERE subject = 'agog.deliverables.billy.qa.mixed-feature')$$);
SELECT wait_for($$EXISTS (SELECT 1 FROM agog_nats.tasks WHERE workflow_id = $$ || :wf9 || $$ AND attempt = 2 AND state = 'dispatched')$$);
SELECT task_id AS t9 FROM agog_claim_task('billy', 'nats-only') \gset
SELECT agog_publish_report_now('billy', 'qa', 'mixed-feature', '# attempt 2, straight to JetStream') AS r9 \gset
SELECT agog_complete_task(:t9, jsonb_build_object(
    'status', 'complete', 'agent', 'billy', 'task', 'mixed-feature',
    'nats_channel', 'agog.deliverables.billy.qa.mixed-feature', 'summary', 's',
    'complexity', 'Low', 'blockers', 'None', 'ready_for_next_stage', true,
    'completion_time', '2026-01-01T00:00:00.000Z', 'files_modified', 1, 'metadata', '{}'::jsonb));
SELECT report_message_id = :'r9' AS the_new_report,
       report_message_id = (SELECT stream || '.' || seq FROM agog_nats.outbox
                             WHERE subject = 'agog.deliverables.billy.qa.mixed-feature') AS the_outbox_row
  FROM agog_nats.tasks WHERE id = :t9;
