
# With replicated streams (agog_nats.stream_replicas > 1) a fetch asks the
# stream leader through JetStream's API.  When nothing answers that API (no
# responders: JetStream is not running there, or the cluster has lost its
# leaders), the report may well exist: that is a fault of the system, not
# a missing report.  Were it reported as 42704 (undefined object), as a
# review feared, a valid completion notice whose report had to be looked up
# in JetStream would be filed in agog_nats.bad_notices, for good.  nats.c
# gives such a request JetStream's error 10076 (not enabled), which is
# 38000, like a publish that JetStream did not answer, and the notice is
# left to come again; this test keeps it so.  A core NATS server (no
# JetStream) answers nothing on $JS.API.

use strict;
use warnings;

use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;
use AgogWorkflowTest;

my $nats = AgogNatsTest::NatsServer->new(name => 'natscore', jetstream => 0);
$nats->start;
my $node = AgogNatsTest::new_node('noleader', $nats,
	'agog_nats.stream_replicas' => 3,
	'agog_nats.timeout_ms' => 500);
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION agog_nats');

my ($ret, $out, $err) = $node->psql('postgres',
	q{SELECT * FROM agog_fetch_report('jen', 'frontend', 'unanswered')},
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/ERROR:\s+38000: could not fetch the report from NATS JetStream/,
	'a fetch nothing answers: 38000, not a missing report');
like($err, qr/no responders/, 'and says nothing answered');

# A NATS agent's completion notice whose report is not in the outbox: the
# look-up goes to JetStream, which does not answer.
$node->safe_psql('postgres', q{SELECT agog_define_pipeline('solo', '[{"stage": "build", "agent": "jen"}]')});
my $wf = $node->safe_psql('postgres', q{SELECT agog_start_workflow('unanswered', 'solo')});
$node->safe_psql('postgres',
	"UPDATE agog_nats.tasks SET state = 'dispatched', attempt = 1 WHERE workflow_id = $wf");
my $notice = AgogWorkflowTest::jen_notice('unanswered');
$notice =~ s/'/''/g;
($ret, $out, $err) = $node->psql('postgres',
	"SELECT agog_nats.apply_nats_notice('agog.notices.jen.unanswered', '$notice', 1)",
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/ERROR:\s+38000: could not fetch the report from NATS JetStream/,
	'the notice is not applied: the fault is raised, so the worker puts it back');
is($node->safe_psql('postgres', 'SELECT count(*) FROM agog_nats.bad_notices'), 0,
	'and it is not filed as a bad notice');
is($node->safe_psql('postgres', "SELECT state FROM agog_nats.tasks WHERE workflow_id = $wf"),
	'dispatched', 'the task waits for it');

$node->stop;
$nats->stop;
done_testing();
