-- Bad input: refused with a clear error, nothing is sent.
CREATE TEMP TABLE before AS SELECT sum(messages) AS n FROM agog_stream_status();

-- Every token is [A-Za-z0-9_-], 1 to 64 characters: 22023 naming the argument.
SELECT arg, label,
       try(format('SELECT agog_publish_report_now(%L, %L, %L, %L)',
                  CASE arg WHEN 'agent' THEN v ELSE 'cynthia' END,
                  CASE arg WHEN 'task_type' THEN v ELSE 'research' END,
                  CASE arg WHEN 'feature' THEN v ELSE 'f1' END, 'body')) AS publish,
       try(format('SELECT * FROM agog_fetch_report(%L, %L, %L)',
                  CASE arg WHEN 'agent' THEN v ELSE 'cynthia' END,
                  CASE arg WHEN 'task_type' THEN v ELSE 'research' END,
                  CASE arg WHEN 'feature' THEN v ELSE 'f1' END)) AS fetch
  FROM (VALUES ('agent'), ('task_type'), ('feature')) a(arg),
       (VALUES ('empty', ''), ('65 chars', repeat('a', 65)), ('dot', 'a.b'),
               ('star', '*'), ('gt', '>'), ('space', 'a b'), ('crlf', E'a\r\nPUB x 1'),
               ('tab', E'a\tb'), ('non-ascii', 'caf' || chr(233))) b(label, v)
 ORDER BY arg, label;

-- 64 characters is allowed.
SELECT try(format('SELECT * FROM agog_fetch_report(%L, %L, %L)', 'cynthia', 'research', repeat('z', 64)));

-- NULLs are refused, not silently ignored.
SELECT try('SELECT agog_publish_report_now(NULL, ''research'', ''f'', ''c'')');
SELECT try('SELECT agog_publish_report_now(''cynthia'', ''research'', ''f'', NULL)');
SELECT try('SELECT * FROM agog_fetch_report(''cynthia'', NULL, ''f'')');
SELECT try('SELECT * FROM agog_fetch_report_by_seq(''cynthia'', NULL)');

-- Metadata must be an object that leaves agog_nats's own keys alone.
SELECT try('SELECT agog_publish_report_now(''cynthia'', ''research'', ''f'', ''c'', ''[1,2]'')');
SELECT try('SELECT agog_publish_report_now(''cynthia'', ''research'', ''f'', ''c'', ''"x"'')');
SELECT try('SELECT agog_publish_report_now(''cynthia'', ''research'', ''f'', ''c'', ''{"timestamp": 1}'')');
SELECT try('SELECT agog_publish_report_now(''cynthia'', ''research'', ''f'', ''c'', ''{"taskType": "x"}'')');

-- Sequences start at 1.
SELECT try('SELECT * FROM agog_fetch_report_by_seq(''cynthia'', 0)');
SELECT try('SELECT * FROM agog_fetch_report_by_seq(''cynthia'', -5)');

-- An unknown agent: the whole error, with its hint.
SELECT agog_publish_report_now('nobody', 'research', 'f1', 'body');
SELECT * FROM agog_fetch_report_by_seq('nobody', 1);

-- A report over the server's max_payload (10 MB here) is refused before it
-- is sent, and the connection stays usable.
SELECT try($$SELECT agog_publish_report_now('cynthia', 'research', 'too-big', repeat('x', 10 * 1024 * 1024))$$);
SELECT agog_publish_report_now('cynthia', 'research', 'after-big', 'small') ~ '^agog_features_research\.[0-9]+$' AS published;

-- Nothing but that last report reached JetStream.
SELECT (SELECT sum(messages) FROM agog_stream_status()) - n AS new_messages FROM before;
