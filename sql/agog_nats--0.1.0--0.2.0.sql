/* agog_nats--0.1.0--0.2.0.sql: the transactional outbox. Never edit after release. */

\echo Use "ALTER EXTENSION agog_nats UPDATE TO '0.2.0'" to load this file. \quit

-- Reports written by agog_publish_report in the caller's transaction; the
-- worker publishes them to JetStream after commit, exactly once.
CREATE SEQUENCE agog_nats.outbox_id_seq;
CREATE TABLE agog_nats.outbox (
    id              bigint PRIMARY KEY DEFAULT nextval('agog_nats.outbox_id_seq'),
    msg_id          text NOT NULL UNIQUE,
    -- Tokens are checked by the functions that write the outbox (no role
    -- may insert directly); a regex CHECK here would run on every state
    -- change of every row, and cost the drain a sixth of its time.
    agent           text NOT NULL,
    task_type       text NOT NULL,
    feature         text NOT NULL,
    kind            text NOT NULL DEFAULT 'report' CHECK (kind IN ('report', 'task')),
    subject         text NOT NULL CHECK (
                    (kind = 'report' AND subject = 'agog.deliverables.' || agent || '.' || task_type || '.' || feature)
                    OR (kind = 'task' AND subject = 'agog.tasks.' || agent || '.' || feature)),
    target_stream   text NOT NULL,
    body            text NOT NULL,
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'published', 'dead')),
    attempts        integer NOT NULL DEFAULT 0,
    first_sent_at   timestamptz,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz,
    stream          text,
    seq             bigint,
    duplicate       boolean,
    last_error      text,
    CHECK ((state = 'published') = (seq IS NOT NULL AND stream IS NOT NULL))
);
ALTER SEQUENCE agog_nats.outbox_id_seq OWNED BY agog_nats.outbox.id;
CREATE INDEX outbox_pending ON agog_nats.outbox (id) WHERE state = 'pending';
CREATE INDEX outbox_pending_due ON agog_nats.outbox (next_attempt_at) WHERE state = 'pending';
CREATE INDEX outbox_subject ON agog_nats.outbox (subject, id);
CREATE INDEX outbox_published_at ON agog_nats.outbox (published_at) WHERE state = 'published';
COMMENT ON TABLE agog_nats.outbox IS
    'Reports published by agog_publish_report: pending until the worker has the PubAck, then published (stream, seq) or dead (last_error)';

-- pg_dump keeps every report, pending ones included, and the id sequence.
SELECT pg_catalog.pg_extension_config_dump('agog_nats.outbox', '');
SELECT pg_catalog.pg_extension_config_dump('agog_nats.outbox_id_seq', '');

-- The worker's claim: lease up to batch_size due reports, oldest first,
-- counting the attempt.  Rows another transaction holds are skipped, and a
-- leased row is not due again until its lease runs out, so two drainers
-- never claim one report at once.
CREATE FUNCTION agog_nats.claim_outbox(batch_size integer, lease_ms integer,
                                       after_id bigint DEFAULT 0)
    RETURNS TABLE (id bigint, msg_id text, subject text, body text, attempts integer,
                   first_sent_age_ms bigint, stream text)
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
    AS $$
BEGIN
    -- PL/pgSQL keeps the plan across calls.  = ANY (ARRAY(...)) keeps the
    -- update on the primary key whatever the queue's size (a join here can
    -- turn into a hash join over the table); after_id lets a drainer that
    -- just took a full batch go on from there instead of walking again
    -- through what it already took.
    RETURN QUERY
    UPDATE agog_nats.outbox o
       SET attempts = o.attempts + 1,
           first_sent_at = coalesce(o.first_sent_at, now()),
           next_attempt_at = now() + lease_ms * interval '1 millisecond'
     WHERE o.id = ANY (ARRAY(
               SELECT c.id FROM agog_nats.outbox c
                WHERE c.state = 'pending' AND c.next_attempt_at <= now()
                  AND c.id > after_id
                ORDER BY c.id LIMIT batch_size
                  FOR UPDATE SKIP LOCKED))
    RETURNING o.id, o.msg_id, o.subject, o.body, o.attempts,
              (extract(epoch FROM now() - coalesce(o.first_sent_at, now())) * 1000)::bigint,
              o.target_stream;
END
$$;
REVOKE ALL ON FUNCTION agog_nats.claim_outbox(integer, integer, bigint) FROM PUBLIC;

-- Wakes the worker at commit.
CREATE FUNCTION agog_nats.outbox_changed() RETURNS trigger
    LANGUAGE C
    AS 'MODULE_PATHNAME', 'agog_outbox_changed';
REVOKE ALL ON FUNCTION agog_nats.outbox_changed() FROM PUBLIC;
CREATE TRIGGER outbox_changed
    AFTER INSERT OR UPDATE ON agog_nats.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION agog_nats.outbox_changed();

