-- Publish now and fetch back, in the seed's format.
\set content '# Customer search research\n\nPatterns: "prefix", \u00e9t\u00e9, tabs\tand emoji \U0001F600.'
SELECT agog_publish_report_now('cynthia', 'research', 'customer-search', E:'content',
                               '{"files_analyzed": 15, "duration_minutes": 12}') AS id1 \gset
SELECT :'id1' ~ '^agog_features_research\.[0-9]+$' AS id_format;

SELECT content = E:'content' AS same_content,
       metadata - 'timestamp' AS metadata,
       metadata->>'timestamp' ~ '^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$' AS iso_ms_utc,
       abs(extract(epoch FROM (metadata->>'timestamp')::timestamptz - now())) < 60 AS recent,
       message_id = :'id1' AS same_id,
       message_id = 'agog_features_research.' || sequence AS id_is_stream_seq,
       subject,
       abs(extract(epoch FROM published_at - now())) < 60 AS published_recently
  FROM agog_fetch_report('cynthia', 'research', 'customer-search');

-- The latest report on a subject wins; earlier ones stay readable by sequence.
SELECT agog_publish_report_now('cynthia', 'research', 'customer-search', 'second version') AS id2 \gset
SELECT content, message_id = :'id2' AS is_latest
  FROM agog_fetch_report('cynthia', 'research', 'customer-search');
SELECT content = E:'content' AS first_by_seq, message_id = :'id1' AS same_id
  FROM agog_fetch_report_by_seq('cynthia', split_part(:'id1', '.', 2)::bigint);

-- Each agent publishes into its own stream; the id names it.
SELECT agent, split_part(agog_publish_report_now(agent, task_type, 'customer-search',
                                                 'report of ' || agent), '.', 1) AS stream
  FROM agog_nats.agents ORDER BY agent;
SELECT a.agent, r.content, r.subject
  FROM agog_nats.agents a, agog_fetch_report(a.agent, a.task_type, 'customer-search') r
 ORDER BY a.agent;

-- Called in a target list (ProjectSet, not a function scan) too: the row
-- type the executor expects is the one the functions fill.
SELECT (r).content, (r).subject
  FROM (SELECT agog_fetch_report('cynthia', 'research', 'customer-search') AS r) s;
SELECT (r).content = E:'content' AS first_by_seq
  FROM (SELECT agog_fetch_report_by_seq('cynthia', split_part(:'id1', '.', 2)::bigint) AS r) s;
SELECT count(*) FROM (SELECT agog_fetch_report('cynthia', 'research', 'never-published')) s;

-- Empty content and large content round-trip.
SELECT agog_publish_report_now('roy', 'backend', 'empty', '') IS NOT NULL AS published;
SELECT content = '' AS empty_ok, metadata->>'feature' AS feature
  FROM agog_fetch_report('roy', 'backend', 'empty');
SELECT agog_publish_report_now('roy', 'backend', 'large', repeat('0123456789', 500000)) IS NOT NULL AS published;
SELECT length(content) FROM agog_fetch_report('roy', 'backend', 'large');

-- Nothing there: no row, no error.
SELECT count(*) FROM agog_fetch_report('cynthia', 'research', 'never-published');
SELECT count(*) FROM agog_fetch_report_by_seq('cynthia', 1000000);

