-- agog_stream_status(): one row per agent stream, the seed's fields and limits.
SELECT agent, name, subjects, messages > 0 AS has_messages, bytes > 0 AS has_bytes,
       first_seq <= last_seq AS seq_order, consumer_count,
       first_time <= last_time AS time_order, oldest_age >= '0' AS age_ok,
       max_msgs, max_bytes, max_age,
       msgs_used_pct = 100.0 * messages / max_msgs AS msgs_pct_ok,
       bytes_used_pct = 100.0 * bytes / max_bytes AS bytes_pct_ok,
       age_used_pct BETWEEN 0 AND 1 AS age_pct_ok,
       health
  FROM agog_stream_status() ORDER BY agent;

-- In a target list too (ProjectSet): the same six streams.
SELECT (s).agent, (s).health FROM (SELECT agog_stream_status() AS s) x ORDER BY 1;

-- The live state matches what fetching sees.
SELECT s.last_seq = r.sequence AS last_seq_is_latest
  FROM agog_stream_status() s,
       LATERAL agog_fetch_report_by_seq(s.agent, s.last_seq) r
 WHERE s.agent = 'roy';

-- A new agent: before its transaction commits the worker cannot see it, so
-- its stream shows as missing, not as an error.
BEGIN;
INSERT INTO agog_nats.agents (agent, task_type, description)
VALUES ('zed', 'zed_tests', 'an agent added by the tests');
SELECT agent, name, messages, max_msgs, max_bytes, max_age, health
  FROM agog_stream_status() WHERE agent = 'zed';
COMMIT;

-- After commit the worker is woken and creates it.
SELECT wait_until($$SELECT health = 'ok' FROM agog_stream_status() WHERE agent = 'zed'$$);
SELECT agent, name, subjects, messages, health FROM agog_stream_status() WHERE agent = 'zed';
SELECT agog_publish_report_now('zed', 'zed_tests', 'f', 'hello') AS zed_id;
SELECT content, subject FROM agog_fetch_report('zed', 'zed_tests', 'f');

-- Changed limits: drifted until the worker applies them.
BEGIN;
UPDATE agog_nats.agents SET max_msgs = 500, max_age = '1 day' WHERE agent = 'zed';
SELECT health FROM agog_stream_status() WHERE agent = 'zed';
COMMIT;
SELECT wait_until($$SELECT health = 'ok' FROM agog_stream_status() WHERE agent = 'zed'$$);
SELECT max_msgs, max_age, msgs_used_pct, health FROM agog_stream_status() WHERE agent = 'zed';

-- Near a limit.
UPDATE agog_nats.agents SET max_msgs = 1 WHERE agent = 'zed';
SELECT wait_until($$SELECT max_msgs = 1 FROM agog_stream_status() WHERE agent = 'zed'$$);
SELECT messages, max_msgs, msgs_used_pct, health FROM agog_stream_status() WHERE agent = 'zed';

-- Removing an agent does not delete its stream (the worker never deletes):
-- added back, the agent finds its stream with its message.
DELETE FROM agog_nats.agents WHERE agent = 'zed';
SELECT count(*) FROM agog_stream_status() WHERE agent = 'zed';
INSERT INTO agog_nats.agents (agent, task_type) VALUES ('zed', 'zed_tests');
SELECT messages FROM agog_stream_status() WHERE agent = 'zed';
SELECT content FROM agog_fetch_report('zed', 'zed_tests', 'f');
SELECT wait_until($$SELECT max_msgs = 10000 FROM agog_stream_status() WHERE agent = 'zed'$$);
SELECT max_msgs, health FROM agog_stream_status() WHERE agent = 'zed';
DELETE FROM agog_nats.agents WHERE agent = 'zed';

