/* agog_nats--0.2.0--0.3.0.sql: the workflow engine. Never edit after release. */

\echo Use "ALTER EXTENSION agog_nats UPDATE TO '0.3.0'" to load this file. \quit

-- ---------------------------------------------------------------------------
-- Pipelines: stages (agent, task type, dependencies, timeout, attempts,
-- backoff).  A cycle, an unknown stage or an unknown agent is refused.
-- ---------------------------------------------------------------------------
CREATE TABLE agog_nats.pipelines (
    pipeline    text PRIMARY KEY CHECK (pipeline ~ '^[A-Za-z0-9_-]{1,64}$'),
    description text NOT NULL DEFAULT '',
    builtin     boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE agog_nats.stages (
    pipeline      text NOT NULL REFERENCES agog_nats.pipelines ON DELETE CASCADE,
    stage         text NOT NULL CHECK (stage ~ '^[A-Za-z0-9_-]{1,64}$'),
    agent         text NOT NULL REFERENCES agog_nats.agents ON UPDATE CASCADE,
    task_type     text NOT NULL CHECK (task_type ~ '^[A-Za-z0-9_-]{1,64}$'),
    depends_on    text[] NOT NULL DEFAULT '{}',
    -- Bounded so that a deadline (now() + timeout) and a backoff always
    -- make a timestamp: past its range, every orchestration step failed,
    -- and with it the worker.
    timeout       interval NOT NULL DEFAULT '30 minutes'
                  CHECK (timeout > '0' AND timeout <= '30 days'),
    max_attempts  integer NOT NULL DEFAULT 3 CHECK (max_attempts BETWEEN 1 AND 100),
    retry_backoff interval NOT NULL DEFAULT '10 seconds'
                  CHECK (retry_backoff >= '0' AND retry_backoff <= '1 day'),
    position      integer NOT NULL DEFAULT 0,
    builtin       boolean NOT NULL DEFAULT false,
    PRIMARY KEY (pipeline, stage)
);
CREATE INDEX stages_agent ON agog_nats.stages (agent);

-- Raise the error for a pipeline whose stages name an unknown stage, depend
-- on themselves, or form a cycle.
CREATE FUNCTION agog_nats.check_pipeline(p text) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    bad record;
    remaining text[];
    peeled text[];
BEGIN
    SELECT s.stage, d INTO bad
      FROM agog_nats.stages s, unnest(s.depends_on) d
     WHERE s.pipeline = p
       AND NOT EXISTS (SELECT 1 FROM agog_nats.stages s2 WHERE s2.pipeline = p AND s2.stage = d)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'stage "%" of pipeline "%" depends on unknown stage "%"', bad.stage, p, bad.d
            USING ERRCODE = 'invalid_object_definition';
    END IF;

    -- Kahn's algorithm: peel stages none of whose dependencies remain.
    remaining := ARRAY(SELECT s.stage FROM agog_nats.stages s WHERE s.pipeline = p);
    LOOP
        peeled := ARRAY(SELECT s.stage FROM agog_nats.stages s
                         WHERE s.pipeline = p AND s.stage = ANY (remaining)
                           AND NOT (s.depends_on && remaining));
        EXIT WHEN cardinality(peeled) = 0;
        remaining := ARRAY(SELECT unnest(remaining) EXCEPT SELECT unnest(peeled));
    END LOOP;
    IF cardinality(remaining) > 0 THEN
        RAISE EXCEPTION 'pipeline "%" has a dependency cycle', p
            USING ERRCODE = 'invalid_object_definition',
                  DETAIL = format('These stages are on a cycle or depend on one: %s.',
                                  (SELECT string_agg(x, ', ' ORDER BY x) FROM unnest(remaining) x));
    END IF;
END
$$;

-- The same check for direct edits of agog_nats.stages, at commit: a
-- deleted stage may be one that others depend on.
CREATE FUNCTION agog_nats.stages_check() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    p text := CASE WHEN TG_OP = 'DELETE' THEN OLD.pipeline ELSE NEW.pipeline END;
BEGIN
    IF EXISTS (SELECT 1 FROM agog_nats.pipelines WHERE pipeline = p) THEN
        PERFORM agog_nats.check_pipeline(p);
    END IF;
    RETURN NULL;
END
$$;
CREATE CONSTRAINT TRIGGER stages_check
    AFTER INSERT OR UPDATE OR DELETE ON agog_nats.stages
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION agog_nats.stages_check();

INSERT INTO agog_nats.pipelines (pipeline, description, builtin) VALUES
    ('feature', 'The seed''s feature workflow: research, critique, backend, frontend, qa, statistics', true);
INSERT INTO agog_nats.stages (pipeline, stage, agent, task_type, depends_on, position, builtin) VALUES
    ('feature', 'research',   'cynthia', 'research',   '{}',           1, true),
    ('feature', 'critique',   'sylvia',  'critique',   '{research}',   2, true),
    ('feature', 'backend',    'roy',     'backend',    '{critique}',   3, true),
    ('feature', 'frontend',   'jen',     'frontend',   '{backend}',    4, true),
    ('feature', 'qa',         'billy',   'qa',         '{frontend}',   5, true),
    ('feature', 'statistics', 'priya',   'statistics', '{qa}',         6, true);

-- ---------------------------------------------------------------------------
-- Workflows, tasks, notices, events
-- ---------------------------------------------------------------------------
CREATE TABLE agog_nats.workflows (
    id          bigserial PRIMARY KEY,
    pipeline    text NOT NULL REFERENCES agog_nats.pipelines ON UPDATE CASCADE,
    feature     text NOT NULL CHECK (feature ~ '^[A-Za-z0-9_-]{1,64}$'),
    metadata    jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
    state       text NOT NULL DEFAULT 'running'
                CHECK (state IN ('running', 'completed', 'failed', 'cancelled')),
    reason      text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
CREATE INDEX workflows_finished ON agog_nats.workflows (finished_at) WHERE state <> 'running';

CREATE TABLE agog_nats.tasks (
    id              bigserial PRIMARY KEY,
    workflow_id     bigint NOT NULL REFERENCES agog_nats.workflows ON DELETE CASCADE,
    stage           text NOT NULL,
    agent           text NOT NULL,
    task_type       text NOT NULL,
    depends_on      text[] NOT NULL,
    position        integer NOT NULL,
    timeout         interval NOT NULL,
    max_attempts    integer NOT NULL,
    retry_backoff   interval NOT NULL,
    state           text NOT NULL CHECK (state IN ('waiting', 'ready', 'dispatched', 'running',
                                                   'completed', 'failed', 'cancelled')),
    attempt         integer NOT NULL DEFAULT 0,
    -- the attempts made before the workflow's last agog_retry_workflow:
    -- max_attempts and the backoff's doubling count from there
    attempt_base    integer NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    ready_at        timestamptz,
    next_attempt_at timestamptz,
    dispatched_at   timestamptz,
    claimed_at      timestamptz,
    claimed_by      text,
    lease_until     timestamptz,
    deadline        timestamptz,
    completed_at    timestamptz,
    notice          jsonb,
    notice_bytes    integer,
    report_subject  text,
    report_message_id text,
    report_bytes    bigint,
    last_error      text,
    UNIQUE (workflow_id, stage)
);
CREATE INDEX tasks_ready ON agog_nats.tasks (next_attempt_at) WHERE state = 'ready';
CREATE INDEX tasks_dispatched ON agog_nats.tasks (agent, id) WHERE state = 'dispatched';
CREATE INDEX tasks_open ON agog_nats.tasks (deadline) WHERE state IN ('dispatched', 'running');
CREATE INDEX tasks_unresolved_report ON agog_nats.tasks (id)
    WHERE state = 'completed' AND report_message_id IS NULL;

-- Every completion notice applied (or recognised as a duplicate).
CREATE TABLE agog_nats.notices (
    id          bigserial PRIMARY KEY,
    task_id     bigint NOT NULL REFERENCES agog_nats.tasks ON DELETE CASCADE,
    attempt     integer NOT NULL,
    source      text NOT NULL CHECK (source IN ('sql', 'nats')),
    notice      jsonb NOT NULL,
    outcome     text NOT NULL CHECK (outcome IN ('advanced', 'retried', 'failed')),
    received_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (task_id, attempt)
);

-- Completion notices from NATS that could not be applied, kept with the error.
CREATE TABLE agog_nats.bad_notices (
    id          bigserial PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now(),
    subject     text NOT NULL,
    body        text NOT NULL,
    error       text NOT NULL
);

-- Every transition.
CREATE TABLE agog_nats.events (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    workflow_id bigint,
    task_id     bigint,
    stage       text,
    kind        text NOT NULL,
    detail      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX events_workflow ON agog_nats.events (workflow_id, id);
CREATE INDEX events_at ON agog_nats.events (at);

SELECT pg_catalog.pg_extension_config_dump('agog_nats.pipelines', 'WHERE NOT builtin');
SELECT pg_catalog.pg_extension_config_dump('agog_nats.stages', 'WHERE NOT builtin');
SELECT pg_catalog.pg_extension_config_dump('agog_nats.workflows', '');
SELECT pg_catalog.pg_extension_config_dump('agog_nats.workflows_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('agog_nats.tasks', '');
SELECT pg_catalog.pg_extension_config_dump('agog_nats.tasks_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('agog_nats.notices', '');
SELECT pg_catalog.pg_extension_config_dump('agog_nats.notices_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('agog_nats.bad_notices', '');
SELECT pg_catalog.pg_extension_config_dump('agog_nats.bad_notices_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('agog_nats.events', '');
SELECT pg_catalog.pg_extension_config_dump('agog_nats.events_id_seq', '');

-- A change of tasks or workflows wakes the worker at commit.
CREATE FUNCTION agog_nats.workflow_changed() RETURNS trigger
    LANGUAGE C
    AS 'MODULE_PATHNAME', 'agog_outbox_changed';
REVOKE ALL ON FUNCTION agog_nats.workflow_changed() FROM PUBLIC;
CREATE TRIGGER tasks_changed AFTER INSERT OR UPDATE ON agog_nats.tasks
    FOR EACH STATEMENT EXECUTE FUNCTION agog_nats.workflow_changed();
CREATE TRIGGER workflows_changed AFTER INSERT OR UPDATE ON agog_nats.workflows
    FOR EACH STATEMENT EXECUTE FUNCTION agog_nats.workflow_changed();

-- ---------------------------------------------------------------------------
-- Internal helpers
-- ---------------------------------------------------------------------------

-- The same token rule as the C functions, with the same errors.
CREATE FUNCTION agog_nats.check_token(argname text, value text) RETURNS void
    LANGUAGE plpgsql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
BEGIN
    IF value IS NULL THEN
        RAISE EXCEPTION '% must not be null', argname USING ERRCODE = 'null_value_not_allowed';
    ELSIF value = '' THEN
        RAISE EXCEPTION '% must not be empty', argname USING ERRCODE = 'invalid_parameter_value';
    ELSIF octet_length(value) > 64 THEN
        RAISE EXCEPTION '% is too long', argname USING ERRCODE = 'invalid_parameter_value';
    ELSIF value !~ '^[A-Za-z0-9_-]+$' THEN
        RAISE EXCEPTION '% contains a character that is not allowed in a subject token', argname
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

CREATE FUNCTION agog_nats.log_event(wf bigint, task bigint, stage text, kind text,
                                    detail jsonb DEFAULT '{}') RETURNS void
    LANGUAGE sql
    SET search_path = pg_catalog, pg_temp
    AS $$
    INSERT INTO agog_nats.events (workflow_id, task_id, stage, kind, detail)
    VALUES (wf, task, stage, kind, detail);
$$;

-- Lock a workflow and every one of its tasks, unless another session holds
-- any of them: then lock nothing more and return false.  A transition may
-- change any task of the workflow (a failure cancels the others), so the
-- worker, which must never wait for a lock an open transaction may hold
-- for long, takes them all before it starts one.
CREATE FUNCTION agog_nats.try_lock_workflow(wf bigint) RETURNS boolean
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $$
BEGIN
    PERFORM 1 FROM agog_nats.workflows WHERE id = wf FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    RETURN (SELECT count(*) FROM agog_nats.tasks WHERE workflow_id = wf) =
           (SELECT count(*) FROM (SELECT 1 FROM agog_nats.tasks WHERE workflow_id = wf
                                   FOR UPDATE SKIP LOCKED) x);
END
$$;

-- Retry a task with backoff, or fail its workflow and cancel the rest.
-- The caller holds the workflow's row lock.
CREATE FUNCTION agog_nats.retry_or_fail(t agog_nats.tasks, why text) RETURNS text
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    backoff interval;
BEGIN
    IF t.attempt - t.attempt_base < t.max_attempts THEN
        -- doubled at every attempt since the workflow's last retry, at most
        -- a day (2^20 times at most: an interval multiplied further could
        -- leave its range)
        backoff := least(t.retry_backoff
                         * power(2, least(greatest(t.attempt - t.attempt_base - 1, 0), 20)),
                         interval '1 day');
        UPDATE agog_nats.tasks
           SET state = 'ready', next_attempt_at = now() + backoff, last_error = why,
               claimed_at = NULL, claimed_by = NULL, lease_until = NULL, deadline = NULL
         WHERE id = t.id;
        PERFORM agog_nats.log_event(t.workflow_id, t.id, t.stage, 'task_retry',
                                    jsonb_build_object('attempt', t.attempt, 'reason', why,
                                                       'backoff_ms', (extract(epoch FROM backoff) * 1000)::bigint));
        RETURN 'retried';
    END IF;

    UPDATE agog_nats.tasks
       SET state = 'failed', last_error = why, lease_until = NULL, completed_at = clock_timestamp()
     WHERE id = t.id;
    PERFORM agog_nats.log_event(t.workflow_id, t.id, t.stage, 'task_failed',
                                jsonb_build_object('attempt', t.attempt, 'reason', why));
    UPDATE agog_nats.workflows
       SET state = 'failed', finished_at = now(),
           reason = format('stage %s failed after %s attempts: %s', t.stage, t.attempt, why)
     WHERE id = t.workflow_id;
    PERFORM agog_nats.log_event(t.workflow_id, NULL, NULL, 'workflow_failed',
                                jsonb_build_object('stage', t.stage, 'reason', why));
    WITH c AS (
        UPDATE agog_nats.tasks
           SET state = 'cancelled', lease_until = NULL, last_error = 'workflow failed'
         WHERE workflow_id = t.workflow_id
           AND state IN ('waiting', 'ready', 'dispatched', 'running')
        RETURNING id, stage)
    INSERT INTO agog_nats.events (workflow_id, task_id, stage, kind, detail)
    SELECT t.workflow_id, c.id, c.stage, 'task_cancelled', '{"reason": "workflow failed"}' FROM c;
    RETURN 'failed';
END
$$;

-- Make every waiting task whose dependencies are all completed ready, and
-- complete the workflow when every task is.  The caller holds the
-- workflow's row lock.
CREATE FUNCTION agog_nats.advance_workflow(wf bigint) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $$
BEGIN
    WITH r AS (
        UPDATE agog_nats.tasks t
           SET state = 'ready', ready_at = clock_timestamp(), next_attempt_at = now()
         WHERE t.workflow_id = wf AND t.state = 'waiting'
           AND NOT EXISTS (SELECT 1 FROM unnest(t.depends_on) d
                            WHERE NOT EXISTS (SELECT 1 FROM agog_nats.tasks t2
                                               WHERE t2.workflow_id = wf AND t2.stage = d
                                                 AND t2.state = 'completed'))
        RETURNING t.id, t.stage)
    INSERT INTO agog_nats.events (workflow_id, task_id, stage, kind)
    SELECT wf, r.id, r.stage, 'task_ready' FROM r;

    IF NOT EXISTS (SELECT 1 FROM agog_nats.tasks WHERE workflow_id = wf AND state <> 'completed') THEN
        UPDATE agog_nats.workflows SET state = 'completed', finished_at = now()
         WHERE id = wf AND state = 'running';
        IF FOUND THEN
            PERFORM agog_nats.log_event(wf, NULL, NULL, 'workflow_completed');
        END IF;
    END IF;
END
$$;

-- Check a completion notice's fields and types; raise naming the field.
CREATE FUNCTION agog_nats.check_notice(n jsonb) RETURNS void
    LANGUAGE plpgsql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    f record;
BEGIN
    IF n IS NULL OR jsonb_typeof(n) <> 'object' THEN
        RAISE EXCEPTION 'completion notice must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR f IN SELECT * FROM (VALUES
            ('status', 'string'), ('agent', 'string'), ('task', 'string'),
            ('nats_channel', 'string'), ('summary', 'string'), ('complexity', 'string'),
            ('blockers', 'string'), ('ready_for_next_stage', 'boolean'),
            ('completion_time', 'string'), ('files_modified', 'number'),
            ('metadata', 'object')) v(name, type)
    LOOP
        IF NOT n ? f.name THEN
            RAISE EXCEPTION 'completion notice is missing "%"', f.name
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'A completion notice has status, agent, task, nats_channel, summary, complexity, blockers, ready_for_next_stage, completion_time, files_modified and metadata.';
        END IF;
        IF jsonb_typeof(n -> f.name) <> f.type THEN
            RAISE EXCEPTION 'completion notice field "%" must be a %', f.name,
                            CASE f.type WHEN 'string' THEN 'string' WHEN 'boolean' THEN 'boolean'
                                        WHEN 'number' THEN 'number' ELSE 'JSON object' END
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = format('It is %s.', jsonb_typeof(n -> f.name));
        END IF;
    END LOOP;
    IF n ->> 'status' NOT IN ('complete', 'failed', 'blocked') THEN
        RAISE EXCEPTION 'completion notice field "status" must be complete, failed or blocked'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('It is "%s".', n ->> 'status');
    END IF;
    IF (n ->> 'files_modified')::numeric < 0 OR (n ->> 'files_modified')::numeric % 1 <> 0 THEN
        RAISE EXCEPTION 'completion notice field "files_modified" must be a whole number of at least 0'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    BEGIN
        PERFORM (n ->> 'completion_time')::timestamptz;
    EXCEPTION WHEN others THEN
        RAISE EXCEPTION 'completion notice field "completion_time" must be an ISO 8601 time'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('It is "%s".', n ->> 'completion_time');
    END;
END
$$;

-- Apply a completion notice to a task.  strict (SQL callers): errors for a
-- task that is not running or whose lease was lost.  Not strict (NATS
-- agents, which do not claim): a dispatched task is accepted, and a notice
-- for an attempt already decided is a duplicate, applied once.
CREATE FUNCTION agog_nats.apply_notice(task_id bigint, n jsonb, source text, strict boolean)
    RETURNS text
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    t agog_nats.tasks;
    w agog_nats.workflows;
    channel text;
    parts text[];
    msg_id text;
    bytes bigint;
    older boolean;
    outcome text;
    r record;
BEGIN
    SELECT * INTO t FROM agog_nats.tasks WHERE id = task_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown task %', task_id USING ERRCODE = 'undefined_object';
    END IF;
    -- Lock order: the workflow, then its tasks.
    SELECT * INTO w FROM agog_nats.workflows WHERE id = t.workflow_id FOR UPDATE;
    SELECT * INTO t FROM agog_nats.tasks WHERE id = task_id FOR UPDATE;

    PERFORM agog_nats.check_notice(n);
    IF n ->> 'agent' <> t.agent THEN
        RAISE EXCEPTION 'completion notice is from agent "%", but task % belongs to agent "%"',
                        n ->> 'agent', task_id, t.agent USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF n ->> 'task' <> w.feature THEN
        RAISE EXCEPTION 'completion notice names task "%", but task % is for feature "%"',
                        n ->> 'task', task_id, w.feature USING ERRCODE = 'invalid_parameter_value';
    END IF;

    IF EXISTS (SELECT 1 FROM agog_nats.notices x WHERE x.task_id = t.id AND x.attempt = t.attempt)
       OR t.state NOT IN ('running', 'dispatched')
       OR (strict AND t.state <> 'running') THEN
        IF strict THEN
            RAISE EXCEPTION 'task % is not running', task_id
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      DETAIL = format('It is %s (attempt %s).', t.state, t.attempt),
                      HINT = 'Claim the task with agog_claim_task before completing it.';
        END IF;
        RETURN 'duplicate';
    END IF;
    IF strict AND t.lease_until < now() THEN
        RAISE EXCEPTION 'the lease on task % was lost', task_id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = format('It ran out at %s.', t.lease_until),
                  HINT = 'Heartbeat with agog_heartbeat_task more often than the lease runs out.';
    END IF;
    -- A runner whose lease was lost while another claim took the task
    -- names its own attempt in the notice's metadata (agog-agent does).
    IF strict AND jsonb_typeof(n -> 'metadata') = 'object' AND n -> 'metadata' ? 'attempt'
       AND (n -> 'metadata' ->> 'attempt') IS DISTINCT FROM t.attempt::text THEN
        RAISE EXCEPTION 'the lease on task % was lost', task_id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = format('The notice is of attempt %s; attempt %s holds the task now.',
                                  n -> 'metadata' ->> 'attempt', t.attempt);
    END IF;

    IF n ->> 'status' = 'complete' AND (n -> 'ready_for_next_stage')::boolean THEN
        -- The report the notice points at must exist: pending or published
        -- in the outbox, or in JetStream.
        channel := n ->> 'nats_channel';
        parts := regexp_match(channel,
            '^agog\.deliverables\.([A-Za-z0-9_-]{1,64})\.([A-Za-z0-9_-]{1,64})\.([A-Za-z0-9_-]{1,64})$');
        IF parts IS NULL THEN
            RAISE EXCEPTION 'completion notice field "nats_channel" is not a report subject'
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = format('It is "%s"; a report subject is agog.deliverables.<agent>.<taskType>.<feature>.', channel);
        END IF;
        -- The outbox's newest row, unless it was published before this
        -- attempt was dispatched: the agent may have sent its report
        -- straight to JetStream since, whose last message is then the one.
        SELECT CASE WHEN o.state = 'published' THEN o.stream || '.' || o.seq END, octet_length(o.body),
               o.state = 'published' AND o.created_at < t.dispatched_at
          INTO msg_id, bytes, older
          FROM agog_nats.outbox o
         WHERE o.subject = channel AND o.kind = 'report' AND o.state IN ('pending', 'published')
         ORDER BY o.id DESC LIMIT 1;
        IF NOT FOUND OR older THEN
            SELECT f.message_id, octet_length(f.content) INTO r
              FROM @extschema@.agog_fetch_report(parts[1], parts[2], parts[3]) f;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'completion notice names no report on "%"', channel
                    USING ERRCODE = 'undefined_object',
                          HINT = 'Publish the report (agog_publish_report) before, or in the same transaction as, the completion notice.';
            END IF;
            msg_id := r.message_id;
            bytes := r.octet_length;
        END IF;

        UPDATE agog_nats.tasks
           SET state = 'completed', completed_at = clock_timestamp(), lease_until = NULL,
               report_subject = channel, report_message_id = msg_id, report_bytes = bytes,
               last_error = NULL
         WHERE id = t.id;
        outcome := 'advanced';
        INSERT INTO agog_nats.notices (task_id, attempt, source, notice, outcome)
        VALUES (t.id, t.attempt, source, n, outcome);
        PERFORM agog_nats.log_event(t.workflow_id, t.id, t.stage, 'task_completed',
                                    jsonb_build_object('attempt', t.attempt, 'source', source,
                                                       'report', channel, 'summary', n ->> 'summary'));
        IF w.state = 'running' THEN
            PERFORM agog_nats.advance_workflow(t.workflow_id);
        END IF;
        RETURN outcome;
    END IF;

    -- Not complete, or not ready for the next stage: retry or fail.
    t.state := 'running';
    outcome := agog_nats.retry_or_fail(t, format('%s: %s', n ->> 'status', n ->> 'blockers'));
    INSERT INTO agog_nats.notices (task_id, attempt, source, notice, outcome)
    VALUES (t.id, t.attempt, source, n, outcome);
    RETURN outcome;
END
$$;

-- The outbox row of a tiny task notice, with the same message id scheme as
-- agog_publish_report.
CREATE FUNCTION agog_nats.enqueue_task_notice(t agog_nats.tasks, feature text, body jsonb)
    RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    oid_ bigint := nextval('agog_nats.outbox_id_seq');
BEGIN
    INSERT INTO agog_nats.outbox (id, msg_id, kind, agent, task_type, feature, subject,
                                  target_stream, body)
    VALUES (oid_,
            format('agog-%s-%s-%s-%s', (SELECT system_identifier FROM pg_control_system()),
                   (SELECT oid FROM pg_database WHERE datname = current_database()), oid_,
                   left(replace(gen_random_uuid()::text, '-', ''), 16)),
            'task', t.agent, t.task_type, feature,
            'agog.tasks.' || t.agent || '.' || feature, 'agog_tasks', body::text);
END
$$;

-- The worker's step: time out overdue tasks, dispatch ready ones, purge by
-- retention.  Returns the milliseconds until the next deadline, or NULL.
-- Runs in its own transaction; every transition is a row change in it.
CREATE FUNCTION agog_nats.orchestrate(batch_size integer DEFAULT 500) RETURNS bigint
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    c record;
    t agog_nats.tasks;
    w agog_nats.workflows;
    v_notice jsonb;
    v_deadline timestamptz;
    next_ms bigint;
BEGIN
    -- Overdue: the deadline passed, or a claimed task's lease ran out.
    FOR c IN SELECT id, workflow_id FROM agog_nats.tasks
              WHERE state IN ('dispatched', 'running')
                AND (deadline < now() OR (state = 'running' AND lease_until < now()))
              ORDER BY id LIMIT batch_size
    LOOP
        -- A workflow another session holds, or any of its tasks (a claim in
        -- a transaction still open), is skipped until a later step: waiting
        -- for it would stop the worker, and its outbox, for as long as that
        -- session likes.  A failure cancels the other tasks: all are taken.
        CONTINUE WHEN NOT agog_nats.try_lock_workflow(c.workflow_id);
        SELECT * INTO t FROM agog_nats.tasks WHERE id = c.id;
        CONTINUE WHEN t.state NOT IN ('dispatched', 'running')
                   OR NOT (t.deadline < now() OR (t.state = 'running' AND t.lease_until < now()));
        PERFORM agog_nats.retry_or_fail(t, CASE WHEN t.deadline < now() THEN 'deadline passed'
                                                ELSE 'lease lost' END);
    END LOOP;

    -- Reports completed while still in the outbox get their message id once
    -- the worker has published them, so the notices below can name it.  One
    -- index probe on (subject, id) per task, newest tasks first.
    FOR c IN SELECT tk.id, tk.report_subject FROM agog_nats.tasks tk
              WHERE tk.state = 'completed' AND tk.report_message_id IS NULL
                AND tk.report_subject IS NOT NULL
              ORDER BY tk.id DESC LIMIT batch_size
    LOOP
        UPDATE agog_nats.tasks tk
           SET report_message_id = o.stream || '.' || o.seq
          FROM (SELECT ob.stream, ob.seq, ob.state FROM agog_nats.outbox ob
                 WHERE ob.subject = c.report_subject AND ob.kind = 'report'
                 ORDER BY ob.id DESC LIMIT 1) o
         WHERE tk.id = c.id AND o.state = 'published';
    END LOOP;

    -- Ready: dispatch a tiny notice naming the reports of every stage
    -- upstream, through the outbox, and NOTIFY the agent's channel.
    FOR c IN SELECT t2.id, t2.workflow_id FROM agog_nats.tasks t2
               JOIN agog_nats.workflows w2 ON w2.id = t2.workflow_id
              WHERE t2.state = 'ready' AND t2.next_attempt_at <= now() AND w2.state = 'running'
              ORDER BY t2.next_attempt_at, t2.id LIMIT batch_size
    LOOP
        SELECT * INTO w FROM agog_nats.workflows WHERE id = c.workflow_id FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND OR w.state <> 'running';
        SELECT * INTO t FROM agog_nats.tasks WHERE id = c.id FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND OR t.state <> 'ready';

        v_deadline := now() + t.timeout;
        v_notice := jsonb_build_object(
            'workflow', t.workflow_id, 'task', t.id, 'stage', t.stage,
            'agent', t.agent, 'taskType', t.task_type, 'feature', w.feature,
            'attempt', t.attempt + 1,
            'deadline', to_char(v_deadline AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
            'inputs', coalesce((
                WITH RECURSIVE up(stage) AS (
                    SELECT unnest(t.depends_on)
                    UNION
                    SELECT unnest(u.depends_on) FROM agog_nats.tasks u
                      JOIN up ON u.workflow_id = t.workflow_id AND u.stage = up.stage)
                SELECT jsonb_agg(jsonb_build_object('stage', u.stage, 'agent', u.agent,
                                                    'subject', u.report_subject,
                                                    'message_id', u.report_message_id)
                                 ORDER BY u.position, u.stage)
                  FROM agog_nats.tasks u JOIN up ON u.stage = up.stage
                 WHERE u.workflow_id = t.workflow_id), '[]'::jsonb),
            'report_subject', 'agog.deliverables.' || t.agent || '.' || t.task_type || '.' || w.feature,
            'notice_subject', 'agog.notices.' || t.agent || '.' || w.feature);

        UPDATE agog_nats.tasks
           SET state = 'dispatched', attempt = attempt + 1, dispatched_at = clock_timestamp(),
               deadline = v_deadline, notice = v_notice, notice_bytes = octet_length(v_notice::text),
               claimed_at = NULL, claimed_by = NULL, lease_until = NULL
         WHERE id = t.id
        RETURNING * INTO t;
        PERFORM agog_nats.enqueue_task_notice(t, w.feature, v_notice);
        -- A channel name holds 63 bytes: agents with longer names are polled.
        IF octet_length(t.agent) <= 53 THEN
            PERFORM pg_notify('agog_task_' || t.agent, t.id::text);
        END IF;
        PERFORM agog_nats.log_event(t.workflow_id, t.id, t.stage, 'task_dispatched',
                                    jsonb_build_object('attempt', t.attempt, 'notice_bytes', t.notice_bytes));
    END LOOP;

    -- Retention.
    DELETE FROM agog_nats.events
     WHERE id = ANY (ARRAY(SELECT id FROM agog_nats.events
                            WHERE at < now() - current_setting('agog_nats.event_retention')::interval
                            LIMIT 10000));
    -- Locked as they are chosen, with their tasks, skipping any of which
    -- another session holds a row: a workflow that agog_retry_workflow is
    -- running again was deleted once its transaction committed (the DELETE
    -- does not check the state again), and the DELETE's cascade waited for
    -- a task someone held.
    DELETE FROM agog_nats.workflows
     WHERE id = ANY (ARRAY(SELECT id FROM agog_nats.workflows
                            WHERE state <> 'running'
                              AND finished_at < now() - current_setting('agog_nats.workflow_retention')::interval
                            LIMIT 1000 FOR UPDATE SKIP LOCKED))
       AND agog_nats.try_lock_workflow(id);

    SELECT (extract(epoch FROM min(x) - now()) * 1000)::bigint INTO next_ms
      FROM (SELECT min(next_attempt_at) AS x FROM agog_nats.tasks WHERE state = 'ready'
            UNION ALL
            SELECT min(least(deadline, lease_until)) FROM agog_nats.tasks
             WHERE state IN ('dispatched', 'running')) m;
    -- NULL when nothing is scheduled: the worker then sleeps until its poll.
    -- (greatest() skips a NULL: greatest(NULL, 0) would say "due now".)
    RETURN CASE WHEN next_ms IS NULL THEN NULL ELSE greatest(next_ms, 0) END;
END
$$;
REVOKE ALL ON FUNCTION agog_nats.check_pipeline(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION agog_nats.retry_or_fail(agog_nats.tasks, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION agog_nats.try_lock_workflow(bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION agog_nats.advance_workflow(bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION agog_nats.apply_notice(bigint, jsonb, text, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION agog_nats.enqueue_task_notice(agog_nats.tasks, text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION agog_nats.orchestrate(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION agog_nats.log_event(bigint, bigint, text, text, jsonb) FROM PUBLIC;

-- ---------------------------------------------------------------------------
-- API.  SECURITY DEFINER with search_path pinned: the roles get EXECUTE on
-- these functions and nothing on the tables they change, so every change
-- goes through their checks.
-- ---------------------------------------------------------------------------

CREATE FUNCTION @extschema@.agog_define_pipeline(pipeline text, stages jsonb,
                                                 description text DEFAULT '')
    RETURNS integer
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    s jsonb;
    n integer := 0;
    stage_timeout interval;
    stage_backoff interval;
BEGIN
    PERFORM agog_nats.check_token('pipeline', pipeline);
    IF stages IS NULL OR jsonb_typeof(stages) <> 'array' OR jsonb_array_length(stages) = 0 THEN
        RAISE EXCEPTION 'stages must be a non-empty JSON array of stage objects'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO agog_nats.pipelines AS p (pipeline, description) VALUES (pipeline, coalesce(description, ''))
    ON CONFLICT ON CONSTRAINT pipelines_pkey
        DO UPDATE SET description = EXCLUDED.description, customized = p.customized OR p.builtin;
    DELETE FROM agog_nats.stages st WHERE st.pipeline = agog_define_pipeline.pipeline;
    FOR s IN SELECT * FROM jsonb_array_elements(stages) LOOP
        n := n + 1;
        IF jsonb_typeof(s) <> 'object' OR NOT s ? 'stage' OR NOT s ? 'agent' THEN
            RAISE EXCEPTION 'stage % must be an object with at least "stage" and "agent"', n
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        PERFORM agog_nats.check_token('stage', s ->> 'stage');
        PERFORM agog_nats.check_token('agent', s ->> 'agent');
        IF NOT EXISTS (SELECT 1 FROM agog_nats.agents a WHERE a.agent = s ->> 'agent') THEN
            RAISE EXCEPTION 'stage "%" names unknown agent "%"', s ->> 'stage', s ->> 'agent'
                USING ERRCODE = 'undefined_object',
                      HINT = 'The agents are the rows of agog_nats.agents.';
        END IF;
        stage_timeout := coalesce((s ->> 'timeout')::interval, '30 minutes');
        IF stage_timeout <= interval '0' OR stage_timeout > interval '30 days' THEN
            RAISE EXCEPTION 'stage "%" has a timeout of %, out of range', s ->> 'stage', stage_timeout
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = 'A stage''s timeout is more than 0 and at most 30 days.';
        END IF;
        stage_backoff := coalesce((s ->> 'retry_backoff')::interval, '10 seconds');
        IF stage_backoff < interval '0' OR stage_backoff > interval '1 day' THEN
            RAISE EXCEPTION 'stage "%" has a retry_backoff of %, out of range', s ->> 'stage', stage_backoff
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = 'A stage''s retry_backoff is from 0 to 1 day.';
        END IF;
        INSERT INTO agog_nats.stages (pipeline, stage, agent, task_type, depends_on, timeout,
                                      max_attempts, retry_backoff, position)
        VALUES (pipeline, s ->> 'stage', s ->> 'agent',
                coalesce(s ->> 'task_type',
                         (SELECT a.task_type FROM agog_nats.agents a WHERE a.agent = s ->> 'agent')),
                coalesce(ARRAY(SELECT jsonb_array_elements_text(s -> 'depends_on')), '{}'),
                stage_timeout,
                coalesce((s ->> 'max_attempts')::integer, 3),
                stage_backoff,
                n);
    END LOOP;
    PERFORM agog_nats.check_pipeline(pipeline);
    RETURN n;
END
$$;
COMMENT ON FUNCTION @extschema@.agog_define_pipeline(text, jsonb, text) IS
    'Define or replace a pipeline from a JSON array of stages {stage, agent, task_type, depends_on, timeout, max_attempts, retry_backoff}';

CREATE FUNCTION @extschema@.agog_start_workflow(feature text, pipeline text DEFAULT 'feature',
                                                metadata jsonb DEFAULT '{}')
    RETURNS bigint
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    wf bigint;
BEGIN
    PERFORM agog_nats.check_token('feature', feature);
    PERFORM agog_nats.check_token('pipeline', pipeline);
    -- the worker runs the workflows of agog_nats.database only (when it
    -- names no database, the worker cannot start and says so in the log)
    IF current_database() <> current_setting('agog_nats.database')
       AND EXISTS (SELECT 1 FROM pg_catalog.pg_database d
                    WHERE d.datname = current_setting('agog_nats.database')) THEN
        RAISE EXCEPTION 'workflows can run only in database "%"', current_setting('agog_nats.database')
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = format('The agog_nats worker runs the workflows of agog_nats.database only; a workflow started in database "%s" would never be dispatched.', current_database()),
                  HINT = format('Connect to database "%s".', current_setting('agog_nats.database'));
    END IF;
    IF NOT EXISTS (SELECT 1 FROM agog_nats.pipelines p WHERE p.pipeline = agog_start_workflow.pipeline) THEN
        RAISE EXCEPTION 'unknown pipeline "%"', pipeline
            USING ERRCODE = 'undefined_object',
                  HINT = 'The pipelines are the rows of agog_nats.pipelines; define one with agog_define_pipeline.';
    END IF;
    IF metadata IS NULL OR jsonb_typeof(metadata) <> 'object' THEN
        RAISE EXCEPTION 'metadata must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO agog_nats.workflows (pipeline, feature, metadata)
    VALUES (pipeline, feature, metadata) RETURNING id INTO wf;
    INSERT INTO agog_nats.tasks (workflow_id, stage, agent, task_type, depends_on, position, timeout,
                                 max_attempts, retry_backoff, state, ready_at, next_attempt_at)
    SELECT wf, s.stage, s.agent, s.task_type, s.depends_on, s.position, s.timeout,
           s.max_attempts, s.retry_backoff,
           CASE WHEN cardinality(s.depends_on) = 0 THEN 'ready' ELSE 'waiting' END,
           CASE WHEN cardinality(s.depends_on) = 0 THEN now() END,
           CASE WHEN cardinality(s.depends_on) = 0 THEN now() END
      FROM agog_nats.stages s WHERE s.pipeline = agog_start_workflow.pipeline;
    PERFORM agog_nats.log_event(wf, NULL, NULL, 'workflow_started',
                                jsonb_build_object('pipeline', pipeline, 'feature', feature));
    RETURN wf;
END
$$;
COMMENT ON FUNCTION @extschema@.agog_start_workflow(text, text, jsonb) IS
    'Start a workflow of a pipeline for a feature; the worker dispatches its stages. Returns the workflow id';

-- A lease given to agog_claim_task or agog_heartbeat_task: the range of
-- agog_nats.task_lease.  A negative or zero one was taken, and started a
-- claim already lost.
CREATE FUNCTION agog_nats.check_lease(lease interval) RETURNS void
    LANGUAGE plpgsql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
BEGIN
    IF lease < interval '1 second' OR lease > interval '24 hours' THEN
        RAISE EXCEPTION 'lease % is out of range', lease
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'A lease is from 1 second to 24 hours, as agog_nats.task_lease.';
    END IF;
END
$$;
REVOKE ALL ON FUNCTION agog_nats.check_lease(interval) FROM PUBLIC;

CREATE FUNCTION @extschema@.agog_claim_task(agent text, worker text DEFAULT NULL,
                                            lease interval DEFAULT NULL)
    RETURNS TABLE (task_id bigint, workflow_id bigint, stage text, feature text, attempt integer,
                   notice jsonb, lease_until timestamptz, deadline timestamptz)
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    t agog_nats.tasks;
BEGIN
    PERFORM agog_nats.check_token('agent', agent);
    PERFORM agog_nats.check_lease(lease);
    IF NOT EXISTS (SELECT 1 FROM agog_nats.agents a WHERE a.agent = agog_claim_task.agent) THEN
        RAISE EXCEPTION 'unknown agent "%"', agent USING ERRCODE = 'undefined_object',
            HINT = 'The agents are the rows of agog_nats.agents.';
    END IF;
    -- Not one already past its deadline (the worker has yet to time it
    -- out): its lease would run out before the runner began.
    SELECT * INTO t FROM agog_nats.tasks x
     WHERE x.agent = agog_claim_task.agent AND x.state = 'dispatched'
       AND (x.deadline IS NULL OR x.deadline > clock_timestamp())
     ORDER BY x.id LIMIT 1 FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    UPDATE agog_nats.tasks x
       SET state = 'running', claimed_at = clock_timestamp(),
           claimed_by = coalesce(worker, session_user || '@' || pg_backend_pid()),
           lease_until = least(x.deadline,
                               now() + coalesce(lease, current_setting('agog_nats.task_lease')::interval))
     WHERE x.id = t.id
    RETURNING * INTO t;
    PERFORM agog_nats.log_event(t.workflow_id, t.id, t.stage, 'task_claimed',
                                jsonb_build_object('attempt', t.attempt, 'by', t.claimed_by));
    RETURN QUERY SELECT t.id, t.workflow_id, t.stage, t.notice ->> 'feature', t.attempt, t.notice,
                        t.lease_until, t.deadline;
END
$$;
COMMENT ON FUNCTION @extschema@.agog_claim_task(text, text, interval) IS
    'Hand the next dispatched task of an agent to exactly one caller, with a lease';

CREATE FUNCTION @extschema@.agog_heartbeat_task(task_id bigint, lease interval DEFAULT NULL,
                                                attempt integer DEFAULT NULL)
    RETURNS timestamptz
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    t agog_nats.tasks;
BEGIN
    PERFORM agog_nats.check_lease(lease);
    SELECT * INTO t FROM agog_nats.tasks x WHERE x.id = task_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown task %', task_id USING ERRCODE = 'undefined_object';
    END IF;
    IF t.state <> 'running' THEN
        RAISE EXCEPTION 'task % is not running', task_id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = format('It is %s (attempt %s).', t.state, t.attempt);
    END IF;
    IF t.lease_until < now() THEN
        RAISE EXCEPTION 'the lease on task % was lost', task_id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = format('It ran out at %s.', t.lease_until);
    END IF;
    -- a runner whose lease ran out while another claim took the task
    IF agog_heartbeat_task.attempt IS DISTINCT FROM NULL
       AND agog_heartbeat_task.attempt <> t.attempt THEN
        RAISE EXCEPTION 'the lease on task % was lost', task_id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = format('The heartbeat is of attempt %s; attempt %s holds the task now.',
                                  agog_heartbeat_task.attempt, t.attempt);
    END IF;
    UPDATE agog_nats.tasks x
       SET lease_until = least(x.deadline,
                               now() + coalesce(lease, current_setting('agog_nats.task_lease')::interval))
     WHERE x.id = task_id
    RETURNING x.lease_until INTO t.lease_until;
    RETURN t.lease_until;
END
$$;
COMMENT ON FUNCTION @extschema@.agog_heartbeat_task(bigint, interval, integer) IS
    'Extend the lease of a running task (never past its deadline); returns the new lease end';

CREATE FUNCTION @extschema@.agog_complete_task(task_id bigint, notice jsonb)
    RETURNS text
    LANGUAGE sql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    RETURN agog_nats.apply_notice(task_id, notice, 'sql', true);
COMMENT ON FUNCTION @extschema@.agog_complete_task(bigint, jsonb) IS
    'Record the seed''s completion notice for a running task: advanced, retried or failed';

CREATE FUNCTION @extschema@.agog_cancel_workflow(workflow_id bigint, reason text DEFAULT 'cancelled')
    RETURNS void
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    w agog_nats.workflows;
BEGIN
    SELECT * INTO w FROM agog_nats.workflows x WHERE x.id = workflow_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown workflow %', workflow_id USING ERRCODE = 'undefined_object';
    END IF;
    IF w.state <> 'running' THEN
        RAISE EXCEPTION 'workflow % is not running', workflow_id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = format('It is %s.', w.state);
    END IF;
    UPDATE agog_nats.workflows x SET state = 'cancelled', finished_at = now(), reason = agog_cancel_workflow.reason
     WHERE x.id = workflow_id;
    PERFORM agog_nats.log_event(workflow_id, NULL, NULL, 'workflow_cancelled',
                                jsonb_build_object('reason', reason));
    WITH c AS (
        UPDATE agog_nats.tasks x SET state = 'cancelled', lease_until = NULL, last_error = 'workflow cancelled'
         WHERE x.workflow_id = agog_cancel_workflow.workflow_id
           AND x.state IN ('waiting', 'ready', 'dispatched', 'running')
        RETURNING x.id, x.stage)
    INSERT INTO agog_nats.events (workflow_id, task_id, stage, kind, detail)
    SELECT agog_cancel_workflow.workflow_id, c.id, c.stage, 'task_cancelled',
           jsonb_build_object('reason', 'workflow cancelled') FROM c;
END
$$;
COMMENT ON FUNCTION @extschema@.agog_cancel_workflow(bigint, text) IS
    'Cancel a running workflow and its open tasks';

CREATE FUNCTION @extschema@.agog_retry_workflow(workflow_id bigint)
    RETURNS void
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    w agog_nats.workflows;
BEGIN
    SELECT * INTO w FROM agog_nats.workflows x WHERE x.id = workflow_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown workflow %', workflow_id USING ERRCODE = 'undefined_object';
    END IF;
    IF w.state NOT IN ('failed', 'cancelled') THEN
        RAISE EXCEPTION 'workflow % cannot be retried', workflow_id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = format('It is %s; only failed or cancelled workflows are retried.', w.state);
    END IF;
    -- Attempts keep counting (notices are recorded per attempt); each
    -- retried task gets its budget of attempts again, counted from here.
    UPDATE agog_nats.tasks x
       SET state = 'waiting', attempt_base = x.attempt, last_error = NULL, deadline = NULL,
           lease_until = NULL, claimed_at = NULL, claimed_by = NULL, next_attempt_at = NULL
     WHERE x.workflow_id = agog_retry_workflow.workflow_id AND x.state IN ('failed', 'cancelled');
    UPDATE agog_nats.workflows x SET state = 'running', finished_at = NULL, reason = NULL
     WHERE x.id = workflow_id;
    PERFORM agog_nats.log_event(workflow_id, NULL, NULL, 'workflow_retried');
    PERFORM agog_nats.advance_workflow(workflow_id);
END
$$;
COMMENT ON FUNCTION @extschema@.agog_retry_workflow(bigint) IS
    'Run a failed or cancelled workflow again from its unfinished stages';

-- ---------------------------------------------------------------------------
-- Reporting views
-- ---------------------------------------------------------------------------
CREATE VIEW agog_nats.workflow_progress AS
SELECT w.id AS workflow_id, w.pipeline, w.feature, w.state,
       (SELECT t.stage FROM agog_nats.tasks t
         WHERE t.workflow_id = w.id AND t.state = 'completed'
         ORDER BY t.position DESC, t.completed_at DESC LIMIT 1) AS stage_reached,
       (SELECT count(*) FROM agog_nats.tasks t WHERE t.workflow_id = w.id AND t.state = 'completed') AS done,
       (SELECT count(*) FROM agog_nats.tasks t WHERE t.workflow_id = w.id) AS total,
       ARRAY(SELECT t.agent FROM agog_nats.tasks t
              WHERE t.workflow_id = w.id AND t.state IN ('ready', 'dispatched', 'running')
              ORDER BY t.position) AS current_agents,
       coalesce(w.finished_at, now()) - w.created_at AS elapsed,
       w.created_at, w.finished_at, w.reason
  FROM agog_nats.workflows w;
COMMENT ON VIEW agog_nats.workflow_progress IS
    'Per workflow: stage reached, done of total, current agents, elapsed';

CREATE VIEW agog_nats.task_timeline AS
SELECT t.workflow_id, t.id AS task_id, t.stage, t.agent, t.state AS outcome, t.attempt AS attempts,
       t.ready_at, t.dispatched_at, t.claimed_at, t.completed_at,
       t.claimed_at - t.dispatched_at AS wait,
       t.completed_at - coalesce(t.claimed_at, t.dispatched_at) AS run,
       t.notice_bytes, t.report_subject, t.report_message_id, t.report_bytes, t.last_error
  FROM agog_nats.tasks t;
COMMENT ON VIEW agog_nats.task_timeline IS
    'Per task: wait (dispatch to claim), run (claim to completion), attempts, outcome';

CREATE VIEW agog_nats.agent_performance AS
SELECT t.agent,
       count(*) FILTER (WHERE t.state IN ('completed', 'failed')) AS tasks,
       count(*) FILTER (WHERE t.state = 'completed') AS completed,
       (SELECT count(*) FROM agog_nats.events e JOIN agog_nats.tasks t2 ON t2.id = e.task_id
         WHERE t2.agent = t.agent AND e.kind IN ('task_retry', 'task_failed')) AS failures,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM t.completed_at - coalesce(t.claimed_at, t.dispatched_at)))
           FILTER (WHERE t.state = 'completed') AS p50_seconds,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM t.completed_at - coalesce(t.claimed_at, t.dispatched_at)))
           FILTER (WHERE t.state = 'completed') AS p95_seconds
  FROM agog_nats.tasks t
 GROUP BY t.agent;
COMMENT ON VIEW agog_nats.agent_performance IS
    'Per agent: tasks finished, completed, failed attempts, p50/p95 run time';

-- The seed's accounting: without NATS every stage receives the reports of
-- all stages upstream in its prompt; with NATS it receives the tiny notice.
-- Tokens are estimated as bytes / 4.
CREATE VIEW agog_nats.token_savings AS
WITH per_task AS (
    SELECT t.workflow_id, t.id,
           coalesce(t.notice_bytes, 0) AS notice_bytes,
           coalesce((WITH RECURSIVE up(stage) AS (
                         SELECT unnest(t.depends_on)
                         UNION
                         SELECT unnest(u.depends_on) FROM agog_nats.tasks u
                           JOIN up ON u.workflow_id = t.workflow_id AND u.stage = up.stage)
                     SELECT sum(u.report_bytes) FROM agog_nats.tasks u JOIN up ON u.stage = up.stage
                      WHERE u.workflow_id = t.workflow_id), 0) AS upstream_bytes
      FROM agog_nats.tasks t
     WHERE t.notice_bytes IS NOT NULL)
SELECT w.id AS workflow_id, w.feature, w.state,
       sum(p.upstream_bytes)::bigint / 4 AS tokens_without_nats,
       sum(p.notice_bytes)::bigint / 4 AS tokens_with_nats,
       (sum(p.upstream_bytes) - sum(p.notice_bytes))::bigint / 4 AS tokens_saved,
       round(100 * (1 - sum(p.notice_bytes) / nullif(sum(p.upstream_bytes), 0)), 1) AS saved_pct
  FROM agog_nats.workflows w JOIN per_task p ON p.workflow_id = w.id
 GROUP BY w.id, w.feature, w.state;
COMMENT ON VIEW agog_nats.token_savings IS
    'Per workflow: tokens the agents would have received with every upstream report in their prompts, against the notices sent (bytes / 4)';

-- ---------------------------------------------------------------------------
-- Privileges
-- ---------------------------------------------------------------------------
REVOKE ALL ON FUNCTION agog_nats.check_token(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION agog_nats.check_notice(jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION agog_nats.stages_check() FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.agog_define_pipeline(text, jsonb, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.agog_start_workflow(text, text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.agog_claim_task(text, text, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.agog_heartbeat_task(bigint, interval, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.agog_complete_task(bigint, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.agog_cancel_workflow(bigint, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.agog_retry_workflow(bigint) FROM PUBLIC;

GRANT SELECT ON agog_nats.pipelines, agog_nats.stages, agog_nats.workflows, agog_nats.tasks,
                agog_nats.notices, agog_nats.bad_notices, agog_nats.events,
                agog_nats.workflow_progress, agog_nats.task_timeline,
                agog_nats.agent_performance, agog_nats.token_savings
   TO agog_nats_reader;
GRANT EXECUTE ON FUNCTION @extschema@.agog_claim_task(text, text, interval) TO agog_nats_writer;
GRANT EXECUTE ON FUNCTION @extschema@.agog_heartbeat_task(bigint, interval, integer) TO agog_nats_writer;
GRANT EXECUTE ON FUNCTION @extschema@.agog_complete_task(bigint, jsonb) TO agog_nats_writer;
GRANT EXECUTE ON FUNCTION @extschema@.agog_define_pipeline(text, jsonb, text) TO agog_nats_admin;
GRANT EXECUTE ON FUNCTION @extschema@.agog_start_workflow(text, text, jsonb) TO agog_nats_admin;
GRANT EXECUTE ON FUNCTION @extschema@.agog_cancel_workflow(bigint, text) TO agog_nats_admin;
GRANT EXECUTE ON FUNCTION @extschema@.agog_retry_workflow(bigint) TO agog_nats_admin;

-- ---------------------------------------------------------------------------
-- Completion notices from agents that speak only NATS
-- ---------------------------------------------------------------------------

-- Apply a notice the worker consumed from agog.notices.<agent>.<feature>.
-- The task is metadata.task_id when given, else the open task of that agent
-- for that feature (the newest running workflow).  A notice already applied
-- (the same JSON, or metadata.attempt naming an attempt already decided) is
-- a duplicate.  A notice that cannot be applied because of what it says
-- (not JSON, a missing or mistyped field, no such task) is kept in
-- agog_nats.bad_notices with its error and not retried.  Any other failure
-- (a system fault) is raised, so the notice is not acknowledged and comes
-- again -- unless this is its max_tries-th try, when it is kept as bad too
-- rather than retried forever (tries: the failed ones so far and this one;
-- the worker counts them, so the times it was put back as busy are not).
-- A notice whose workflow, or any of its tasks, another session has locked
-- is not waited for: busy.
-- Returns the outcome: advanced, retried, failed, duplicate, bad or busy.
CREATE FUNCTION agog_nats.apply_nats_notice(subject text, body text,
                                            tries integer DEFAULT 1,
                                            max_tries integer DEFAULT 5)
    RETURNS text
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    parts text[];
    n jsonb;
    task bigint;
    t agog_nats.tasks;
BEGIN
    BEGIN
        parts := regexp_match(subject, '^agog\.notices\.([A-Za-z0-9_-]{1,64})\.([A-Za-z0-9_-]{1,64})$');
        IF parts IS NULL THEN
            RAISE EXCEPTION 'subject "%" is not agog.notices.<agent>.<feature>', subject
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        n := body::jsonb;
        PERFORM agog_nats.check_notice(n);
        IF n -> 'metadata' ? 'task_id' THEN
            task := (n -> 'metadata' ->> 'task_id')::bigint;
        ELSE
            -- The open task of that agent for that feature; else its latest
            -- task, for which a notice sent again is a duplicate.
            SELECT x.id INTO task
              FROM agog_nats.tasks x JOIN agog_nats.workflows w ON w.id = x.workflow_id
             WHERE x.agent = parts[1] AND w.feature = parts[2]
             ORDER BY (w.state = 'running' AND x.state IN ('dispatched', 'running')) DESC,
                      w.id DESC, x.id DESC
             LIMIT 1;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'no task of agent "%" for feature "%"', parts[1], parts[2]
                    USING ERRCODE = 'undefined_object';
            END IF;
        END IF;
        IF n ->> 'agent' IS DISTINCT FROM parts[1] THEN
            RAISE EXCEPTION 'completion notice on % is from agent "%"', subject, n ->> 'agent'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;

        SELECT * INTO t FROM agog_nats.tasks WHERE id = task;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'completion notice names task %, which does not exist', task
                USING ERRCODE = 'undefined_object';
        END IF;
        -- The same notice again (redelivered, or sent twice): applied once.
        -- Without a task id it may come after its stage completed, when the
        -- agent's open task is the next stage: look at all of the agent's
        -- tasks for the feature.
        IF EXISTS (SELECT 1 FROM agog_nats.notices x WHERE x.task_id = task AND x.notice = n)
           OR (NOT n -> 'metadata' ? 'task_id'
               AND EXISTS (SELECT 1 FROM agog_nats.notices x
                             JOIN agog_nats.tasks y ON y.id = x.task_id
                             JOIN agog_nats.workflows w ON w.id = y.workflow_id
                            WHERE y.agent = parts[1] AND w.feature = parts[2] AND x.notice = n))
           OR (n -> 'metadata' ? 'attempt'
               AND (n -> 'metadata' ->> 'attempt')::integer IS DISTINCT FROM t.attempt) THEN
            RETURN 'duplicate';
        END IF;
        -- A workflow or any of its tasks another session holds (an open
        -- transaction): busy, put back to come again, rather than holding
        -- up the worker.
        IF NOT agog_nats.try_lock_workflow(t.workflow_id) THEN
            RETURN 'busy';
        END IF;
        RETURN agog_nats.apply_notice(task, n, 'nats', false);
    EXCEPTION
        WHEN data_exception OR undefined_object THEN
            INSERT INTO agog_nats.bad_notices (subject, body, error)
            VALUES (subject, body, SQLSTATE || ': ' || SQLERRM);
            RETURN 'bad';
        WHEN OTHERS THEN
            IF tries < max_tries THEN
                RAISE;
            END IF;
            INSERT INTO agog_nats.bad_notices (subject, body, error)
            VALUES (subject, body,
                    format('%s: %s (after %s tries)', SQLSTATE, SQLERRM, tries));
            RETURN 'bad';
    END;
END
$$;
REVOKE ALL ON FUNCTION agog_nats.apply_nats_notice(text, text, integer, integer) FROM PUBLIC;

-- ---------------------------------------------------------------------------
-- Outbox tuning (measured in docs/benchmarks.md).
-- ---------------------------------------------------------------------------

-- The worker's session lasts for days: a generic plan of the claim made
-- while the outbox was small (a sequential scan of it) would be kept while
-- the table grows, and each claim would read all of it.  And a bitmap scan
-- of outbox_pending, which the planner picks from its estimate of a few
-- pending rows, reads every pending row past after_id to sort them for the
-- LIMIT: quadratic in a backlog.  An index scan in id order stops after
-- batch_size rows.  That plan is made once (a generic plan) with the
-- sequential and bitmap scans turned off, so that it is the index scan
-- whatever the statistics say when it is made: planning every call for its
-- arguments was the largest share of the worker's CPU when reports trickle
-- in a few per claim.
ALTER FUNCTION agog_nats.claim_outbox(integer, integer, bigint)
    SET plan_cache_mode = force_generic_plan
    SET enable_seqscan = off
    SET enable_bitmapscan = off;

-- Report bodies are compressed with lz4 where the server has it: several
-- times cheaper than pglz to compress (in the writer's transaction) and to
-- read back (in the worker's claim).
DO $$
BEGIN
    ALTER TABLE agog_nats.outbox ALTER COLUMN body SET COMPRESSION lz4;
EXCEPTION
    WHEN feature_not_supported THEN
        RAISE NOTICE 'this server has no lz4: the outbox keeps pglz';
END
$$;

-- Every report leaves two dead row versions (claim and record) with entries
-- in the outbox's indexes, and published rows are kept for a week: at the
-- default 20 % of the table, autovacuum would wait for a large share of a
-- big table to be dead while every claim walks the dead entries of
-- outbox_pending.  Vacuum after a thousand dead rows and 1 %.
ALTER TABLE agog_nats.outbox SET (autovacuum_vacuum_threshold = 1000,
                                  autovacuum_vacuum_scale_factor = 0.01);

-- The claim changes attempts, first_sent_at and next_attempt_at.  With no
-- index on next_attempt_at (the pending rows are few: outbox_pending finds
-- them, and the filter on next_attempt_at is cheap) and room on the page,
-- that update is HOT: no new entry in any of the outbox's indexes, and no
-- dead one for the claim to walk over later.  A claim takes 256 rows in a
-- row, so every row of a page gets its new version at once: the page must
-- keep room for as many versions as it has rows.  At fillfactor 80 (room
-- for a quarter) five claims in six were not HOT and a claim of 256 rows
-- took 9-11 ms; at 50 all are HOT and it takes 3 ms.  The row without its
-- body (stored apart, compressed) is about 260 bytes.
DROP INDEX agog_nats.outbox_pending_due;
ALTER TABLE agog_nats.outbox SET (fillfactor = 50);

-- The subject's CHECK, in C.  PostgreSQL reads a table's CHECK constraints
-- back from their stored text in every statement that writes a row to it
-- (at its first row), and evaluates them on every row it writes: the
-- worker's claim and record update every row they touch.  As an expression,
-- the subject's CHECK was 3.9 KB of stored node text (60 % of the outbox's
-- constraints) and built the subject anew on each row.  The function tests
-- the same shape with nothing built, and the tokens themselves too: 1 to 64
-- of [A-Za-z0-9_-], the rule agog_publish_report checks and the workflow
-- tables' CHECKs hold for task notices.  The
-- administrator's agog_retry_dead updates rows as the caller, so the
-- admin role may run it.
CREATE FUNCTION agog_nats.outbox_subject_ok(kind text, subject text, agent text,
                                            task_type text, feature text)
    RETURNS boolean
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE
    AS 'MODULE_PATHNAME', 'agog_outbox_subject_ok';
REVOKE ALL ON FUNCTION agog_nats.outbox_subject_ok(text, text, text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION agog_nats.outbox_subject_ok(text, text, text, text, text) TO agog_nats_admin;
ALTER TABLE agog_nats.outbox
    DROP CONSTRAINT outbox_check,
    ADD CONSTRAINT outbox_subject_check
        CHECK (agog_nats.outbox_subject_ok(kind, subject, agent, task_type, feature));

-- Every message id is agog-<system id>-<database oid>-<outbox id>-<16
-- random hex digits>, made by the extension's own code from the row's
-- primary key (agog_publish_report and enqueue_task_notice; no role may
-- insert into the outbox directly), so it is unique by construction.  Its
-- UNIQUE index cost every report an index entry at insert and another at
-- the worker's record (the record changes state, so it is not HOT), and no
-- query looks a row up by message id.
ALTER TABLE agog_nats.outbox DROP CONSTRAINT outbox_msg_id_key;

-- agog_fetch_report first looks for the subject's newest report not yet in
-- JetStream.  Through outbox_subject that walked every row the subject
-- kept (published rows stay for agog_nats.published_retention): 10 ms for
-- a subject with 5,000 published reports.  Pending reports only, by
-- subject: one probe.  Each report adds one entry at insert; the record
-- (which changes state) adds none, and the claim stays HOT.  The predicate
-- says "pending" as NOT IN ('published', 'dead') (the same, by the state
-- CHECK), and the look-up says it the same way: the look-up then cannot
-- use outbox_pending (state = 'pending', by id), which would walk every
-- pending row whenever its statistics say it is empty.  It names kind so
-- that the claim, which takes pending rows of any kind, cannot use this
-- index (and sort every pending row by id).
CREATE INDEX outbox_subject_pending ON agog_nats.outbox (subject, id)
    WHERE state NOT IN ('published', 'dead') AND kind = 'report';

-- ---------------------------------------------------------------------------
-- Built-in rows a user changes.  pg_dump left out the six built-in agents
-- and the built-in pipeline (CREATE EXTENSION makes them), so a change to
-- them was lost on restore: a raised stream limit came back as 10,000
-- messages, and the worker of the restored database would have shrunk the
-- stream to it (JetStream drops the rest); a redefined feature pipeline's
-- stages were dumped next to the built-in ones, which CREATE EXTENSION had
-- made again: a duplicate key failed the restore of every stage.  Now a
-- changed built-in row is marked customized and dumped, and its restore
-- (an insert of a built-in row whose key exists as a built-in row) puts the
-- change onto the row CREATE EXTENSION made.  A built-in agent keeps its
-- name and task type (the wire contract's subjects and streams), and no
-- row's builtin mark changes.
-- ---------------------------------------------------------------------------
ALTER TABLE agog_nats.agents ADD COLUMN customized boolean NOT NULL DEFAULT false;
ALTER TABLE agog_nats.pipelines ADD COLUMN customized boolean NOT NULL DEFAULT false;

-- The six built-in agents with the descriptions CREATE EXTENSION gives
-- them (agog_nats--0.1.0.sql); a later version that adds a built-in agent
-- adds it here.
CREATE FUNCTION agog_nats.builtin_agents()
    RETURNS TABLE (agent text, description text)
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
VALUES ('cynthia', 'Cynthia: research reports'),
       ('sylvia', 'Sylvia: critiques of the research'),
       ('roy', 'Roy: backend implementation reports'),
       ('jen', 'Jen: frontend implementation reports'),
       ('billy', 'Billy: QA reports'),
       ('priya', 'Priya: statistics reports')
$$;
REVOKE ALL ON FUNCTION agog_nats.builtin_agents() FROM PUBLIC;
-- agents_restore runs as the inserting role, which agog_nats_admin may be
GRANT EXECUTE ON FUNCTION agog_nats.builtin_agents() TO agog_nats_admin;

-- A built-in agent 0.2.0 let a user change is customized already: mark it
-- here (the trigger below marks later changes), or the next pg_dump leaves
-- the change out.  The pipelines are new in this version.
UPDATE agog_nats.agents a
   SET customized = true
  FROM agog_nats.builtin_agents() d
 WHERE a.builtin AND a.agent = d.agent
   AND (a.description, a.max_msgs, a.max_bytes, a.max_age, a.max_msg_size)
       IS DISTINCT FROM
       (d.description, 10000::bigint, 1073741824::bigint, '7 days'::interval, -1);

-- ---------------------------------------------------------------------------
-- The worker lowered a live stream's limits to the agents table's whenever
-- they differed, and JetStream then drops the oldest reports beyond them.
-- A restore without a single transaction (pg_restore's default, -j,
-- --clean) commits CREATE EXTENSION first, with the built-in agents at
-- 10,000 messages, and loads a customized agent's raised limits later: in
-- between, the worker of the database restored into shrank the stream the
-- source database had raised.  Now the worker only raises a live stream's
-- limits, and lowers them only for an agent whose limits a user's UPDATE
-- changed in this database: limits_changed_at, stamped by the guard below,
-- NULL on every insert (CREATE EXTENSION's, a user's, a restore's).  The
-- worker clears it once it has applied the limits, so an old stamp (a
-- physical backup, a template copy of the database) never lowers a stream
-- the table's later history raised.
-- ---------------------------------------------------------------------------
ALTER TABLE agog_nats.agents ADD COLUMN limits_changed_at timestamptz;
COMMENT ON COLUMN agog_nats.agents.limits_changed_at IS
    'When an UPDATE changed max_msgs, max_bytes or max_age and the worker has not applied it yet (NULL: as inserted, or applied); only then does the worker lower a live stream''s limits';

-- BEFORE UPDATE of an agent, as the updating role.
CREATE FUNCTION agog_nats.agents_guard() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $$
BEGIN
    IF NEW.builtin IS DISTINCT FROM OLD.builtin THEN
        RAISE EXCEPTION 'the builtin mark of agent "%" cannot be changed', OLD.agent
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'It says which rows CREATE EXTENSION made; pg_dump leaves those out unless they were changed.';
    END IF;
    IF OLD.builtin AND (NEW.agent, NEW.task_type) IS DISTINCT FROM (OLD.agent, OLD.task_type) THEN
        RAISE EXCEPTION 'built-in agent "%" keeps its name and task type', OLD.agent
            USING ERRCODE = 'feature_not_supported',
                  DETAIL = 'Its subjects and stream are the ones the seed''s agents use.',
                  HINT = 'Add an agent of your own to agog_nats.agents for another name or task type.';
    END IF;
    IF OLD.builtin AND NOT NEW.customized
       AND (NEW.description, NEW.max_msgs, NEW.max_bytes, NEW.max_age, NEW.max_msg_size)
           IS DISTINCT FROM
           (OLD.description, OLD.max_msgs, OLD.max_bytes, OLD.max_age, OLD.max_msg_size) THEN
        NEW.customized := true;
    END IF;
    -- an UPDATE that changes a limit, other than agents_restore's (which
    -- flags its own): the worker may now lower the live stream's limits
    IF coalesce(current_setting('agog_nats_restore.active', true), '') <> 'on'
       AND (NEW.max_msgs, NEW.max_bytes, NEW.max_age)
           IS DISTINCT FROM (OLD.max_msgs, OLD.max_bytes, OLD.max_age) THEN
        NEW.limits_changed_at := now();
    END IF;
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION agog_nats.agents_guard() FROM PUBLIC;
CREATE TRIGGER agents_guard BEFORE UPDATE ON agog_nats.agents
    FOR EACH ROW EXECUTE FUNCTION agog_nats.agents_guard();

-- BEFORE INSERT of an agent: a built-in row whose agent exists as a
-- built-in row is a restore of a customized one; apply it to that row.
-- A dump made with --disable-triggers (or a data-only restore with it)
-- bypasses this, and the six built-in rows then collide: restore without
-- that option.
CREATE FUNCTION agog_nats.agents_restore() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    found_row boolean;
BEGIN
    -- inserted limits never lower a live stream's (see limits_changed_at)
    NEW.limits_changed_at := NULL;
    IF NEW.builtin THEN
        PERFORM pg_catalog.set_config('agog_nats_restore.active', 'on', true);
        UPDATE agog_nats.agents a
           SET description = NEW.description, max_msgs = NEW.max_msgs,
               max_bytes = NEW.max_bytes, max_age = NEW.max_age,
               max_msg_size = NEW.max_msg_size, customized = NEW.customized,
               limits_changed_at = NULL
         WHERE a.agent = NEW.agent AND a.builtin;
        found_row := FOUND;
        PERFORM pg_catalog.set_config('agog_nats_restore.active', 'off', true);
        IF found_row THEN
            RETURN NULL;
        END IF;
        -- No such built-in row.  One of the six (deleted before the
        -- restore) stays built-in: CREATE EXTENSION makes it again on the
        -- next restore, where a user row of its name would collide.  Any
        -- other name is the user's, and pg_dump keeps it as such.
        IF NEW.agent NOT IN (SELECT b.agent FROM agog_nats.builtin_agents() b) THEN
            NEW.builtin := false;
            NEW.customized := false;
        ELSE
            NEW.customized := true;     -- pg_dump keeps it, with its values
        END IF;
    END IF;
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION agog_nats.agents_restore() FROM PUBLIC;
CREATE TRIGGER agents_restore BEFORE INSERT ON agog_nats.agents
    FOR EACH ROW EXECUTE FUNCTION agog_nats.agents_restore();

-- BEFORE INSERT of a pipeline: the same for a customized built-in
-- pipeline; its stages follow in the dump (all of them: see the stages'
-- dump condition below), so the built-in stages go.
CREATE FUNCTION agog_nats.pipelines_restore() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $$
BEGIN
    IF NEW.builtin THEN
        UPDATE agog_nats.pipelines p
           SET description = NEW.description, customized = NEW.customized
         WHERE p.pipeline = NEW.pipeline AND p.builtin;
        IF FOUND THEN
            DELETE FROM agog_nats.stages s WHERE s.pipeline = NEW.pipeline AND s.builtin;
            RETURN NULL;
        END IF;
    END IF;
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION agog_nats.pipelines_restore() FROM PUBLIC;
CREATE TRIGGER pipelines_restore BEFORE INSERT ON agog_nats.pipelines
    FOR EACH ROW EXECUTE FUNCTION agog_nats.pipelines_restore();

SELECT pg_catalog.pg_extension_config_dump('agog_nats.agents', 'WHERE NOT builtin OR customized');
SELECT pg_catalog.pg_extension_config_dump('agog_nats.pipelines', 'WHERE NOT builtin OR customized');
-- The stages of a customized built-in pipeline go with it, built-in or not:
-- its restore deletes the built-in stages CREATE EXTENSION made, so a
-- pipeline marked customized without new stages gets its own back.
SELECT pg_catalog.pg_extension_config_dump('agog_nats.stages',
    'WHERE NOT builtin OR pipeline IN (SELECT p.pipeline FROM agog_nats.pipelines p WHERE p.customized)');
