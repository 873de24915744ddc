/* agog_nats--0.1.0.sql: first release. Never edit after release; add an upgrade script. */

\echo Use "CREATE EXTENSION agog_nats" to load this file. \quit

-- State lives in schema agog_nats; API functions in the extension's schema.
CREATE SCHEMA agog_nats;
REVOKE ALL ON SCHEMA agog_nats FROM PUBLIC;

CREATE FUNCTION agog_nats._assert_preloaded() RETURNS void
    LANGUAGE C VOLATILE STRICT
    AS 'MODULE_PATHNAME', 'agog_assert_preloaded';
REVOKE ALL ON FUNCTION agog_nats._assert_preloaded() FROM PUBLIC;
-- Refuse to install unless the library is in shared_preload_libraries.
SELECT agog_nats._assert_preloaded();

-- Roles: reader (fetch, status), writer (publish; a reader too),
-- admin (agents; a writer too).  Roles are cluster-wide and outlive the
-- extension, so they are created only when missing.
DO $roles$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['agog_nats_reader', 'agog_nats_writer', 'agog_nats_admin'] LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r);
        END IF;
    END LOOP;
END
$roles$;
GRANT agog_nats_reader TO agog_nats_writer;
GRANT agog_nats_writer TO agog_nats_admin;
GRANT USAGE ON SCHEMA agog_nats TO agog_nats_reader;