-- Inserted limits never lower a live stream's (CREATE EXTENSION's and a
-- restore's are inserts too): zed back with 100 messages finds its stream
-- at 10,000 and keeps it so, drifted, until a user's UPDATE says to lower.
-- (The wait is for a reconcile that ends after the insert began, then a
-- second for any reconcile still running; TAP 030 checks the same through
-- the worker's log.)
SELECT clock_timestamp() AS before_insert \gset
INSERT INTO agog_nats.agents (agent, task_type, max_msgs, limits_changed_at)
VALUES ('zed', 'zed_tests', 100, now());
SELECT max_msgs, limits_changed_at IS NULL AS as_inserted FROM agog_nats.agents WHERE agent = 'zed';
SELECT wait_until(format('SELECT streams_checked_at > %L FROM agog_worker_status()',
                         :'before_insert'));
SELECT pg_sleep(1);
SELECT max_msgs, health FROM agog_stream_status() WHERE agent = 'zed';
-- The UPDATE's stamp lowers the stream once; the worker then clears it.
UPDATE agog_nats.agents SET limits_changed_at = now() WHERE agent = 'zed';
SELECT wait_until($$SELECT health = 'ok' FROM agog_stream_status() WHERE agent = 'zed'$$);
SELECT max_msgs, health FROM agog_stream_status() WHERE agent = 'zed';
SELECT wait_until($$SELECT limits_changed_at IS NULL FROM agog_nats.agents WHERE agent = 'zed'$$);
-- An UPDATE that changes a limit stamps it; one that does not leaves the
-- stamp as it is (in a transaction, so the worker does not clear it first).
BEGIN;
UPDATE agog_nats.agents SET description = 'zed again' WHERE agent = 'zed';
SELECT limits_changed_at IS NULL AS unstamped FROM agog_nats.agents WHERE agent = 'zed';
UPDATE agog_nats.agents SET max_age = '2 days' WHERE agent = 'zed';
SELECT limits_changed_at IS NULL AS unstamped FROM agog_nats.agents WHERE agent = 'zed';
ROLLBACK;
-- An UPDATE made by a trigger of the user's is stamped too.
CREATE TABLE zed_limits (max_msgs bigint);
CREATE FUNCTION zed_limits_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE agog_nats.agents SET max_msgs = NEW.max_msgs WHERE agent = 'zed';
    RETURN NEW;
END
$$;
CREATE TRIGGER zed_limits_apply AFTER INSERT ON zed_limits
    FOR EACH ROW EXECUTE FUNCTION zed_limits_apply();
BEGIN;
INSERT INTO zed_limits VALUES (50);
SELECT max_msgs, limits_changed_at IS NULL AS unstamped FROM agog_nats.agents WHERE agent = 'zed';
ROLLBACK;
DROP TABLE zed_limits;
DROP FUNCTION zed_limits_apply();
DELETE FROM agog_nats.agents WHERE agent = 'zed';

-- Bad agent rows are refused by the table.
SELECT try($$INSERT INTO agog_nats.agents (agent, task_type) VALUES ('bad.agent', 'x1')$$);
SELECT try($$INSERT INTO agog_nats.agents (agent, task_type) VALUES ('x2', 'a>b')$$);
SELECT try($$INSERT INTO agog_nats.agents (agent, task_type) VALUES ('dup', 'research')$$);
SELECT try($$INSERT INTO agog_nats.agents (agent, task_type, max_msgs) VALUES ('neg', 'neg', 0)$$);
SELECT try($$INSERT INTO agog_nats.agents (agent, task_type, max_age) VALUES ('young', 'young', '10 ms')$$);

-- Built-in agents keep their name, task type and mark; a change to their
-- settings marks them customized (pg_dump then keeps them).  In a
-- transaction rolled back, so the worker never sees it.
BEGIN;
SELECT try($$UPDATE agog_nats.agents SET agent = 'cyn' WHERE agent = 'cynthia'$$);
SELECT try($$UPDATE agog_nats.agents SET task_type = 'study' WHERE agent = 'cynthia'$$);
SELECT try($$UPDATE agog_nats.agents SET builtin = false WHERE agent = 'cynthia'$$);
UPDATE agog_nats.agents SET description = description WHERE agent = 'cynthia';
SELECT agent, builtin, customized FROM agog_nats.agents WHERE agent = 'cynthia';
UPDATE agog_nats.agents SET max_bytes = 2 * max_bytes WHERE agent = 'cynthia';
SELECT agent, builtin, customized, max_bytes FROM agog_nats.agents WHERE agent = 'cynthia';
-- An ordinary insert of a built-in agent's name is still a duplicate; a
-- restore's (the row marked built-in) applies its settings to the row.
SELECT try($$INSERT INTO agog_nats.agents (agent, task_type) VALUES ('cynthia', 'research')$$);
INSERT INTO agog_nats.agents (agent, task_type, description, max_msgs, builtin, customized)
VALUES ('sylvia', 'critique', 'restored sylvia', 20000, true, true);
SELECT agent, task_type, description, max_msgs, builtin, customized,
       limits_changed_at IS NULL AS as_inserted
  FROM agog_nats.agents WHERE agent = 'sylvia';
SELECT count(*) AS agents FROM agog_nats.agents;
-- A row marked built-in with no built-in row of its name: one of the six
-- (deleted before the restore) stays built-in, any other is the user's.
DELETE FROM agog_nats.stages WHERE agent = 'jen';
DELETE FROM agog_nats.agents WHERE agent = 'jen';
INSERT INTO agog_nats.agents (agent, task_type, builtin, customized)
VALUES ('jen', 'frontend', true, true), ('newbie', 'newbie', true, true);
SELECT agent, builtin, customized FROM agog_nats.agents
 WHERE agent IN ('jen', 'newbie') ORDER BY agent;
ROLLBACK;

-- A change of the agents cannot be prepared (COMMIT PREPARED would not
-- tell other processes to read them again); the failed PREPARE rolls the
-- transaction back.
BEGIN;
INSERT INTO agog_nats.agents (agent, task_type) VALUES ('prep', 'prep_tests');
PREPARE TRANSACTION 'agog_agents';
SELECT count(*) AS prep_rows FROM agog_nats.agents WHERE agent = 'prep';
SELECT count(*) AS prepared FROM pg_prepared_xacts WHERE gid = 'agog_agents';
