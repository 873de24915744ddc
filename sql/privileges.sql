-- Least privilege: nothing for PUBLIC, three roles.
SELECT p.proname, has_function_privilege('public', p.oid, 'EXECUTE') AS public_exec,
       has_function_privilege('agog_nats_reader', p.oid, 'EXECUTE') AS reader,
       has_function_privilege('agog_nats_writer', p.oid, 'EXECUTE') AS writer,
       has_function_privilege('agog_nats_admin', p.oid, 'EXECUTE') AS admin
  FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.deptype = 'e'
  JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'agog_nats'
 ORDER BY p.proname;
SELECT r, has_table_privilege(r, 'agog_nats.agents', 'SELECT') AS sel,
       has_table_privilege(r, 'agog_nats.agents', 'INSERT') AS ins,
       has_schema_privilege(r, 'agog_nats', 'USAGE') AS usage
  FROM unnest(ARRAY['public', 'agog_nats_reader', 'agog_nats_writer', 'agog_nats_admin']) r;

CREATE ROLE agog_test_nobody;
CREATE ROLE agog_test_reader IN ROLE agog_nats_reader;
CREATE ROLE agog_test_writer IN ROLE agog_nats_writer;
CREATE ROLE agog_test_admin IN ROLE agog_nats_admin;
GRANT EXECUTE ON FUNCTION try(text) TO PUBLIC;

SET ROLE agog_test_nobody;
SELECT try('SELECT * FROM agog_fetch_report(''cynthia'', ''research'', ''customer-search'')');
SELECT try('SELECT agog_publish_report_now(''cynthia'', ''research'', ''x'', ''c'')');
SELECT try('SELECT * FROM agog_stream_status()');
SELECT try('SELECT * FROM agog_nats.agents');
RESET ROLE;

SET ROLE agog_test_reader;
SELECT count(*) FROM agog_fetch_report('cynthia', 'research', 'customer-search');
SELECT count(*) FROM agog_stream_status();
SELECT connected FROM agog_worker_status();
SELECT try('SELECT agog_publish_report_now(''cynthia'', ''research'', ''x'', ''c'')');
SELECT try('INSERT INTO agog_nats.agents (agent, task_type) VALUES (''r'', ''r'')');
-- The url may hold credentials: superusers only.
SELECT count(*) >= 0 AS sees_reports FROM agog_nats.reports;
SELECT connected FROM agog_nats.worker_health;
SELECT try('SELECT agog_publish_report(''cynthia'', ''research'', ''x'', ''c'')');
SELECT try('SHOW agog_nats.url');
SELECT try('SET agog_nats.url = ''nats://evil:4222''');
RESET ROLE;

SET ROLE agog_test_writer;
SELECT agog_publish_report_now('cynthia', 'research', 'by-writer', 'c') IS NOT NULL AS published;
SELECT agog_publish_report('cynthia', 'research', 'by-writer', 'c') IS NOT NULL AS queued;
-- The outbox is written only through agog_publish_report's checks.
SELECT try($$INSERT INTO agog_nats.outbox (msg_id, agent, task_type, feature, subject, target_stream, body) VALUES ('x', 'cynthia', 'research', 'f', 'agog.deliverables.cynthia.research.f', 'agog_features_research', 'raw')$$);
SELECT try('UPDATE agog_nats.outbox SET state = ''dead''');
SELECT try('SELECT agog_retry_dead()');
SELECT try('DELETE FROM agog_nats.agents');
-- Writers claim and complete tasks; they do not start workflows.
SELECT count(*) AS claimed FROM agog_claim_task('cynthia');
SELECT try('SELECT agog_complete_task(-1, ''{}'')');
SELECT try('SELECT agog_start_workflow(''by-writer'')');
SELECT try('UPDATE agog_nats.tasks SET state = ''completed''');
RESET ROLE;

SET ROLE agog_test_admin;
SELECT try('UPDATE agog_nats.agents SET description = description WHERE agent = ''nobody''');
SELECT agog_retry_dead(ARRAY[-1]::bigint[]) AS requeued;
RESET ROLE;
-- An admin requeues a real dead row: the update runs the outbox's CHECKs as
-- the admin (rolled back, so the worker never sees the row).
BEGIN;
INSERT INTO agog_nats.outbox (id, msg_id, agent, task_type, feature, subject, target_stream, body, state)
VALUES (-7, 'privileges-dead', 'roy', 'backend', 'dead-one', 'agog.deliverables.roy.backend.dead-one',
        'agog_features_backend', 'x', 'dead');
SET ROLE agog_test_admin;
SELECT agog_retry_dead(ARRAY[-7]::bigint[]) AS requeued;
RESET ROLE;
SELECT state, attempts FROM agog_nats.outbox WHERE id = -7;
ROLLBACK;
SET ROLE agog_test_admin;
-- Admins run workflows and define pipelines.
SELECT agog_start_workflow('by-admin', 'slow') AS admin_wf \gset
SELECT agog_cancel_workflow(:admin_wf, 'privileges test');
SELECT agog_define_pipeline('by-admin', '[{"stage": "only", "agent": "roy"}]');
SELECT try('DELETE FROM agog_nats.workflows');
RESET ROLE;
SELECT count(*) AS reader_sees FROM agog_nats.workflow_progress;

-- A fetch reads the agents and the outbox with the caller's rights: a role
-- that may call agog_fetch_report and read the agents but not the outbox (or
-- not use the schema) is refused, as a query of them would be.
CREATE ROLE agog_test_fetch_only;
GRANT USAGE ON SCHEMA agog_nats TO agog_test_fetch_only;
GRANT SELECT ON agog_nats.agents TO agog_test_fetch_only;
GRANT EXECUTE ON FUNCTION agog_fetch_report(text, text, text) TO agog_test_fetch_only;
SET ROLE agog_test_fetch_only;
SELECT try('SELECT * FROM agog_fetch_report(''roy'', ''backend'', ''fetch-only'')');
RESET ROLE;
REVOKE USAGE ON SCHEMA agog_nats FROM agog_test_fetch_only;
GRANT SELECT ON agog_nats.outbox TO agog_test_fetch_only;
SET ROLE agog_test_fetch_only;
SELECT try('SELECT * FROM agog_fetch_report(''roy'', ''backend'', ''fetch-only'')');
RESET ROLE;
REVOKE ALL ON agog_nats.outbox, agog_nats.agents FROM agog_test_fetch_only;
REVOKE EXECUTE ON FUNCTION agog_fetch_report(text, text, text) FROM agog_test_fetch_only;
-- Row security on the outbox, where an administrator turns it on, holds for
-- the pending reports a fetch serves (rolled back: the policy, the report).
BEGIN;
ALTER TABLE agog_nats.outbox ENABLE ROW LEVEL SECURITY;
CREATE POLICY hide_secret ON agog_nats.outbox USING (feature <> 'rls-secret');
SELECT agog_publish_report('roy', 'backend', 'rls-secret', 'hidden by the policy') > 0 AS queued;
SELECT agog_publish_report('roy', 'backend', 'rls-open', 'not hidden') > 0 AS queued;
SET LOCAL ROLE agog_test_reader;
SELECT count(*) AS secret_rows FROM agog_fetch_report('roy', 'backend', 'rls-secret');
SELECT content AS open_content FROM agog_fetch_report('roy', 'backend', 'rls-open');
ROLLBACK;

DROP ROLE agog_test_nobody, agog_test_reader, agog_test_writer, agog_test_admin,
          agog_test_fetch_only;
