
# Fault suite (issue 3, point 7): reports JetStream refuses.
#   A. The research stream is changed behind the worker's back to take
#      messages of at most 512 bytes. A 2 KB report for cynthia is refused
#      for good: it ends dead, with the server's error, and nothing is in the
#      stream. Once the stream is put back (the worker reconciles it when
#      agog_nats.agents changes) agog_retry_dead() queues it again and it is
#      published exactly once.
#   B. An agent with max_msg_size set: a report exactly at the limit is
#      published; one byte over is refused by agog_publish_report with
#      SQLSTATE 54000 and nothing is queued.
#   C. "no responders" makes a report dead after ten refusals with one
#      replica, and with agog_nats.stream_replicas above 1 only for a stream
#      JetStream refused to create (a stream without a leader answers the
#      same: TAP 070).

use strict;
use warnings;

use Time::HiRes ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;
use AgogJsClient;
use AgogExactlyOnce;

my $t_start = Time::HiRes::time();
my $nats = AgogNatsTest::NatsServer->new(name => 'nats');
$nats->start;
my $node = AgogExactlyOnce::setup_node('dead', $nats->url);
my $js = AgogJsClient->new($nats->port);
my $stream = 'agog_features_research';

sub max_msg_size { my $i = $js->stream_info($stream); return $i ? $i->{config}{max_msg_size} : undef; }

# --- A. a stream whose max message size is smaller ------------------------------------
# The worker checks its streams every 30 s and when agog_nats.agents changes:
# it has just checked, so the change below stays for a while.
my $cfg = $js->stream_info($stream)->{config};
is($cfg->{max_msg_size}, -1, 'A: the research stream starts without a message size limit');
my $r = $js->js_api("STREAM.UPDATE.$stream", { %$cfg, max_msg_size => 512 });
ok($r && !$r->{error}, 'A: stream updated behind the worker to max_msg_size 512') or diag(explain($r));
is(max_msg_size(), 512, 'A: the server now takes research messages of at most 512 bytes');

my $log_from = -s $node->logfile;
$node->safe_psql('postgres',
	"SELECT agog_publish_report('cynthia', 'research', 'dl-big', repeat('b', 2048));\n"
	  . "SELECT agog_publish_report('cynthia', 'research', 'dl-small', 'fits');\n"
	  . "SELECT agog_publish_report('roy', 'backend', 'dl-other', repeat('o', 2048));\n");
ok(AgogExactlyOnce::wait_until(
		sub {
			$node->safe_psql('postgres',
				"SELECT count(*) FROM agog_nats.outbox WHERE starts_with(feature, 'dl-') AND state <> 'pending'") == 3;
		},
		15),
	'A: the three reports are settled within 15 s');
my $row = $node->safe_psql('postgres',
	"SELECT state || '|' || coalesce(message_id, '') || '|' || coalesce(last_error, '') FROM agog_nats.reports WHERE feature = 'dl-big'");
my ($state, $mid, $error) = split /\|/, $row, 3;
is($state, 'dead', 'A: the 2 KB report is dead');
is($mid, '', 'A: ... with no message id');
like($error, qr/(size|maximum|exceeds)/i, "A: ... and last_error gives the size refusal: $error");
is($node->safe_psql('postgres', "SELECT state FROM agog_nats.reports WHERE feature = 'dl-small'"),
	'published', 'A: a small report on the same stream is published meanwhile');
is($node->safe_psql('postgres', 'SELECT dead_reports FROM agog_nats.worker_health'),
	'1', 'A: worker_health counts one dead report');
is(max_msg_size(), 512, 'A: the stream still had the 512-byte limit when the report was refused');
AgogExactlyOnce::check(
	node        => $node,
	nats        => $nats,
	prefix      => 'dl-',
	name        => 'A: refused for good',
	expect      => 3,
	expect_dead => 1);

