
# pg_dump keeps the agents users add (pg_extension_config_dump with
# WHERE NOT builtin): a dump restored into a new database has the six
# built-in agents from CREATE EXTENSION and the user's agent from the dump,
# each exactly once, and the restore raises no error.  A built-in agent the
# user changed (its stream limits) is marked customized and dumped, and the
# restore puts the change onto the row CREATE EXTENSION made, so a worker on
# the restored database would not shrink its stream back; the same for the
# built-in pipeline redefined by agog_define_pipeline (its stages replace the
# built-in ones instead of colliding with them).  It also keeps the
# reports still pending in the outbox (same message ids), and the user's
# pipelines, workflows and tasks.  Last, a pg_restore --clean of a -Fc dump
# into the worker's own database, in pg_restore's default transactions: the
# worker must not shrink the stream whose raised limits the data restores
# only after CREATE EXTENSION has committed the built-in defaults.

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
	VALUES ('rita', 'review', 'Rita reviews');
	UPDATE agog_nats.agents SET max_msgs = 50000, description = 'Cynthia, kept longer'
	 WHERE agent = 'cynthia';
	SELECT agog_define_pipeline('feature',
		'[{"stage": "research", "agent": "cynthia"},
		  {"stage": "review", "agent": "rita", "depends_on": ["research"]}]',
		'research, then review');});
is($node->safe_psql('postgres',
		q{SELECT builtin || '/' || customized FROM agog_nats.agents WHERE agent = 'cynthia'}),
	'true/true', 'a changed built-in agent is marked customized');
is($node->safe_psql('postgres', q{
		UPDATE agog_nats.agents SET created_at = created_at WHERE agent = 'sylvia';
		SELECT customized FROM agog_nats.agents WHERE agent = 'sylvia'}),
	'f', 'an update that changes none of its settings leaves it as installed');

# The worker provisions the user's agent too (it lives in database postgres).
ok(AgogNatsTest::wait_for(
		sub {
			my $s = $nats->stream_info('agog_features_review');
			$s && join(',', @{ $s->{config}{subjects} || [] }) eq 'agog.deliverables.rita.>';
		},
		20),
	'the worker creates agog_features_review for rita');