-- Not transactional (that is agog_publish_report's job): a rollback does not
-- take back a report published now.
BEGIN;
SELECT agog_publish_report_now('jen', 'frontend', 'rolled-back', 'still there') IS NOT NULL AS published;
ROLLBACK;
SELECT content FROM agog_fetch_report('jen', 'frontend', 'rolled-back');

-- Every ASCII character but NUL, at every offset of a sixteen-byte block, and
-- multibyte characters round-trip exactly (writing escapes and reading
-- unescapes the content in runs, sixteen or eight bytes at a time).
CREATE TEMP VIEW all_bytes AS
SELECT string_agg(repeat('x', o) || chr(c) || 'é😀', '' ORDER BY o, c) AS content
  FROM generate_series(1, 127) c, generate_series(0, 16) o;
SELECT agog_publish_report_now('roy', 'backend', 'all-bytes', content) IS NOT NULL AS published FROM all_bytes;
SELECT r.content = b.content AS same_content, length(r.content)
  FROM agog_fetch_report('roy', 'backend', 'all-bytes') r, all_bytes b;
-- Escapes that outgrow twice the text (six bytes for each control
-- character), two-byte ones, and both mixed with plain runs.
CREATE TEMP VIEW escapes AS
SELECT repeat(chr(1), 5000) || repeat('"\', 3000) || repeat(chr(31) || 'a', 2000)
       || repeat(E'\n', 100) AS content;
SELECT agog_publish_report_now('roy', 'backend', 'escapes', content) IS NOT NULL AS published FROM escapes;
SELECT r.content = e.content AS same_content, length(r.content), r.metadata ->> 'agent' AS agent
  FROM agog_fetch_report('roy', 'backend', 'escapes') r, escapes e;
-- 50,000 characters drawn at random from 1..127 and two multibyte ones:
-- escapes of both sizes at every distance from each other.
SELECT setseed(0.42);
CREATE TEMP TABLE mixed AS
SELECT string_agg(CASE WHEN r < 128 THEN chr(r) WHEN r < 132 THEN 'é' ELSE '😀' END, '') AS content
  FROM (SELECT 1 + floor(random() * 135)::int AS r FROM generate_series(1, 50000)) g;
SELECT agog_publish_report_now('roy', 'backend', 'mixed', content) IS NOT NULL AS published FROM mixed;
SELECT r.content = m.content AS same_content, length(r.content)
  FROM agog_fetch_report('roy', 'backend', 'mixed') r, mixed m;
-- The same read from the outbox (this transaction's own report, not yet in
-- JetStream).
BEGIN;
SELECT agog_publish_report('roy', 'backend', 'all-bytes', 'v2 ' || content) > 0 AS queued FROM all_bytes;
SELECT r.content = 'v2 ' || b.content AS same_content, r.message_id IS NULL AS pending
  FROM agog_fetch_report('roy', 'backend', 'all-bytes') r, all_bytes b;
-- The content is escaped exactly as PostgreSQL's own JSON output escapes it.
SELECT starts_with(o.body, '{"content":' || to_json('v2 ' || b.content)::text || ',"metadata":')
       AS same_escaping
  FROM agog_nats.outbox o, all_bytes b
 WHERE o.subject = 'agog.deliverables.roy.backend.all-bytes' AND o.state = 'pending';
ROLLBACK;
-- A fetch sends its direct get before it reads the outbox, and does not wait
-- for the answer when the outbox has the report.  That answer (the older
-- report in the stream) comes later, and must not be taken for the answer to
-- the session's next get: in the same statement (it may arrive while the
-- next get waits), and after a pause (it is queued when the next get is sent).
SELECT agog_publish_report_now('roy', 'backend', 'stale-a', 'older a') IS NOT NULL AS published;
SELECT agog_publish_report_now('roy', 'backend', 'stale-b', 'only b') IS NOT NULL AS published;
SELECT content FROM agog_fetch_report('roy', 'backend', 'stale-a');
BEGIN;
SELECT agog_publish_report('roy', 'backend', 'stale-a', 'newer a') > 0 AS queued;
SELECT (SELECT content FROM agog_fetch_report('roy', 'backend', 'stale-a')) AS a,
       (SELECT content FROM agog_fetch_report('roy', 'backend', 'stale-b')) AS b;
SELECT content FROM agog_fetch_report('roy', 'backend', 'stale-a');
SELECT pg_sleep(0.05) IS NOT NULL AS paused;
SELECT content FROM agog_fetch_report('roy', 'backend', 'stale-b');
ROLLBACK;
-- The same with a get to a stream that does not exist yet (a new agent's,
-- made after its commit): no answer comes at all.
BEGIN;
INSERT INTO agog_nats.agents (agent, task_type) VALUES ('early', 'early_reports');
SELECT agog_publish_report('early', 'early_reports', 'first', 'in the outbox') > 0 AS queued;
SELECT content, message_id IS NULL AS pending FROM agog_fetch_report('early', 'early_reports', 'first');
SELECT content FROM agog_fetch_report('roy', 'backend', 'stale-b');
-- A publish that no stream captures gets "no responders" at once.
SELECT agog_publish_report_now('early', 'early_reports', 'now', 'no stream yet');
ROLLBACK;
SELECT agog_publish_report_now('roy', 'backend', 'after-early', 'answered again') IS NOT NULL AS published;
SELECT content FROM agog_fetch_report('roy', 'backend', 'after-early');
