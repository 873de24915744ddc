
# Faults seen from SQL: the library not preloaded, an unreachable server, a
# frozen server (bounded waits, query cancel served promptly), and interop
# with a NATS client that is not nats.c (the seed's TypeScript agents).

use strict;
use warnings;

use JSON::PP;
use Time::HiRes qw(usleep);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;

my @VERBOSE = (extra_params => [ '-v', 'VERBOSITY=verbose' ]);
my $json    = JSON::PP->new->canonical;

# --- not preloaded ---------------------------------------------------------------
{
	my $plain = PostgreSQL::Test::Cluster->new('plain');
	$plain->init;
	$plain->start;

	my ($rc, $out, $err) = $plain->psql('postgres',
		"CREATE EXTENSION agog_nats;\nCREATE EXTENSION agog_nats;",
		on_error_stop => 0, @VERBOSE);
	my @refusals = $err =~ /ERROR:  55000: agog_nats must be loaded via shared_preload_libraries/g;
	is(scalar(@refusals), 2,
		'not preloaded: CREATE EXTENSION fails (55000), and a second attempt in the session fails the same way')
	  or diag($err);
	my @hints = $err =~ /HINT:  [^\n]*shared_preload_libraries = 'agog_nats'/g;
	is(scalar(@hints), 2, 'not preloaded: each refusal hints shared_preload_libraries = \'agog_nats\'');
	unlike($err, qr/FATAL|connection to server was lost/,
		'not preloaded: the refusal is an ERROR, the session survives');

	($rc, $out, $err) = $plain->psql('postgres', 'CREATE EXTENSION agog_nats', @VERBOSE);
	isnt($rc, 0, 'not preloaded: CREATE EXTENSION fails in a new session too');
	like($err, qr/agog_nats must be loaded via shared_preload_libraries/,
		'not preloaded: same message in a new session');
	is($plain->safe_psql('postgres',
			"SELECT count(*) FROM pg_extension WHERE extname = 'agog_nats'")
		  . '/' . $plain->safe_psql('postgres', "SELECT to_regnamespace('agog_nats') IS NULL"),
		'0/t', 'not preloaded: nothing of the extension is left behind');
	$plain->stop;
}

# --- created, then the server restarted without the preload ------------------------
# Every function that needs the shared state refuses with 55000; none may
# crash the server (the agents cache read shared memory that does not exist
# then, and a fetch crashed the server before this was tested).
{
	my $port = AgogNatsTest::free_port();
	my $un = AgogNatsTest::new_node('unloaded', "nats://127.0.0.1:$port");
	$un->start;
	$un->safe_psql('postgres', 'CREATE EXTENSION agog_nats');
	$un->adjust_conf('postgresql.conf', 'shared_preload_libraries', "''");
	$un->restart;
	my $log_off = -s $un->logfile;
	for my $call (
		[ publish     => q{SELECT agog_publish_report('roy', 'backend', 'f', 'x')} ],
		[ publish_now => q{SELECT agog_publish_report_now('roy', 'backend', 'f', 'x')} ],
		[ fetch       => q{SELECT * FROM agog_fetch_report('roy', 'backend', 'f')} ],
		[ status      => q{SELECT * FROM agog_stream_status()} ])
	{
		my ($rc, $out, $err) = $un->psql('postgres', $call->[1], @VERBOSE);
		like($err, qr/ERROR:  55000: agog_nats must be loaded via shared_preload_libraries/,
			"restarted without the preload: $call->[0] refuses with 55000")
		  or diag($err);
	}
	# the workflow engine is SQL: its state waits for the worker
	is($un->safe_psql('postgres', q{SELECT agog_start_workflow('f', 'feature') > 0}), 't',
		'restarted without the preload: a workflow can still be started (its tasks wait for the worker)');
	is($un->safe_psql('postgres', 'SELECT 1'), 1, 'restarted without the preload: the server is up');
	unlike(slurp_file($un->logfile, $log_off), qr/terminated by signal|server process .* was terminated/,
		'restarted without the preload: no backend crashed');
	$un->stop;
}

