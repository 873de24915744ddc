-- Install, and wait (bounded) for the worker to put the six streams in place.
CREATE EXTENSION agog_nats;

-- The worker lives in this database; it may be restarting after the
-- database was created, so allow it 30 seconds.
DO $$
BEGIN
    FOR i IN 1..300 LOOP
        EXIT WHEN (SELECT connected AND streams_ok = 6 FROM agog_worker_status());
        PERFORM pg_sleep(0.1);
    END LOOP;
END
$$;
SELECT pid IS NOT NULL AS running, connected, server ~ '^nats://127\.0\.0\.1:[0-9]+$' AS server_ok,
       streams_ok, streams_failed
  FROM agog_worker_status();

-- The seed's six agents.
SELECT agent, task_type, stream_name, max_msgs, max_bytes, max_age, max_msg_size, builtin
  FROM agog_nats.agents ORDER BY agent;

-- Settings are under a reserved prefix.
SHOW agog_nats.timeout_ms;
SHOW agog_nats.database;
SHOW agog_nats.duplicate_window;
SHOW agog_nats.stream_replicas;
SET agog_nats.no_such_setting = 1;

-- Helper for the suites that follow: poll a query of one boolean every
-- 0.1 s until it is true (true) or the seconds pass (false).
CREATE FUNCTION wait_until(query text, seconds numeric DEFAULT 10)
    RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    done boolean;
    deadline timestamptz := clock_timestamp() + seconds * interval '1 s';
BEGIN
    LOOP
        EXECUTE query INTO done;
        IF done THEN
            RETURN true;
        ELSIF clock_timestamp() >= deadline THEN
            RETURN false;
        END IF;
        PERFORM pg_sleep(0.1);
    END LOOP;
END
$$;

-- Helper for the suites that follow: run a statement, report its SQLSTATE.
CREATE FUNCTION try(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE stmt;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END
$$;
