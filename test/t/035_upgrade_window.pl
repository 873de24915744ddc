
# The upgrade window: after "make install" and a restart, the new library
# runs with the objects of the old release until ALTER EXTENSION UPDATE.
# Here it starts on 0.1.0's objects (streams, publish now, fetch), is
# updated to 0.2.0 (the outbox) while the worker runs, commits reports into
# the outbox while NATS is down, is updated to the default version with
# those reports still pending, and then publishes them with the message ids
# they were given, and runs a workflow, all by the same worker process.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;

my $nats = AgogNatsTest::NatsServer->new(name => 'nats');
$nats->start;
my $node = AgogNatsTest::new_node('upgrade', $nats);
$node->start;


# 0.1.0: streams, agog_publish_report_now, agog_fetch_report.
$node->safe_psql('postgres', q{CREATE EXTENSION agog_nats VERSION '0.1.0'});
ok(AgogNatsTest::wait_for(sub { AgogNatsTest::worker_ready($node) }, 20),
	'on 0.1.0\'s objects the worker puts the six streams in place');
my $pid = AgogNatsTest::worker_status($node)->{pid};
like($node->safe_psql('postgres',
		q{SELECT agog_publish_report_now('cynthia', 'research', 'v010', 'published on 0.1.0')}),
	qr/^agog_features_research\.1$/, '0.1.0: a report is published now');
is($node->safe_psql('postgres',
		q{SELECT content FROM agog_fetch_report('cynthia', 'research', 'v010')}),
	'published on 0.1.0', '0.1.0: and fetched back');

# 0.2.0, with the worker running: the outbox.
$node->safe_psql('postgres', q{ALTER EXTENSION agog_nats UPDATE TO '0.2.0'});
$node->safe_psql('postgres',
	q{SELECT agog_publish_report('cynthia', 'research', 'v020', 'committed on 0.2.0')});
ok(AgogNatsTest::fetches($node, 'cynthia', 'research', 'v020', 'committed on 0.2.0'),
	'0.2.0: a committed report is published by the worker and fetched back');

# Reports committed on 0.2.0 while NATS is down wait in the outbox.
$nats->stop;
$node->safe_psql('postgres', q{
	SELECT agog_publish_report('cynthia', 'research', 'pending-' || g, 'pending ' || g)
	  FROM generate_series(1, 5) g;});
my $pending_sql = q{SELECT string_agg(msg_id, ',' ORDER BY id) FROM agog_nats.outbox WHERE state = 'pending'};
my $pending = $node->safe_psql('postgres', $pending_sql);
is(scalar(my @ids = split /,/, $pending), 5, 'five reports pending on 0.2.0 while NATS is down');

# Update to the default version with them pending; then NATS comes back.
$node->safe_psql('postgres', 'ALTER EXTENSION agog_nats UPDATE');
is($node->safe_psql('postgres',
		q{SELECT extversion = default_version FROM pg_extension e
		    JOIN pg_available_extensions a ON a.name = e.extname WHERE extname = 'agog_nats'}),
	't', 'the extension is at the default version');
$nats->start;
ok(AgogNatsTest::wait_for(sub { $node->safe_psql('postgres', $pending_sql) eq '' }, 30),
	'after the update the reports pending from 0.2.0 are published');
is($node->safe_psql('postgres', q{
		SELECT string_agg(msg_id, ',' ORDER BY id) FROM agog_nats.outbox
		 WHERE feature LIKE 'pending-%' AND state = 'published'}),
	$pending, '... with the message ids they were given on 0.2.0');
is($node->safe_psql('postgres',
		q{SELECT content FROM agog_fetch_report('cynthia', 'research', 'pending-5')}),
	'pending 5', 'the last of them is fetched back');
ok(AgogNatsTest::wait_for(
		sub { ($nats->stream_info('agog_features_research') || {})->{state}{messages} // 0 } , 10),
	'the research stream is there');
is($nats->stream_info('agog_features_research')->{state}{messages}, 7,
	'it holds the seven reports, none twice');

# The workflow engine of the new version runs in the same worker.
my $wf = $node->safe_psql('postgres', q{SELECT agog_start_workflow('upgraded')});
ok(AgogNatsTest::wait_for(
		sub {
			$node->safe_psql('postgres',
				"SELECT state FROM agog_nats.tasks WHERE workflow_id = $wf AND stage = 'research'") eq
			  'dispatched';
		},
		20),
	'a workflow started after the update has its first task dispatched');
is(AgogNatsTest::worker_status($node)->{pid}, $pid,
	'the same worker process served 0.1.0, 0.2.0 and the default version');

my $log = AgogNatsTest::log_since($node);
unlike($log, qr/background worker "agog_nats worker" \(PID \d+\) exited/,
	'the worker never exited');
unlike($log, qr/terminated by signal|server process .* was terminated/, 'no crash');
$node->stop;
$nats->stop;
done_testing();