# --- unreachable server: nothing listens on the port --------------------------------
my $dead_port = AgogNatsTest::free_port();
my $node = AgogNatsTest::new_node('main', "nats://127.0.0.1:$dead_port",
	'agog_nats.timeout_ms' => 1000);
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION agog_nats');
ok(!AgogNatsTest::port_accepts($dead_port), "nothing listens on port $dead_port");

my $t0 = Time::HiRes::time();
my ($rc, $out, $err) = $node->psql('postgres',
	"SELECT agog_publish_report_now('cynthia', 'research', 'f', 'x')", @VERBOSE);
my $elapsed = Time::HiRes::time() - $t0;
isnt($rc, 0, 'unreachable: publish fails');
like($err, qr/ERROR:  08006: could not connect to NATS/, 'unreachable: SQLSTATE 08006')
  or diag($err);
cmp_ok($elapsed, '<', 0.5,
	sprintf('unreachable: fails at once, well under timeout_ms = 1000 (%.3f s)', $elapsed));
# A report not yet drained is read from the outbox without NATS.
is( $node->safe_psql(
		'postgres', "BEGIN;\n"
		  . "SELECT agog_publish_report('cynthia', 'research', 'f', 'queued') > 0;\n"
		  . "SELECT content || '|' || (message_id IS NULL) FROM agog_fetch_report('cynthia', 'research', 'f');\n"
		  . "ROLLBACK;"),
	"t\nqueued|true",
	'unreachable: a fetch returns the pending report of the outbox');

# --- a live server for the rest ----------------------------------------------------
my $nats = AgogNatsTest::NatsServer->new(name => 'nats');
$nats->start;
$node->safe_psql('postgres',
	"ALTER SYSTEM SET agog_nats.url = '" . $nats->url . "'; SELECT pg_reload_conf();");
