
# The worker runs as the bootstrap superuser in agog_nats.database, and its
# own statements (the record of a batch, the lease release, the outbox's
# upkeep) name functions and operators such as now() and = without a
# schema.  Without a search_path of its own it took the one the database's
# settings give, which the database's owner may set: an owner who is not a
# superuser could put a schema of their own before pg_catalog and have the
# worker run their now() as superuser.  The worker pins its search_path to
# pg_catalog, pg_temp: the owner's function must never run in it, and the
# worker must still publish.  agog-agent, a client that may connect as a
# more privileged role than the owner, pins its session's search_path the
# same way (it names the extension's functions with their schema).

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;
use AgogAgentTest;

my $nats = AgogNatsTest::NatsServer->new(name => 'natspath');
$nats->start;
my $node = AgogNatsTest::new_node('path', $nats);
$node->start;

# The test's own superuser sessions name their search_path, so that only
# the worker can reach the owner's schema through the database's setting.
my $su = 'SET search_path = public, pg_catalog;';
$node->safe_psql('postgres', qq{
	CREATE EXTENSION agog_nats;
	CREATE ROLE mallory LOGIN;
	ALTER DATABASE postgres OWNER TO mallory;
});
ok(AgogNatsTest::wait_for(sub { AgogNatsTest::worker_ready($node) }, 30),
	'the worker is connected with its streams');

# The owner's trap: a now() that notes who called it, and a search_path
# for the database that puts it first.  All of it as the owner.
$node->safe_psql('postgres', q{
	SET ROLE mallory;
	CREATE SCHEMA trap;
	CREATE TABLE trap.calls (fn text, who name, backend_type text, app text);
	GRANT INSERT ON trap.calls TO PUBLIC;
	CREATE FUNCTION trap.note(fn text) RETURNS void LANGUAGE sql AS $$
		INSERT INTO trap.calls
		SELECT fn, current_user, backend_type, application_name
		  FROM pg_catalog.pg_stat_activity WHERE pid = pg_catalog.pg_backend_pid();
	$$;
	CREATE FUNCTION trap.now() RETURNS timestamptz LANGUAGE sql AS $$
		SELECT trap.note('now');
		SELECT pg_catalog.now();
	$$;
	-- an exact match for quote_ident(name), which pg_catalog's (text) is not
	CREATE FUNCTION trap.quote_ident(name) RETURNS text LANGUAGE sql AS $$
		SELECT trap.note('quote_ident');
		SELECT pg_catalog.quote_ident($1::text);
	$$;
	ALTER DATABASE postgres SET search_path = trap, pg_catalog, public;
});
is($node->safe_psql('postgres', 'SELECT rolsuper FROM pg_roles WHERE rolname = \'mallory\''),
	'f', 'the database owner is not a superuser');

# A new worker reads the database's settings when it connects.
my $old_pid = $node->safe_psql('postgres', 'SELECT pid FROM agog_worker_status()');
$node->safe_psql('postgres', "SELECT pg_terminate_backend($old_pid)");
ok(AgogNatsTest::wait_for(
		sub {
			my $pid = $node->safe_psql('postgres', 'SELECT pid FROM agog_worker_status()');
			return $pid ne '' && $pid ne $old_pid && AgogNatsTest::worker_ready($node);
		},
		60),
	'a new worker started and connected');

# Its statements run: a report is published and recorded.
my $id = $node->safe_psql('postgres', qq{$su
	SELECT agog_publish_report('cynthia', 'research', 'search-path', 'published by a pinned worker')});
ok(AgogNatsTest::wait_for(
		sub {
			$node->safe_psql('postgres', "$su SELECT state FROM agog_nats.outbox WHERE id = $id") eq
			  'published';
		},
		30),
	'the new worker publishes and records a report');

is($node->safe_psql('postgres', "$su SELECT count(*) FROM trap.calls"), '0',
	'the worker never ran the database owner\'s now()')
  or diag($node->safe_psql('postgres', "$su SELECT fn, who, backend_type, count(*) FROM trap.calls GROUP BY 1, 2, 3"));
is($node->safe_psql('postgres', 'SELECT rolsuper FROM pg_roles WHERE rolname = \'mallory\''),
	'f', 'the database owner is still not a superuser');

# agog-agent looks up the extension's schema with quote_ident(nspname)
# first thing after it connects; --once with nothing dispatched exits then.
my ($rc, $out) = AgogAgentTest::run_agent(60, '--agent', 'cynthia', '--once', '--dsn',
	$node->connstr('postgres'), '--', 'true');
is($rc, 0, 'agog-agent --once ran and exited 0') or diag($out);
is($node->safe_psql('postgres', "$su SELECT count(*) FROM trap.calls WHERE app LIKE 'agog-agent%'"),
	'0', 'agog-agent never ran the database owner\'s quote_ident(name)')
  or diag($node->safe_psql('postgres', "$su SELECT fn, who, app, count(*) FROM trap.calls GROUP BY 1, 2, 3"));

# The traps are real: a session that takes the database's search_path calls
# both.
$node->safe_psql('postgres', 'SELECT now(), quote_ident(nspname) FROM pg_namespace LIMIT 1');
is($node->safe_psql('postgres', "$su SELECT string_agg(DISTINCT fn, ',' ORDER BY fn) FROM trap.calls"),
	'now,quote_ident',
	'a session on the database\'s search_path does call the owner\'s now() and quote_ident(name)');

$node->stop;
$nats->stop;
done_testing();
