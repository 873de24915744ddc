
# pg_dump keeps the agents users add (pg_extension_config_dump with
# WHERE NOT builtin): a dump restored into a new database has the six
# built-in agents from CREATE EXTENSION and the user's agent from the dump,
# each exactly once, and the restore raises no error.  It also keeps the
# reports still pending in the outbox (same message ids), and the user's
# pipelines, workflows and tasks.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;

my $nats = AgogNatsTest::NatsServer->new(name => 'nats');
$nats->start;
my $node = AgogNatsTest::new_node('main', $nats);
$node->start;

$node->safe_psql('postgres', q{
	CREATE EXTENSION agog_nats;
	INSERT INTO agog_nats.agents (agent, task_type, description)
	VALUES ('rita', 'review', 'Rita reviews');});

# The worker provisions the user's agent too (it lives in database postgres).
ok(AgogNatsTest::wait_for(
		sub {
			my $s = $nats->stream_info('agog_features_review');
			$s && join(',', @{ $s->{config}{subjects} || [] }) eq 'agog.deliverables.rita.>';
		},
		20),
	'the worker creates agog_features_review for rita');

# Reports committed while NATS is down stay pending; a workflow of a user's
# pipeline is running.
$nats->stop;
$node->safe_psql('postgres', q{
	SELECT agog_publish_report('rita', 'review', 'dumped-' || g, 'pending report ' || g)
	  FROM generate_series(1, 3) g;
	SELECT agog_define_pipeline('dumped', '[{"stage": "only", "agent": "rita"}]');
	SELECT agog_start_workflow('dumped-feature', 'dumped');});
my $outbox_sql = q{SELECT string_agg(msg_id || ':' || state || ':' || subject, ',' ORDER BY id) FROM agog_nats.outbox WHERE kind = 'report'};
my $outbox_before = $node->safe_psql('postgres', $outbox_sql);
like($outbox_before, qr/^(agog-\d+-\d+-\d+:pending:agog\.deliverables\.rita\.review\.dumped-\d,?){3}$/,
	'three reports pending in the outbox while NATS is down');
my $wf_sql = q{SELECT w.feature || ':' || w.pipeline || ':' || string_agg(t.stage || '/' || t.agent, ',') FROM agog_nats.workflows w JOIN agog_nats.tasks t ON t.workflow_id = w.id GROUP BY w.id ORDER BY w.id};
my $wf_before = $node->safe_psql('postgres', $wf_sql);
is($wf_before, 'dumped-feature:dumped:only/rita', 'a workflow of a user pipeline exists');

my $agents_sql = q{SELECT agent || ':' || task_type || ':' || stream_name || ':' || description || ':' || builtin || ':' || max_msgs || ':' || max_age FROM agog_nats.agents ORDER BY agent};
my $before = $node->safe_psql('postgres', $agents_sql);
is(scalar(my @rows = split /\n/, $before), 7, 'source database has seven agents');

# Dump (plain SQL) and restore into a new database on the same node.
my $dump = PostgreSQL::Test::Utils::tempdir() . '/postgres.sql';
$node->command_ok([ 'pg_dump', '-d', $node->connstr('postgres'), '-f', $dump ],
	'pg_dump of database postgres');
my $dump_text = slurp_file($dump);
like($dump_text, qr/^CREATE EXTENSION IF NOT EXISTS agog_nats /m, 'the dump creates the extension');
like($dump_text, qr/rita\s+review\s+Rita reviews/, 'the dump holds the user\'s agent');
unlike($dump_text, qr/^cynthia\s/m, 'the dump does not hold the built-in agents');

$node->command_ok([ 'createdb', '-h', $node->host, '-p', $node->port, 'restored' ],
	'createdb restored');
my ($stdout, $stderr) = ('', '');
my $ok = PostgreSQL::Test::Utils::run_log(
	[
		'psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('restored'),
		'-f', $dump
	],
	'>', \$stdout, '2>', \$stderr);
ok($ok, 'restore with ON_ERROR_STOP=1 succeeds');
unlike($stderr, qr/ERROR|FATAL/, 'restore prints no error') or diag($stderr);

is($node->safe_psql('restored', $outbox_sql), $outbox_before,
	'pending reports restored with their message ids');
is($node->safe_psql('restored', $wf_sql), $wf_before, 'the workflow and its tasks restored');
is($node->safe_psql('restored',
		q{SELECT string_agg(pipeline, ',' ORDER BY pipeline) FROM agog_nats.pipelines}),
	'dumped,feature', 'the user pipeline restored next to the built-in one, once each');
is($node->safe_psql('restored',
		q{SELECT nextval('agog_nats.outbox_id_seq') > max(id) FROM agog_nats.outbox}),
	't', 'the outbox id sequence continues after the restored rows');

my $after = $node->safe_psql('restored', $agents_sql);
is($after, $before, 'restored agents equal the source\'s (the seven, same settings)');
is($node->safe_psql('restored',
		'SELECT count(*) || \'/\' || count(DISTINCT agent) FROM agog_nats.agents'),
	'7/7', 'seven agents, each exactly once');
is($node->safe_psql('restored',
		"SELECT string_agg(agent, ',' ORDER BY agent) FROM agog_nats.agents WHERE NOT builtin"),
	'rita', 'rita is the one user agent');
is($node->safe_psql('restored',
		"SELECT count(*) FROM agog_nats.agents GROUP BY agent HAVING count(*) > 1"),
	'', 'no agent appears twice');

# A second dump/restore round keeps it so (nothing doubles up).
my $dump2 = PostgreSQL::Test::Utils::tempdir() . '/restored.sql';
$node->command_ok([ 'pg_dump', '-d', $node->connstr('restored'), '-f', $dump2 ],
	'pg_dump of the restored database');
$node->command_ok([ 'createdb', '-h', $node->host, '-p', $node->port, 'restored2' ],
	'createdb restored2');
$ok = PostgreSQL::Test::Utils::run_log(
	[
		'psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('restored2'),
		'-f', $dump2
	],
	'>', \$stdout, '2>', \$stderr);
ok($ok, 'second restore succeeds');
is($node->safe_psql('restored2', $agents_sql), $before, 'second restore: the same seven agents');

unlike(AgogNatsTest::log_since($node), qr/terminated by signal|server process .* was terminated/,
	'no crash');
$node->stop;
$nats->stop;
done_testing();
