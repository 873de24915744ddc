-- Transactional publish: agog_publish_report reaches JetStream if and only if
-- its transaction commits.
CREATE FUNCTION wait_published(ids bigint[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1..300 LOOP
        EXIT WHEN NOT EXISTS (SELECT 1 FROM agog_nats.outbox
                               WHERE id = ANY (ids) AND state = 'pending');
        PERFORM pg_sleep(0.05);
    END LOOP;
END
$$;

-- Inside the transaction: pending, readable by the same transaction.
BEGIN;
SELECT agog_publish_report('cynthia', 'research', 'tx-commit', '# committed report',
                           '{"files_analyzed": 3}') AS id1 \gset
SELECT state, message_id, attempts FROM agog_nats.reports WHERE id = :id1;
SELECT content, metadata->>'files_analyzed' AS files, message_id, sequence, subject, published_at
  FROM agog_fetch_report('cynthia', 'research', 'tx-commit');
COMMIT;

-- After commit the worker publishes it; the id resolves to <stream>.<seq>.
SELECT wait_published(ARRAY[:id1]::bigint[]);
SELECT state, message_id ~ '^agog_features_research\.[0-9]+$' AS id_format, duplicate,
       attempts, last_error, publish_lag >= '0' AS lag_ok
  FROM agog_nats.reports WHERE id = :id1;
SELECT r.content, r.metadata->>'taskType' AS task_type,
       r.message_id = agog_report_message_id(:id1) AS same_id
  FROM agog_fetch_report('cynthia', 'research', 'tx-commit') r;

-- A rollback leaves nothing to publish.
BEGIN;
SELECT agog_publish_report('cynthia', 'research', 'tx-rollback', 'never') IS NOT NULL AS queued;
ROLLBACK;
SELECT count(*) AS outbox_rows FROM agog_nats.outbox WHERE feature = 'tx-rollback';
SELECT count(*) AS in_jetstream FROM agog_fetch_report('cynthia', 'research', 'tx-rollback');

-- So does a rollback to a savepoint, for what came after it.
BEGIN;
SELECT agog_publish_report('sylvia', 'critique', 'tx-savepoint', 'kept') AS kept \gset
SAVEPOINT s1;
SELECT agog_publish_report('sylvia', 'critique', 'tx-savepoint-2', 'dropped') IS NOT NULL AS queued;
ROLLBACK TO SAVEPOINT s1;
COMMIT;
SELECT wait_published(ARRAY[:kept]::bigint[]);
SELECT feature, state FROM agog_nats.reports WHERE feature LIKE 'tx-savepoint%' ORDER BY feature;
SELECT content FROM agog_fetch_report('sylvia', 'critique', 'tx-savepoint');
SELECT count(*) AS dropped_in_jetstream FROM agog_fetch_report('sylvia', 'critique', 'tx-savepoint-2');

-- Several reports in one transaction, on one subject: the latest wins.
BEGIN;
WITH q AS MATERIALIZED (
    SELECT g, agog_publish_report('roy', 'backend', 'tx-many', 'v' || g) AS id
      FROM generate_series(1, 5) g)
SELECT count(*) AS queued, max(id) AS last_id FROM q \gset
SELECT :queued AS queued;
SELECT content FROM agog_fetch_report('roy', 'backend', 'tx-many');
COMMIT;
SELECT wait_published(ARRAY(SELECT id FROM agog_nats.outbox WHERE feature = 'tx-many'));
SELECT count(*) FILTER (WHERE state = 'published') AS published,
       count(DISTINCT seq) AS distinct_seqs
  FROM agog_nats.outbox WHERE feature = 'tx-many';
SELECT content, message_id = agog_report_message_id(:last_id) AS latest
  FROM agog_fetch_report('roy', 'backend', 'tx-many');

-- One subject's reports reach JetStream in id order, whatever order the
-- claim's UPDATE visits them in.  The first ten rows get new versions (an
-- administrator's no-op update, in the same transaction) that lie after the
-- last ten on their pages: a claim that scans the table meets them last.
BEGIN;
SELECT count(agog_publish_report('jen', 'frontend', 'order', 'v' || lpad(g::text, 2, '0'))) AS queued
  FROM generate_series(1, 20) g;
UPDATE agog_nats.outbox SET next_attempt_at = next_attempt_at
 WHERE feature = 'order' AND body::json ->> 'content' <= 'v10';
COMMIT;
SELECT wait_published(ARRAY(SELECT id FROM agog_nats.outbox WHERE feature = 'order'));
SELECT count(*) FILTER (WHERE seq < prev_seq) AS out_of_order, count(*) AS published
  FROM (SELECT seq, lag(seq) OVER (ORDER BY id) AS prev_seq FROM agog_nats.outbox
         WHERE feature = 'order' AND state = 'published') s;
SELECT content FROM agog_fetch_report('jen', 'frontend', 'order');

-- A subject's history does not slow its fetch.  Published rows stay in the
-- outbox for agog_nats.published_retention (7 days), and the look-up of a
-- report on the subject not yet in JetStream must not walk them: 2,000
-- reports on one subject, published and vacuumed, then the shared buffers
-- one fetch touches (the function scan counts its own queries' too).
CREATE FUNCTION fetch_buffers(a text, t text, f text) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    plan json;
BEGIN
    EXECUTE format('EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT * FROM agog_fetch_report(%L, %L, %L)',
                   a, t, f) INTO plan;
    RETURN (plan -> 0 -> 'Plan' ->> 'Shared Hit Blocks')::bigint
         + (plan -> 0 -> 'Plan' ->> 'Shared Read Blocks')::bigint;
END
$$;
SELECT count(agog_publish_report('jen', 'frontend', 'history', 'v' || g)) AS queued
  FROM generate_series(1, 2000) g;
SELECT wait_published(ARRAY(SELECT id FROM agog_nats.outbox WHERE feature = 'history'));
SELECT state, count(*) FROM agog_nats.outbox WHERE feature = 'history' GROUP BY state;
VACUUM agog_nats.outbox;
SELECT content FROM agog_fetch_report('jen', 'frontend', 'history');
SELECT fetch_buffers('jen', 'frontend', 'history') < 50 AS few_buffers;

-- The same checks as agog_publish_report_now, before commit.
SELECT try(format('SELECT agog_publish_report(%L, %L, %L, %L)', a, t, f, 'c'))
  FROM (VALUES ('', 'research', 'f'), ('cynthia', 'a.b', 'f'), ('cynthia', 'research', 'x>'),
               ('cynthia', 'research', E'a\r\nb'), ('nobody', 'research', 'f')) v(a, t, f);
SELECT try('SELECT agog_publish_report(''cynthia'', ''research'', ''f'', NULL)');
SELECT try('SELECT agog_publish_report(''cynthia'', ''research'', ''f'', ''c'', ''{"agent": "x"}'')');
SELECT try('SELECT agog_publish_report(''cynthia'', ''research'', ''f'', ''c'', ''[]'')');
SELECT try($$SELECT agog_publish_report('cynthia', 'research', 'too-big', repeat('x', 10 * 1024 * 1024))$$);
SELECT count(*) AS nothing_written FROM agog_nats.outbox WHERE feature IN ('f', 'too-big');

-- A stream with a smaller maximum message size: a report exactly at the
-- limit passes, one byte over is refused before commit.
INSERT INTO agog_nats.agents (agent, task_type, max_msg_size) VALUES ('tiny', 'tiny_reports', 2000);
SELECT agog_publish_report('tiny', 'tiny_reports', 'size', 'x') AS probe \gset
SELECT 2000 - (octet_length(body) - 1 + length(E'NATS/1.0\r\nNats-Msg-Id: \r\n\r\n') + length(msg_id)) AS room
  FROM agog_nats.outbox WHERE id = :probe \gset
SELECT agog_publish_report('tiny', 'tiny_reports', 'size', repeat('y', :room)) IS NOT NULL AS at_limit_ok;
SELECT try(format('SELECT agog_publish_report(%L, %L, %L, %L)', 'tiny', 'tiny_reports', 'size',
                  repeat('y', :room + 1)));
SELECT wait_published(ARRAY(SELECT id FROM agog_nats.outbox WHERE agent = 'tiny'));
SELECT state, count(*) FROM agog_nats.outbox WHERE agent = 'tiny' GROUP BY state;
SELECT length(content) = :room AS at_limit_in_jetstream FROM agog_fetch_report('tiny', 'tiny_reports', 'size');

-- The depth cap: past agog_nats.outbox_max_pending, a clear error.
SELECT wait_until('SELECT outbox_pending = 0 FROM agog_outbox_stats()', 5);
ALTER SYSTEM SET agog_nats.outbox_max_pending = 3;
SELECT pg_reload_conf();
SELECT pg_sleep(0.2);
SHOW agog_nats.outbox_max_pending;
BEGIN;
SELECT count(agog_publish_report('billy', 'qa', 'cap', 'r' || g)) FROM generate_series(1, 3) g;
SELECT try('SELECT agog_publish_report(''billy'', ''qa'', ''cap'', ''one too many'')');
ROLLBACK;
ALTER SYSTEM RESET agog_nats.outbox_max_pending;
SELECT pg_reload_conf();

-- Health in one row.
SELECT pid IS NOT NULL AS running, connected, outbox_depth >= 0 AS depth_ok,
       reports_published > 0 AS has_published, last_drain_at IS NOT NULL AS drained
  FROM agog_nats.worker_health;
SELECT max_payload FROM agog_outbox_stats();

-- The outbox's rows keep their subject's shape, whoever writes them: the
-- subject is the one its kind, agent, task type and feature make, and each
-- token is 1 to 64 of [A-Za-z0-9_-] (checked in C: the CHECK runs on every
-- row the worker claims or records).
SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint
 WHERE conrelid = 'agog_nats.outbox'::regclass AND contype = 'c' ORDER BY conname;
BEGIN;
SELECT try($$INSERT INTO agog_nats.outbox (msg_id, agent, task_type, feature, subject, target_stream, body)
             VALUES ('c1', 'roy', 'backend', 'f', 'agog.deliverables.roy.backend.g', 'agog_features_backend', 'x')$$);
SELECT try($$INSERT INTO agog_nats.outbox (msg_id, agent, task_type, feature, subject, target_stream, body)
             VALUES ('c2', 'roy', 'backend', 'f.g', 'agog.deliverables.roy.backend.f.g', 'agog_features_backend', 'x')$$);
SELECT try($$INSERT INTO agog_nats.outbox (msg_id, agent, task_type, feature, subject, target_stream, body)
             VALUES ('c3', 'roy', 'back end', 'f', 'agog.deliverables.roy.back end.f', 'agog_features_backend', 'x')$$);
SELECT try($$INSERT INTO agog_nats.outbox (msg_id, agent, task_type, feature, subject, target_stream, body)
             VALUES ('c4', 'roy', 'backend', '', 'agog.deliverables.roy.backend.', 'agog_features_backend', 'x')$$);
SELECT try($$INSERT INTO agog_nats.outbox (msg_id, agent, task_type, feature, subject, target_stream, body)
             VALUES ('c5', 'roy', 'backend', repeat('f', 65), 'agog.deliverables.roy.backend.' || repeat('f', 65),
                     'agog_features_backend', 'x')$$);
SELECT try($$INSERT INTO agog_nats.outbox (msg_id, kind, agent, task_type, feature, subject, target_stream, body)
             VALUES ('c6', 'task', 'roy', 'backend', 'f', 'agog.deliverables.roy.backend.f', 'agog_tasks', 'x')$$);
SELECT try($$INSERT INTO agog_nats.outbox (msg_id, kind, agent, task_type, feature, subject, target_stream, body)
             VALUES ('c7', 'report', 'roy', 'backend', 'f', 'agog.tasks.roy.f', 'agog_features_backend', 'x')$$);
SELECT try($$INSERT INTO agog_nats.outbox (msg_id, agent, task_type, feature, subject, target_stream, body)
             VALUES ('c8', 'roy', 'backend', 'f', 'agog.deliverables.roy.backend.f.', 'agog_features_backend', 'x')$$);
SELECT try($$INSERT INTO agog_nats.outbox (msg_id, kind, agent, task_type, feature, subject, target_stream, body)
             VALUES ('c11', 'task', 'roy', 'a.b', 'f', 'agog.tasks.roy.f', 'agog_tasks', 'x')$$);
SELECT try($$INSERT INTO agog_nats.outbox (msg_id, kind, agent, task_type, feature, subject, target_stream, body)
             VALUES ('c12', 'task', 'roy', '', 'f', 'agog.tasks.roy.f', 'agog_tasks', 'x')$$);
SELECT try($$INSERT INTO agog_nats.outbox (msg_id, agent, task_type, feature, subject, target_stream, body)
             VALUES ('c13', repeat('r', 65), 'backend', 'f', 'agog.deliverables.' || repeat('r', 65) || '.backend.f',
                     'agog_features_backend', 'x')$$);
SELECT try($$INSERT INTO agog_nats.outbox (msg_id, agent, task_type, feature, subject, target_stream, body)
             VALUES ('c14', 'roy', repeat('t', 65), 'f', 'agog.deliverables.roy.' || repeat('t', 65) || '.f',
                     'agog_features_backend', 'x')$$);
SELECT try($$INSERT INTO agog_nats.outbox (msg_id, agent, task_type, feature, subject, target_stream, body)
             VALUES ('c15', 'roy', 'backend', 'f', 'agog.deliverables.', 'agog_features_backend', 'x')$$);
-- the good shapes of both kinds, the longest tokens included
INSERT INTO agog_nats.outbox (msg_id, kind, agent, task_type, feature, subject, target_stream, body)
VALUES ('c9', 'report', repeat('R', 64), repeat('T', 64), repeat('F', 64),
        'agog.deliverables.' || repeat('R', 64) || '.' || repeat('T', 64) || '.' || repeat('F', 64),
        'agog_features_' || repeat('T', 64), 'x'),
       ('c10', 'task', 'roy', 'backend', 'f-1', 'agog.tasks.roy.f-1', 'agog_tasks', 'x');
-- an update of a good row is checked again
SELECT try($$UPDATE agog_nats.outbox SET feature = 'other' WHERE msg_id = 'c10'$$);
ROLLBACK;

-- A report queued in a prepared transaction: COMMIT PREPARED runs no
-- callback that wakes the worker, so the worker's poll (once a second)
-- finds it, and it is published.
BEGIN;
SELECT agog_publish_report('roy', 'backend', 'two-phase', 'prepared report') > 0 AS queued;
PREPARE TRANSACTION 'agog_two_phase';
SELECT count(*) AS visible_before_commit FROM agog_nats.outbox WHERE feature = 'two-phase';
COMMIT PREPARED 'agog_two_phase';
SELECT wait_until($$SELECT state = 'published' FROM agog_nats.outbox WHERE feature = 'two-phase'$$);
SELECT content FROM agog_fetch_report('roy', 'backend', 'two-phase');