-- Transactional publish.  SECURITY DEFINER with a pinned search_path, so
-- writers need no INSERT on the outbox (and cannot bypass the checks).
CREATE FUNCTION @extschema@.agog_publish_report(
        agent text, task_type text, feature text, content text,
        metadata jsonb DEFAULT '{}')
    RETURNS bigint
    LANGUAGE C VOLATILE PARALLEL UNSAFE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS 'MODULE_PATHNAME', 'agog_publish_report';
COMMENT ON FUNCTION @extschema@.agog_publish_report(text, text, text, text, jsonb) IS
    'Publish a report to JetStream if and only if this transaction commits, exactly once; returns its outbox id';

CREATE FUNCTION @extschema@.agog_report_message_id(report_id bigint)
    RETURNS text
    LANGUAGE sql STABLE PARALLEL SAFE
    RETURN (SELECT o.stream || '.' || o.seq FROM agog_nats.outbox o
             WHERE o.id = report_id AND o.state = 'published');
COMMENT ON FUNCTION @extschema@.agog_report_message_id(bigint) IS
    'The <stream>.<seq> of a report published by agog_publish_report, NULL until it is in JetStream';

CREATE FUNCTION @extschema@.agog_retry_dead(report_ids bigint[] DEFAULT NULL)
    RETURNS bigint
    LANGUAGE C VOLATILE PARALLEL UNSAFE
    AS 'MODULE_PATHNAME', 'agog_retry_dead';
COMMENT ON FUNCTION @extschema@.agog_retry_dead(bigint[]) IS
    'Put dead reports (all, or the given ids) back in the queue with the same message id; returns how many';

CREATE FUNCTION @extschema@.agog_outbox_stats(
        OUT reports_published bigint, OUT reports_dead bigint,
        OUT last_drain_at timestamptz, OUT max_payload bigint,
        OUT outbox_pending bigint)
    RETURNS record
    LANGUAGE C VOLATILE PARALLEL SAFE
    AS 'MODULE_PATHNAME', 'agog_outbox_stats';
COMMENT ON FUNCTION @extschema@.agog_outbox_stats() IS
    'Counters of the worker since it started: reports published and dead, last drain, the server''s max_payload, and the pending count the depth cap uses';

-- Every report's state.
CREATE VIEW agog_nats.reports AS
SELECT o.id, o.kind, o.agent, o.task_type, o.feature, o.subject, o.state,
       CASE WHEN o.state = 'published' THEN o.stream || '.' || o.seq END AS message_id,
       o.duplicate, o.attempts, octet_length(o.body) AS bytes,
       o.created_at, o.published_at, o.published_at - o.created_at AS publish_lag,
       o.next_attempt_at, o.last_error, o.msg_id
  FROM agog_nats.outbox o;
COMMENT ON VIEW agog_nats.reports IS
    'Every report of agog_publish_report: pending, published with <stream>.<seq>, or dead with its error';

-- The worker's health in one row.
CREATE VIEW agog_nats.worker_health AS
SELECT w.pid, w.connected, w.server, w.connected_since, w.reconnects, w.disconnects,
       q.pending AS outbox_depth, q.dead AS dead_reports,
       now() - q.oldest_pending AS oldest_pending_age,
       s.reports_published, s.reports_dead, s.last_drain_at,
       w.streams_ok, w.streams_failed, w.last_error, w.last_error_at
  FROM @extschema@.agog_worker_status() w,
       @extschema@.agog_outbox_stats() s,
       LATERAL (SELECT count(*) FILTER (WHERE o.state = 'pending') AS pending,
                       count(*) FILTER (WHERE o.state = 'dead') AS dead,
                       min(o.created_at) FILTER (WHERE o.state = 'pending') AS oldest_pending
                  FROM agog_nats.outbox o
                 WHERE o.state IN ('pending', 'dead')) q;
COMMENT ON VIEW agog_nats.worker_health IS
    'The worker: connection, reconnects, outbox depth, oldest pending report, reports published, last error';

-- Privileges: readers see reports, writers publish, admins retry.
REVOKE ALL ON FUNCTION @extschema@.agog_publish_report(text, text, text, text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.agog_report_message_id(bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.agog_retry_dead(bigint[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.agog_outbox_stats() FROM PUBLIC;
GRANT SELECT ON agog_nats.outbox, agog_nats.reports, agog_nats.worker_health TO agog_nats_reader;
GRANT EXECUTE ON FUNCTION @extschema@.agog_report_message_id(bigint) TO agog_nats_reader;
GRANT EXECUTE ON FUNCTION @extschema@.agog_outbox_stats() TO agog_nats_reader;
GRANT EXECUTE ON FUNCTION @extschema@.agog_publish_report(text, text, text, text, jsonb) TO agog_nats_writer;
GRANT EXECUTE ON FUNCTION @extschema@.agog_retry_dead(bigint[]) TO agog_nats_admin;
GRANT UPDATE (state, attempts, next_attempt_at, last_error) ON agog_nats.outbox TO agog_nats_admin;
