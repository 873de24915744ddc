
# agog_stream_status() reads the streams with one $JS.API.STREAM.LIST request
# per page of 256 (src/agog_stream.c scans the reply for the fields it
# shows): an agent whose stream comes after 260 others is on the second page;
# every field equals what STREAM.INFO says; a JetStream error reply is an
# ERROR that quotes it.

use strict;
use warnings;

use JSON::PP;
use Time::HiRes ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;
use AgogWorkflowTest;

my $nats = AgogNatsTest::NatsServer->new(name => 'natslist');
$nats->start;
my $node = AgogNatsTest::new_node('list', $nats);
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION agog_nats');
ok(AgogNatsTest::wait_for(sub { AgogWorkflowTest::worker_ready($node) }, 30), 'worker ready, six streams');
sub q1 { return $node->safe_psql('postgres', $_[0]); }

# --- paging: 260 more streams under agog.deliverables.> ---------------------------
my $created = 0;
for my $i (0 .. 259)
{
	my $name = sprintf('agog_features_p%03d', $i);
	my $r = $nats->js_api("STREAM.CREATE.$name",
		{ name => $name, subjects => [ sprintf('agog.deliverables.p%03d.>', $i) ], storage => 'memory' }, 10);
	$created++ if $r && !$r->{error};
}
is($created, 260, '260 streams created directly in NATS (not agents)');
my $other = $nats->js_api('STREAM.CREATE.other', { name => 'other', subjects => ['other.>'], storage => 'memory' });
ok($other && !$other->{error}, 'and one outside agog.deliverables.>');

q1(q{INSERT INTO agog_nats.agents (agent, task_type) VALUES ('zzz', 'zzz')});
ok(AgogNatsTest::wait_for(sub { q1(q{SELECT health FROM agog_stream_status() WHERE agent = 'zzz'}) eq 'ok' }, 30),
	'agent zzz: its stream agog_features_zzz, after 266 others, shows as ok (second page of the list)');
my $list = $nats->js_api('STREAM.LIST', { offset => 0, subject => 'agog.deliverables.>' });
cmp_ok($list->{total} // 0, '>', $list->{limit} // 1e9, "the list has more than one page ($list->{total} streams, $list->{limit} per page)");
is(q1('SELECT count(*) FROM agog_stream_status()'), 7, 'one row per agent: seven');

# --- every field as STREAM.INFO has it ------------------------------------------
q1(q{SELECT agog_publish_report_now('roy', 'backend', 'f' || i, repeat('x', i * 100)) FROM generate_series(1, 3) i});
$nats->js_api('CONSUMER.DURABLE.CREATE.agog_features_backend.c1',
	{ stream_name => 'agog_features_backend', config => { durable_name => 'c1', ack_policy => 'explicit' } });
my $si = $nats->js_api('STREAM.INFO.agog_features_backend');
my $st = $si->{state};
my $cf = $si->{config};
# The extension cuts times to the microsecond, as nats.c does (PostgreSQL's
# parser would round the nanosecond digits): compare with the cut text.
my ($first_us, $last_us) = map { (my $t = $_ // '') =~ s/(\.\d{6})\d*Z$/$1Z/; $t } $st->{first_ts}, $st->{last_ts};
is(q1(qq{SELECT concat_ws(' ', messages, bytes, first_seq, last_seq, consumer_count,
                 first_time = '$first_us'::timestamptz, last_time = '$last_us'::timestamptz,
                 max_msgs, max_bytes, max_age = make_interval(secs => $cf->{max_age} / 1e9), health)
            FROM agog_stream_status() WHERE agent = 'roy'}),
	join(' ', $st->{messages}, $st->{bytes}, $st->{first_seq}, $st->{last_seq}, $st->{consumer_count},
		't', 't', $cf->{max_msgs}, $cf->{max_bytes}, 't', 'ok'),
	"roy: messages, bytes, sequences, consumers, times and limits as STREAM.INFO says ($st->{messages} messages, 1 consumer)");
is(q1(q{SELECT concat_ws(' ', messages, first_time IS NULL, last_time IS NULL, oldest_age IS NULL) FROM agog_stream_status() WHERE agent = 'zzz'}),
	'0 t t t', 'an empty stream: no times');

# --- a fetch from a stream that does not exist -------------------------------------------
# JetStream takes a direct get of a stream that does not exist and never
# answers it.  After one slice without an answer the backend asks whether the
# stream exists, and a missing stream means no report: no row, at once,
# instead of an error after agog_nats.timeout_ms (2 s here).  The worker puts
# the stream back at its next check (every 30 s), not before.
my $del = $nats->js_api('STREAM.DELETE.agog_features_zzz');
ok($del && $del->{success}, "agog_features_zzz deleted behind the worker's back");
for my $call (q{agog_fetch_report('zzz', 'zzz', 'nothing')}, q{agog_fetch_report_by_seq('zzz', 1)})
{
	my $t0 = Time::HiRes::time();
	my ($rc, $out, $err) = $node->psql('postgres', "SELECT count(*) FROM $call");
	my $took = Time::HiRes::time() - $t0;
	is("$rc $out", '0 0', "$call on a missing stream: no row, no error") or diag($err);
	cmp_ok($took, '<', 1.5, sprintf('... answered before agog_nats.timeout_ms ran out (%.2f s)', $took));
}
my $gone = $nats->js_api('STREAM.INFO.agog_features_zzz');
is($gone && $gone->{error} && $gone->{error}{code}, 404, 'the stream was still missing when they ran');
$node->stop;
$nats->stop;

# --- a JetStream error reply ----------------------------------------------------------
# An account without JetStream on a server with JetStream: the list request
# is answered with an error object.
my $nats2 = AgogNatsTest::NatsServer->new(
	name => 'natsnojs',
	extra_conf => "accounts {\n  NOJS: { users: [ { user: nojs, password: nojs } ] }\n}\n");
$nats2->start;
my $dir = PostgreSQL::Test::Utils::tempdir();
open(my $fh, '>', "$dir/pw") or die; print $fh "nojs\n"; close $fh; chmod 0600, "$dir/pw";
my $node2 = AgogNatsTest::new_node('nojs', $nats2, 'agog_nats.user' => 'nojs', 'agog_nats.password_file' => "$dir/pw");
$node2->start;
$node2->safe_psql('postgres', 'CREATE EXTENSION agog_nats');
my ($ret, $out, $err) = $node2->psql('postgres', 'SELECT * FROM agog_stream_status()',
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
isnt($ret, 0, 'stream status in an account without JetStream fails');
like($err, qr/ERROR:  38000: could not read the state of the agent streams/, '... with SQLSTATE 38000');
like($err, qr/DETAIL:  JetStream refused the request with error code \d+: [^\n]*jetstream[^\n]*not enabled/i,
	'... quoting JetStream\'s error code and description');
$node2->stop;
$nats2->stop;
done_testing();