-- The agents: desired state of the agent streams.
CREATE TABLE agog_nats.agents (
    agent        text PRIMARY KEY
                 CHECK (agent ~ '^[A-Za-z0-9_-]{1,64}$'),
    task_type    text NOT NULL UNIQUE
                 CHECK (task_type ~ '^[A-Za-z0-9_-]{1,64}$'),
    stream_name  text NOT NULL GENERATED ALWAYS AS ('agog_features_' || task_type) STORED,
    description  text NOT NULL DEFAULT '',
    max_msgs     bigint NOT NULL DEFAULT 10000 CHECK (max_msgs > 0),
    max_bytes    bigint NOT NULL DEFAULT 1073741824 CHECK (max_bytes > 0),
    max_age      interval NOT NULL DEFAULT '7 days'
                 CHECK (max_age >= '1 second' AND max_age <= '100 years'),
    max_msg_size integer NOT NULL DEFAULT -1
                 CHECK (max_msg_size = -1 OR max_msg_size > 0),
    builtin      boolean NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE agog_nats.agents IS
    'One row per agent: its JetStream stream agog_features_<task_type> on agog.deliverables.<agent>.> and its limits';

CREATE FUNCTION agog_nats.agents_changed() RETURNS trigger
    LANGUAGE C
    AS 'MODULE_PATHNAME', 'agog_agents_changed';
REVOKE ALL ON FUNCTION agog_nats.agents_changed() FROM PUBLIC;

-- Wakes the worker at commit, so it puts the streams in place.
CREATE TRIGGER agents_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON agog_nats.agents
    FOR EACH STATEMENT EXECUTE FUNCTION agog_nats.agents_changed();

INSERT INTO agog_nats.agents (agent, task_type, description, builtin) VALUES
    ('cynthia', 'research',   'Cynthia: research reports', true),
    ('sylvia',  'critique',   'Sylvia: critiques of the research', true),
    ('roy',     'backend',    'Roy: backend implementation reports', true),
    ('jen',     'frontend',   'Jen: frontend implementation reports', true),
    ('billy',   'qa',         'Billy: QA reports', true),
    ('priya',   'statistics', 'Priya: statistics reports', true);

-- pg_dump keeps the agents users add; the built-in six come from this script.
SELECT pg_catalog.pg_extension_config_dump('agog_nats.agents', 'WHERE NOT builtin');

GRANT SELECT ON agog_nats.agents TO agog_nats_reader;
GRANT INSERT, UPDATE, DELETE ON agog_nats.agents TO agog_nats_admin;

-- Reports
CREATE FUNCTION @extschema@.agog_publish_report_now(
        agent text, task_type text, feature text, content text,
        metadata jsonb DEFAULT '{}')
    RETURNS text
    LANGUAGE C VOLATILE PARALLEL UNSAFE
    AS 'MODULE_PATHNAME', 'agog_publish_report_now';
COMMENT ON FUNCTION @extschema@.agog_publish_report_now(text, text, text, text, jsonb) IS
    'Publish a report to JetStream now (not transactional); returns <stream>.<seq>';

CREATE FUNCTION @extschema@.agog_fetch_report(agent text, task_type text, feature text)
    RETURNS TABLE (content text, metadata jsonb, message_id text, sequence bigint,
                   subject text, published_at timestamptz)
    LANGUAGE C VOLATILE PARALLEL UNSAFE ROWS 1
    AS 'MODULE_PATHNAME', 'agog_fetch_report';
COMMENT ON FUNCTION @extschema@.agog_fetch_report(text, text, text) IS
    'The latest report on agog.deliverables.<agent>.<task_type>.<feature>, or no row';

CREATE FUNCTION @extschema@.agog_fetch_report_by_seq(agent text, sequence bigint)
    RETURNS TABLE (content text, metadata jsonb, message_id text, sequence bigint,
                   subject text, published_at timestamptz)
    LANGUAGE C VOLATILE PARALLEL UNSAFE ROWS 1
    AS 'MODULE_PATHNAME', 'agog_fetch_report_by_seq';
COMMENT ON FUNCTION @extschema@.agog_fetch_report_by_seq(text, bigint) IS
    'The message at a sequence of an agent''s stream, or no row';

-- Streams and worker
CREATE FUNCTION @extschema@.agog_stream_status()
    RETURNS TABLE (agent text, name text, subjects text,
                   messages bigint, bytes bigint, first_seq bigint, last_seq bigint,
                   consumer_count bigint, first_time timestamptz, last_time timestamptz,
                   oldest_age interval, max_msgs bigint, max_bytes bigint, max_age interval,
                   msgs_used_pct double precision, bytes_used_pct double precision,
                   age_used_pct double precision, health text)
    LANGUAGE C VOLATILE PARALLEL UNSAFE ROWS 6
    AS 'MODULE_PATHNAME', 'agog_stream_status';
COMMENT ON FUNCTION @extschema@.agog_stream_status() IS
    'Live state of each agent stream next to its limits; health is ok, near_limit, drifted or missing';

CREATE FUNCTION @extschema@.agog_worker_status(
        OUT pid integer, OUT connected boolean, OUT server text,
        OUT connected_since timestamptz, OUT reconnects bigint, OUT disconnects bigint,
        OUT streams_checked_at timestamptz, OUT streams_ok integer, OUT streams_failed integer,
        OUT last_error text, OUT last_error_at timestamptz)
    RETURNS record
    LANGUAGE C VOLATILE PARALLEL SAFE
    AS 'MODULE_PATHNAME', 'agog_worker_status';
COMMENT ON FUNCTION @extschema@.agog_worker_status() IS
    'The background worker: pid, NATS connection health, last stream check and last error';

-- Least privilege: nothing for PUBLIC.
REVOKE ALL ON FUNCTION @extschema@.agog_publish_report_now(text, text, text, text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.agog_fetch_report(text, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.agog_fetch_report_by_seq(text, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.agog_stream_status() FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.agog_worker_status() FROM PUBLIC;

GRANT EXECUTE ON FUNCTION @extschema@.agog_fetch_report(text, text, text) TO agog_nats_reader;
GRANT EXECUTE ON FUNCTION @extschema@.agog_fetch_report_by_seq(text, bigint) TO agog_nats_reader;
GRANT EXECUTE ON FUNCTION @extschema@.agog_stream_status() TO agog_nats_reader;
GRANT EXECUTE ON FUNCTION @extschema@.agog_worker_status() TO agog_nats_reader;
GRANT EXECUTE ON FUNCTION @extschema@.agog_publish_report_now(text, text, text, text, jsonb) TO agog_nats_writer;