ok(AgogNatsTest::wait_for(
		sub {
			my $s = AgogNatsTest::worker_status($node);
			$s->{connected} && ($s->{server} // '') eq $nats->url && $s->{streams_ok} == 6;
		},
		20),
	'worker connected to the live server with six streams');
ok(!AgogNatsTest::builtin_stream_problems($nats), 'the six streams exist in JetStream');

# --- frozen before the backend connects: the connect is bounded -----------------------
$nats->freeze;
$t0 = Time::HiRes::time();
($rc, $out, $err) = $node->psql('postgres',
	"SET agog_nats.timeout_ms = 1500;\nSELECT agog_publish_report_now('cynthia', 'research', 'f', 'x');",
	@VERBOSE);
$elapsed = Time::HiRes::time() - $t0;
isnt($rc, 0, 'frozen server, new session: publish fails');
like($err, qr/ERROR:  08006: /, 'frozen server, new session: SQLSTATE 08006') or diag($err);
cmp_ok($elapsed, '>=', 1.4, sprintf('frozen server: waits about timeout_ms = 1500 (%.3f s)', $elapsed));
cmp_ok($elapsed, '<=', 2.5, 'frozen server: gives up within timeout_ms + 1 s');
$nats->thaw;

# --- cancel against a frozen server ---------------------------------------------------
my $bg  = $node->background_psql('postgres', on_error_stop => 0, @VERBOSE);
my $ctl = $node->background_psql('postgres');
my $bpid = $bg->query_safe('SELECT pg_backend_pid()');
like($bpid, qr/^\d+$/, 'session backend pid');
my $id_before = $bg->query_safe(
	"SELECT agog_publish_report_now('cynthia', 'research', 'cancel', 'before the freeze')");
like($id_before, qr/^agog_features_research\.\d+$/,
	'session publishes once (its connection is now cached)');

$nats->freeze;

# Cached connection, frozen server: the sliced wait still ends at timeout_ms.
$bg->query_safe('SET agog_nats.timeout_ms = 1500');
$t0 = Time::HiRes::time();
my ($res, $failed) = $bg->query(
	"SELECT agog_publish_report_now('cynthia', 'research', 'cancel', 'timed out')");
$elapsed = Time::HiRes::time() - $t0;
ok($failed, 'frozen server, cached connection: publish fails');
like($bg->{stderr}, qr/ERROR:  08006: .*\n.*within agog_nats\.timeout_ms \(1500 ms\)/,
	'... with SQLSTATE 08006 and the timeout in the detail') or diag($bg->{stderr});
cmp_ok($elapsed, '>=', 1.4, sprintf('... after about 1.5 s (%.3f s)', $elapsed));
cmp_ok($elapsed, '<=', 2.5, '... and within 1.5 s + 1 s');
$bg->{stderr} = '';

$bg->query_safe('SET agog_nats.timeout_ms = 20000');
my @cases = (
	[ 'agog_publish_report_now' =>
		  "SELECT agog_publish_report_now('cynthia', 'research', 'cancel', 'frozen')" ],
	[ 'agog_fetch_report' =>
		  "SELECT content FROM agog_fetch_report('cynthia', 'research', 'cancel')" ],
	[ 'agog_stream_status' => 'SELECT count(*) FROM agog_stream_status()' ]);
for my $case (@cases)
{
	my ($fn, $sql) = @$case;
	$bg->{stdout} = '';
	$bg->{stderr} = '';
	$bg->{stdin} .= "$sql;\n";
	my $t_sent = Time::HiRes::time();
	$bg->{run}->pump_nb;
	ok(AgogNatsTest::wait_for(
			sub {
				$ctl->query_safe(
					"SELECT count(*) FROM pg_stat_activity WHERE pid = $bpid AND state = 'active' AND query LIKE '%$fn%'"
				) eq '1';
			},
			10),
		"$fn: the call is running against the frozen server");
	# let it wait about 1 s (this shapes the scenario, it asserts nothing)
	my $rest = 1.0 - (Time::HiRes::time() - $t_sent);
	usleep(int($rest * 1e6)) if $rest > 0;
	$bg->{run}->pump_nb;
	is($bg->{stderr}, '', "$fn: still waiting after 1 s");

	my $t_cancel = Time::HiRes::time();
	is($ctl->query_safe("SELECT pg_cancel_backend($bpid)"), 't', "$fn: cancel sent");
	my $canceled = 0;
	while (Time::HiRes::time() - $t_cancel < 25)
	{
		$bg->{run}->pump_nb;
		if ($bg->{stderr} =~ /canceling statement due to user request/)
		{
			$canceled = 1;
			last;
		}
		usleep(2_000);
	}
	my $latency = Time::HiRes::time() - $t_cancel;
	ok($canceled, "$fn: the session reports the cancel") or diag($bg->{stderr});
	cmp_ok($latency, '<', 0.7, sprintf("$fn: cancel served within 0.7 s (%.3f s)", $latency));
	like($bg->{stderr}, qr/ERROR:  57014: canceling statement due to user request/,
		"$fn: SQLSTATE 57014");
	$bg->{stdout} = '';
	$bg->{stderr} = '';
}

# Cancel while a new session is still connecting to the frozen server (no
# cached connection yet): the connect is a NATS wait too.
{
	my $bg2   = $node->background_psql('postgres', on_error_stop => 0, @VERBOSE);
	my $b2pid = $bg2->query_safe('SELECT pg_backend_pid()');
	$bg2->query_safe('SET agog_nats.timeout_ms = 10000');
	$bg2->{stdin} .=
	  "SELECT agog_publish_report_now('cynthia', 'research', 'cancel', 'connecting');\n";
	my $t_sent = Time::HiRes::time();
	$bg2->{run}->pump_nb;
	ok(AgogNatsTest::wait_for(
			sub {
				$ctl->query_safe(
					"SELECT count(*) FROM pg_stat_activity WHERE pid = $b2pid AND state = 'active' AND query LIKE '%agog_publish_report_now%'"
				) eq '1';
			},
			10),
		'connecting: the call is running against the frozen server');
	my $rest = 1.0 - (Time::HiRes::time() - $t_sent);
	usleep(int($rest * 1e6)) if $rest > 0;
	my $t_cancel = Time::HiRes::time();
	$ctl->query_safe("SELECT pg_cancel_backend($b2pid)");
	while (Time::HiRes::time() - $t_cancel < 25)
	{
		$bg2->{run}->pump_nb;
		last if $bg2->{stderr} =~ /ERROR/;
		usleep(2_000);
	}
	my $latency = Time::HiRes::time() - $t_cancel;
	like($bg2->{stderr}, qr/ERROR:  57014: canceling statement due to user request/,
		'connecting: the session reports the cancel') or diag($bg2->{stderr});
	cmp_ok($latency, '<', 0.7,
		sprintf('connecting: cancel served within 0.7 s (%.3f s)', $latency));
	$bg2->{stderr} = '';
	$bg2->quit;
}

# Frozen server, cached connection: a fetch sends its direct get before it
# reads the outbox, and returns a pending report without waiting for the
# answer.  That answer comes after the thaw, and must not be taken for the
# answer to a later request of the session (checked below).
$bg->query_safe('BEGIN');
$bg->query_safe(
	"SELECT agog_publish_report('cynthia', 'research', 'cancel', 'pending while frozen') > 0");
$t0 = Time::HiRes::time();
is($bg->query_safe("SELECT content FROM agog_fetch_report('cynthia', 'research', 'cancel')"),
	'pending while frozen', 'frozen server: a fetch returns the pending report of the outbox');
$elapsed = Time::HiRes::time() - $t0;
cmp_ok($elapsed, '<', 0.5,
	sprintf('... without waiting for the frozen server (%.3f s)', $elapsed));
$bg->query_safe('ROLLBACK');

$nats->thaw;
is($bg->query_safe('SELECT pg_backend_pid()'), $bpid, 'after the cancels: same backend process');
$bg->query_safe('SET agog_nats.timeout_ms = 5000');
my $id_after = $bg->query_safe(
	"SELECT agog_publish_report_now('cynthia', 'research', 'cancel', 'after the thaw')");
like($id_after, qr/^agog_features_research\.\d+$/, 'after the thaw the same session publishes');
my ($seq_before) = $id_before =~ /\.(\d+)$/;
my ($seq_after)  = ($id_after // '') =~ /\.(\d+)$/;
cmp_ok($seq_after // 0, '>', $seq_before, '... a later message');
is($bg->query_safe("SELECT content FROM agog_fetch_report('cynthia', 'research', 'cancel')"),
	'after the thaw', '... and reads it back');

# With its connection open, a fetch sends its direct get before it reads the
# outbox, even when the outbox has the report: the server counts one message
# in from the backend's connection per fetch.
sub backend_in_msgs
{
	my $connz = $nats->monitor_get('/connz?limit=1024');
	my ($c) = grep { ($_->{name} // '') eq "agog_nats backend $bpid" } @{ $connz->{connections} };
	return $c ? $c->{in_msgs} : undef;
}
$bg->query_safe('BEGIN');
$bg->query_safe("SELECT agog_publish_report('cynthia', 'research', 'cancel', 'pending again') > 0");
my $in_before = backend_in_msgs();
is($bg->query_safe("SELECT content FROM agog_fetch_report('cynthia', 'research', 'cancel')"),
	'pending again', 'open connection: a fetch returns the pending report');
# (the server may count the message a moment after the fetch returned)
my $in_after;
AgogNatsTest::wait_for(sub { $in_after = backend_in_msgs(); ($in_after // 0) > ($in_before // 0) }, 2);
$bg->query_safe('ROLLBACK');
ok(defined $in_before, "the backend's connection is in the server's connz");
is(($in_after // 0) - ($in_before // 0), 1,
	'... and sent its direct get before the look-up found it');
is($bg->query_safe("SELECT content FROM agog_fetch_report('cynthia', 'research', 'cancel')"),
	'after the thaw', '... whose late answer the next fetch does not take for its own');
# Not an assertion: what became of the calls that timed out or were
# cancelled while the server was frozen (their bytes were already sent, so
# the server may store them once it runs again).
note('research stream after the thaw, by sequence: ' . join('; ',
		map {
			my $c = $node->safe_psql('postgres',
				"SELECT content FROM agog_fetch_report_by_seq('cynthia', $_)");
			"$_=" . ($c eq '' ? '(none)' : $c)
		} 1 .. $seq_after));
$bg->quit;
$ctl->quit;
my $log = AgogNatsTest::log_since($node);
unlike($log, qr/terminated by signal|server process .* was terminated/, 'no backend crashed');

# --- interop with a client that is not nats.c ---------------------------------------------
my $subj = 'agog.deliverables.cynthia.research';
my $ts_meta = {
	agent        => 'cynthia',
	taskType     => 'research',
	feature      => 'interop',
	timestamp    => '2025-12-17T10:30:00.000Z',
	custom_field => 'custom_value'
};
my $ts_body = '{"content":"# From TS","metadata":{"agent":"cynthia","taskType":"research",'
  . '"feature":"interop","timestamp":"2025-12-17T10:30:00.000Z","custom_field":"custom_value"}}';

# Publish with a reply subject, as nats.js's js.publish() does: the reply is
# the JetStream ack ({"stream": ..., "seq": ...}), decoded, or undef.
sub acked_publish
{
	my ($subject, $body) = @_;
	my $r = $nats->request($subject, $body);
	return undef unless defined $r && $r ne 'NO_RESPONDERS';
	return eval { decode_json($r) };
}

sub fetch_row
{
	my ($feature) = @_;
	return $node->safe_psql('postgres',
		"SELECT content, coalesce(metadata::text, '<null>'), sequence, message_id, subject "
		  . "FROM agog_fetch_report('cynthia', 'research', '$feature')");
}

ok($nats->publish("$subj.interop", $ts_body), 'TS-style report sent with a plain PUB');
my $row = '';
ok(AgogNatsTest::wait_for(sub { $row = fetch_row('interop'); $row ne '' }, 10),
	'agog_fetch_report finds the plain PUB');
my ($content, $meta) = split /\|/, $row;
is($content, '# From TS', 'plain PUB: content');
is_deeply(eval { decode_json($meta) }, $ts_meta, 'plain PUB: metadata with custom_field');

my %ts_meta2 = (%$ts_meta, custom_field => 'acked');
(my $ts_body2 = $ts_body) =~ s/custom_value/acked/;
my $ack = acked_publish("$subj.interop", $ts_body2);
is($ack && $ack->{stream}, 'agog_features_research', 'request-style publish acknowledged by the stream');
$row = fetch_row('interop');
my @f = split /\|/, $row;
is($f[0], '# From TS', 'acked publish: content');
is_deeply(eval { decode_json($f[1]) }, \%ts_meta2, 'acked publish: metadata');
is($f[2], $ack && $ack->{seq}, 'acked publish: sequence is the ack\'s');
is($f[3], 'agog_features_research.' . ($ack && $ack->{seq}), 'acked publish: message_id');
is($f[4], "$subj.interop", 'acked publish: subject');

my %not_seed = (
	interop2 => 'plain text, not json',
	interop3 => '{"content": 5}',
	interop4 => '{"content":"no metadata"}',
	interop5 => '{"content":"x","metadata":[1,2]}');
for my $feature (sort keys %not_seed)
{
	my $a = acked_publish("$subj.$feature", $not_seed{$feature});
	ok($a && $a->{seq}, "$feature: stored");
	is($node->safe_psql('postgres',
			"SELECT content || '|' || (metadata IS NULL) FROM agog_fetch_report('cynthia', 'research', '$feature')"),
		"$not_seed{$feature}|true",
		"$feature: a body that is not seed JSON comes back whole, metadata NULL");
}

# A body that is not text in the database encoding (here a Latin-1 byte in
# a UTF-8 database): 22021, the subject in the detail, no crash.
my $bad = acked_publish("$subj.interop-latin1", "caf\xe9");
ok($bad && $bad->{seq}, 'interop-latin1: stored');
my ($fret, $fout, $ferr) = $node->psql('postgres',
	q{SELECT content FROM agog_fetch_report('cynthia', 'research', 'interop-latin1')},
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($ferr, qr/ERROR:\s+22021: report is not valid text in the database encoding\s+DETAIL:\s+The message on subject "\Q$subj\E\.interop-latin1" holds a NUL byte or bytes that are not UTF8\./,
	'a body that is not UTF-8: 22021 naming the subject in the detail');

# The other direction: nats.c publishes, the plain client reads with a direct get.
my $id = $node->safe_psql('postgres',
	"SELECT agog_publish_report_now('cynthia', 'research', 'interop-back', '# From PG', '{\"files\": 3}')");
my ($seq) = $id =~ /^agog_features_research\.(\d+)$/;
ok($seq, "published from SQL as $id");
my $msg = $nats->request_msg('$JS.API.DIRECT.GET.agog_features_research',
	$json->encode({ last_by_subj => "$subj.interop-back" }));
ok($msg && !defined $msg->{status}, 'direct get by the plain client answers with a message')
  or diag(explain($msg));
is($msg && $msg->{headers}{'Nats-Subject'}, "$subj.interop-back", 'direct get: subject header');
is($msg && $msg->{headers}{'Nats-Sequence'}, $seq, 'direct get: sequence header');
like($msg && $msg->{headers}{'Nats-Msg-Id'}, qr/\S/, 'direct get: the message carries a Nats-Msg-Id');
my $doc = eval { decode_json($msg->{body}) };
ok(ref $doc eq 'HASH', 'the body is JSON') or diag($msg && $msg->{body});
is($doc->{content}, '# From PG', 'body: content');
is_deeply(
	{ map { $_ => $doc->{metadata}{$_} } qw(agent taskType feature files) },
	{ agent => 'cynthia', taskType => 'research', feature => 'interop-back', files => 3 },
	'body: metadata agent, taskType, feature and the caller\'s field');
like($doc->{metadata}{timestamp} // '', qr/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/,
	'body: metadata.timestamp is ISO 8601 UTC with milliseconds');

# The extension reads message times itself (RFC 3339 from Nats-Time-Stamp and
# the stream list): the server's time, cut to the microsecond as nats.c cuts
# it.  PostgreSQL's own parser, given the cut text, is the reference.
my $ts = ($msg && $msg->{headers}{'Nats-Time-Stamp'}) // '';
like($ts, qr/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z$/,
	"direct get: Nats-Time-Stamp is RFC 3339 in UTC ($ts)");
(my $ts_us = $ts) =~ s/(\.\d{6})\d*Z$/$1Z/;
is( $node->safe_psql(
		'postgres',
		"SELECT published_at = '$ts_us'::timestamptz FROM agog_fetch_report('cynthia', 'research', 'interop-back')"
	),
	't',
	'agog_fetch_report: published_at is the stored time, to the microsecond');
is( $node->safe_psql(
		'postgres',
		"SELECT published_at = '$ts_us'::timestamptz FROM agog_fetch_report_by_seq('cynthia', $seq)"),
	't',
	'agog_fetch_report_by_seq: the same');
is( $node->safe_psql(
		'postgres',
		"SELECT last_time = '$ts_us'::timestamptz FROM agog_stream_status() WHERE name = 'agog_features_research'"
	),
	't',
	'agog_stream_status: last_time is the last message\'s time, to the microsecond');

# --- end -----------------------------------------------------------------------------
$log = AgogNatsTest::log_since($node);
unlike($log, qr/terminated by signal|server process .* was terminated/, 'no crash in the node');
ok(eval { $node->stop; 1 }, 'the node stops cleanly') or diag($@);
$nats->stop;
done_testing();
