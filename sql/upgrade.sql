-- Walk the upgrade chain: installing the first release and updating along
-- every step must give the same objects as installing the default version.
CREATE TEMP TABLE fresh AS
SELECT pg_describe_object(classid, objid, objsubid) AS object
  FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
 WHERE e.extname = 'agog_nats' AND d.deptype = 'e';
SELECT count(*) > 0 AS has_objects FROM fresh;

SELECT default_version FROM pg_available_extensions WHERE name = 'agog_nats';
-- Every update path from the first release reaches the default version.
SELECT count(*) AS unreachable
  FROM pg_available_extension_versions v
 WHERE v.name = 'agog_nats' AND v.version <> '0.1.0'
   AND NOT EXISTS (SELECT 1 FROM pg_extension_update_paths('agog_nats') p
                    WHERE p.source = '0.1.0' AND p.target = v.version AND p.path IS NOT NULL);

DROP EXTENSION agog_nats;
CREATE EXTENSION agog_nats VERSION '0.1.0';
SET client_min_messages = warning;
ALTER EXTENSION agog_nats UPDATE;
RESET client_min_messages;
SELECT extversion = (SELECT default_version FROM pg_available_extensions WHERE name = 'agog_nats')
       AS at_default
  FROM pg_extension WHERE extname = 'agog_nats';

SELECT object AS missing_after_update FROM fresh
EXCEPT
SELECT pg_describe_object(classid, objid, objsubid)
  FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
 WHERE e.extname = 'agog_nats' AND d.deptype = 'e';
SELECT pg_describe_object(classid, objid, objsubid) AS extra_after_update
  FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
 WHERE e.extname = 'agog_nats' AND d.deptype = 'e'
EXCEPT
SELECT object FROM fresh;

-- Built-in agents a user changed under 0.2.0 are marked customized by the
-- update (pg_dump then keeps the change); unchanged ones are not.
DROP EXTENSION agog_nats;
CREATE EXTENSION agog_nats VERSION '0.2.0';
UPDATE agog_nats.agents SET max_msg_size = 1048576 WHERE agent = 'cynthia';
UPDATE agog_nats.agents SET description = 'Sylvia, renamed' WHERE agent = 'sylvia';
SET client_min_messages = warning;
ALTER EXTENSION agog_nats UPDATE;
RESET client_min_messages;
SELECT agent, builtin, customized FROM agog_nats.agents ORDER BY agent;
DROP EXTENSION agog_nats;
CREATE EXTENSION agog_nats;