ok(AgogNatsTest::wait_for(
		sub {
			my $s = $nats->stream_info('agog_features_research');
			$s && ($s->{config}{max_msgs} // 0) == 50000;
		},
		20),
	'the worker applies the changed limit to agog_features_research');

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
like($outbox_before, qr/^(agog-\d+-\d+-\d+-[0-9a-f]{16}:pending:agog\.deliverables\.rita\.review\.dumped-\d,?){3}$/,
	'three reports pending in the outbox while NATS is down');
my $wf_sql = q{SELECT w.feature || ':' || w.pipeline || ':' || string_agg(t.stage || '/' || t.agent, ',') FROM agog_nats.workflows w JOIN agog_nats.tasks t ON t.workflow_id = w.id GROUP BY w.id ORDER BY w.id};
my $wf_before = $node->safe_psql('postgres', $wf_sql);
is($wf_before, 'dumped-feature:dumped:only/rita', 'a workflow of a user pipeline exists');

my $agents_sql = q{SELECT agent || ':' || task_type || ':' || stream_name || ':' || description || ':' || builtin || ':' || customized || ':' || max_msgs || ':' || max_age FROM agog_nats.agents ORDER BY agent};
my $feature_sql = q{SELECT p.description || ':' || p.builtin || ':' || p.customized || ':' || string_agg(s.stage || '/' || s.agent || '/' || s.builtin, ',' ORDER BY s.position) FROM agog_nats.pipelines p JOIN agog_nats.stages s USING (pipeline) WHERE pipeline = 'feature' GROUP BY p.pipeline};
my $feature_before = $node->safe_psql('postgres', $feature_sql);
is($feature_before, 'research, then review:true:true:research/cynthia/false,review/rita/false',
	'the redefined built-in pipeline is marked customized, its stages are the user\'s');
my $before = $node->safe_psql('postgres', $agents_sql);
is(scalar(my @rows = split /\n/, $before), 7, 'source database has seven agents');

# Dump (plain SQL) and restore into a new database on the same node.
my $dump = PostgreSQL::Test::Utils::tempdir() . '/postgres.sql';
$node->command_ok([ 'pg_dump', '-d', $node->connstr('postgres'), '-f', $dump ],
	'pg_dump of database postgres');
my $dump_text = slurp_file($dump);
like($dump_text, qr/^CREATE EXTENSION IF NOT EXISTS agog_nats /m, 'the dump creates the extension');
like($dump_text, qr/rita\s+review\s+Rita reviews/, 'the dump holds the user\'s agent');
like($dump_text, qr/^cynthia\s+research\s+Cynthia, kept longer\s+50000\s/m,
	'the dump holds the changed built-in agent');
like($dump_text, qr/^feature\s+research, then review\s/m,
	'the dump holds the redefined built-in pipeline');
unlike($dump_text, qr/^sylvia\s/m, 'the dump does not hold the unchanged built-in agents');

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
like($after, qr/^cynthia:research:agog_features_research:Cynthia, kept longer:true:true:50000:7 days$/m,
	'the restored cynthia has the changed limit and description');
is($node->safe_psql('restored', $feature_sql), $feature_before,
	'the restored feature pipeline has the redefined stages only');
is($node->safe_psql('restored',
		"SELECT count(*) FROM agog_nats.agents GROUP BY agent HAVING count(*) > 1"),
	'', 'no agent appears twice');

# The worker drains and orchestrates agog_nats.database's rows only: in
# another database a report would stay pending and a workflow would never
# be dispatched, so both are refused there, and nothing is written.
my ($ret, $out, $err) = $node->psql('restored',
	q{SELECT agog_publish_report('cynthia', 'research', 'elsewhere', 'not here')});
isnt($ret, 0, 'agog_publish_report fails outside the worker\'s database');
like($err, qr/ERROR:  reports can be queued only in database "postgres".*HINT:  Connect to database "postgres", or use agog_publish_report_now/s,
	'and says which database, and what to use instead');
($ret, $out, $err) = $node->psql('restored', q{SELECT agog_start_workflow('elsewhere')});
isnt($ret, 0, 'agog_start_workflow fails outside the worker\'s database');
like($err, qr/ERROR:  workflows can run only in database "postgres"/, 'and says which database');
is($node->safe_psql('restored', $outbox_sql), $outbox_before, 'nothing was queued there');
is($node->safe_psql('restored', $wf_sql), $wf_before, 'no workflow was started there');

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
is($node->safe_psql('restored2', $feature_sql), $feature_before,
	'second restore: the same feature pipeline');

# A restore into the worker's own database as pg_restore does it by default
# (each object its own transaction, here with --clean): CREATE EXTENSION
# commits with cynthia at 10,000 messages before the data puts back her
# 50,000.  The two sections are restored apart so that the worker surely
# reconciles in between: it keeps the stream's larger limits (and says
# so) instead of shrinking it to the table's, which would drop reports.
$nats->start;
ok(AgogNatsTest::wait_for(sub { AgogNatsTest::worker_ready($node) }, 30),
	'NATS back: the worker is connected with its streams');
ok(AgogNatsTest::wait_for(
		sub {
			$node->safe_psql('postgres',
				q{SELECT count(*) FROM agog_nats.outbox WHERE state <> 'published'}) eq '0';
		},
		30),
	'the pending reports are published');
$node->safe_psql('postgres', q{
	SELECT agog_publish_report_now('cynthia', 'research', 'kept-' || g, 'kept ' || g)
	  FROM generate_series(1, 5) g;});
my $research = sub {
	my $s = $nats->stream_info('agog_features_research');
	return $s ? ($s->{config}{max_msgs} // '') . '/' . ($s->{state}{messages} // '') : '';
};
my $research_before = $research->();
like($research_before, qr{^50000/[1-9]\d*$}, "research stream before: $research_before");

my $fc = PostgreSQL::Test::Utils::tempdir() . '/postgres.dump';
$node->command_ok([ 'pg_dump', '-Fc', '-d', $node->connstr('postgres'), '-f', $fc ],
	'pg_dump -Fc of the worker\'s database');
my $log_from = -s $node->logfile;
$node->command_ok(
	[
		'pg_restore', '--clean', '--if-exists', '--section=pre-data',
		'-d', $node->connstr('postgres'), $fc
	],
	'pg_restore --clean of the schema (CREATE EXTENSION) into the worker\'s database');
ok(AgogNatsTest::wait_for(
		sub {
			AgogNatsTest::log_since($node, $log_from) =~
			  /WARNING:  agog_nats kept the larger limits of JetStream stream "agog_features_research"/;
		},
		30),
	'the worker reconciles the new extension\'s agents and keeps the larger limits')
  or diag(AgogNatsTest::log_since($node, $log_from));
is($research->(), $research_before, 'the research stream is not shrunk: same limit, same messages');
is($node->safe_psql('postgres', q{SELECT health FROM agog_stream_status() WHERE agent = 'cynthia'}),
	'drifted', 'agog_stream_status shows it as drifted meanwhile');
$node->command_ok(
	[
		'pg_restore', '--section=data', '--section=post-data',
		'-d', $node->connstr('postgres'), $fc
	],
	'pg_restore of the data');
is($node->safe_psql('postgres', $agents_sql), $before, 'the restored agents equal the dumped ones');
is($node->safe_psql('postgres',
		q{SELECT limits_changed_at IS NULL FROM agog_nats.agents WHERE agent = 'cynthia'}),
	't', 'restored limits are as inserted: limits_changed_at is NULL');
ok(AgogNatsTest::wait_for(
		sub {
			$node->safe_psql('postgres',
				q{SELECT health FROM agog_stream_status() WHERE agent = 'cynthia'}) eq 'ok';
		},
		30),
	'once the data is in, the stream matches the table again');
is($research->(), $research_before, 'the research stream kept every report');

unlike(AgogNatsTest::log_since($node), qr/terminated by signal|server process .* was terminated/,
	'no crash');
$node->stop;
$nats->stop;
done_testing();