# Put the stream back: any change of agog_nats.agents makes the worker
# reconcile its streams.
$node->safe_psql('postgres', "UPDATE agog_nats.agents SET description = description WHERE agent = 'cynthia'");
ok(AgogExactlyOnce::wait_until(sub { (max_msg_size() // 0) == -1 }, 15),
	'A: the worker reconciled the stream (max_msg_size -1 again) within 15 s');
# (the worker logs it just after the update, which the check above may
# see first)
ok(AgogExactlyOnce::wait_until(
		sub { slurp_file($node->logfile, $log_from) =~ /updated JetStream stream "$stream"/ }, 5),
	'A: the log shows the worker updating the stream');

is($node->safe_psql('postgres', 'SELECT agog_retry_dead()'), '1', 'A: agog_retry_dead() queues the dead report again');
ok(AgogExactlyOnce::wait_drained($node, 'dl-', 15), 'A: it is published within 15 s');
AgogExactlyOnce::check(node => $node, nats => $nats, prefix => 'dl-', name => 'A: after the retry', expect => 3);
is($node->safe_psql('postgres', 'SELECT agog_retry_dead()'), '0', 'A: nothing is left to retry');

# --- B. exactly at the agent's max_msg_size, and one byte over -----------------------------
$node->safe_psql('postgres', "UPDATE agog_nats.agents SET max_msg_size = 2000 WHERE agent = 'cynthia'");
ok(AgogExactlyOnce::wait_until(sub { (max_msg_size() // 0) == 2000 }, 15),
	'B: the worker set max_msg_size 2000 on the research stream');

# Size of the same report with content 'x' (same feature: the feature is in
# the body) and its message id, in a transaction that rolls back; the next
# report takes the next id. The report one byte over has a feature of the
# same length.
my ($probe_id, $body_len, $msgid) = split /\|/, $node->safe_psql('postgres',
	"BEGIN;\n"
	  . "SELECT agog_publish_report('cynthia', 'research', 'size-at', 'x') AS probe \\gset\n"
	  . "SELECT o.id || '|' || octet_length(o.body) || '|' || o.msg_id FROM agog_nats.outbox o "
	  . "WHERE o.id = :probe;\n"
	  . "ROLLBACK;");
my $next_len = length($msgid) - length($probe_id) + length($probe_id + 1);
my $header   = length("NATS/1.0\r\nNats-Msg-Id: \r\n\r\n");
my $room     = 2000 - ($body_len - 1 + $header + $next_len);
note("B: a report's message is its body plus $header + $next_len bytes of header; content of $room bytes fills 2000");
is($node->safe_psql('postgres', "SELECT agog_publish_report('cynthia', 'research', 'size-at', repeat('y', $room))"),
	$probe_id + 1, 'B: a report exactly at the limit is accepted');
is($node->safe_psql('postgres',
		"SELECT octet_length(body) + $header + length(msg_id) FROM agog_nats.outbox WHERE feature = 'size-at'"),
	'2000', 'B: ... its message is exactly 2000 bytes');

my ($rc, $out, $err) = $node->psql('postgres',
	"SELECT agog_publish_report('cynthia', 'research', 'size-ov', repeat('y', $room + 1))",
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
isnt($rc, 0, 'B: one byte over is refused');
like($err, qr/ERROR:  54000: report is too large for the agent's stream/, 'B: ... with SQLSTATE 54000')
  or diag($err);
is($node->safe_psql('postgres', "SELECT count(*) FROM agog_nats.outbox WHERE feature = 'size-ov'"),
	'0', 'B: ... and nothing is queued');

ok(AgogExactlyOnce::wait_drained($node, 'size-', 15), 'B: the report at the limit is published within 15 s');
is($node->safe_psql('postgres', "SELECT state FROM agog_nats.outbox WHERE feature = 'size-at'"),
	'published', 'B: ... JetStream took it (not dead)');
AgogExactlyOnce::check(
	node   => $node,
	nats   => $nats,
	prefix => 'size-',
	name   => 'B: at the size limit',
	expect => 1,
	absent => ['size-ov']);

# --- C. "no responders" ---------------------------------------------------------------------
# A report no stream captures gets "no responders" (ghost's stream asks for
# more storage than the server has, so it is never created).  With one
# replica that is a refusal like the others: the tenth makes the report
# dead.  With agog_nats.stream_replicas above 1 it is also what a stream
# without a leader answers (two of three servers down, for as long as they
# are down), so it then never does, unless JetStream refused to create the
# stream: ghost's reports still go dead (TAP 070 has a report stay pending
# with two of three servers down).  Each report is made to reach its tenth
# attempt by setting attempts to 9.
$node->safe_psql('postgres',
	"INSERT INTO agog_nats.agents (agent, task_type, max_bytes) VALUES ('ghost', 'ghost', 1000000000000000)");
my $tenth = sub {
	my ($agent, $task_type, $feature, $error_like, $name) = @_;
	$node->safe_psql('postgres', "SELECT agog_publish_report('$agent', '$task_type', '$feature', 'boo')");
	return AgogNatsTest::tenth_refusal($node, $feature, $error_like, "C: $name", 15, 40);
};
is($tenth->('ghost', 'ghost', 'nr-one', '%no responders%', 'one replica'), 'dead 10 false',
	'C: one replica: the tenth "no responders" makes the report dead');

$node->append_conf('postgresql.conf', 'agog_nats.stream_replicas = 3');
$node->reload;
is($tenth->('ghost', 'ghost', 'nr-ghost3', '%electing a new leader%', 'three replicas, creation refused'),
	'dead 10 false', 'C: three replicas: a stream JetStream refused to create still goes dead at the tenth');
$node->safe_psql('postgres', "DELETE FROM agog_nats.outbox WHERE feature LIKE 'nr-%'");

$js->close;
$node->stop;
$nats->stop;
note(sprintf('150_dead_letter took %.1f s', Time::HiRes::time() - $t_start));
done_testing();
