
# An agent's description (agog_nats.agents.description, which
# agog_nats_admin may change) becomes its stream's description in the
# stream's configuration.  nats.c writes that configuration's JSON with the
# description between quotes as it is given, unescaped: a description with
# a quote in it could end the string and add fields of its own (sealed,
# sources, republish) to a configuration the worker sends with its own
# credentials, and one with a backslash or a line break made the request
# invalid.  The worker escapes the description: JetStream keeps it as
# written, and nothing else of the configuration comes from it.  The next
# reconcile finds the stream as wanted and does not update it again, also
# when the description holds U+2028 or U+2029 (which nats-server sends
# back as \u escapes that nats.c 3.4.1 decodes to '(' and ')').
#
# An agent's max_age may be as short as a second, but JetStream refuses a
# stream whose duplicate window (agog_nats.duplicate_window, 2 minutes by
# default) is longer than its max age: such an agent got no stream at all.
# Its stream's duplicate window is its max age.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;

my $nats = AgogNatsTest::NatsServer->new(name => 'natsdesc');
$nats->start;
my $node = AgogNatsTest::new_node('desc', $nats);
$node->start;
$node->safe_psql('postgres', q{
	CREATE EXTENSION agog_nats;
	CREATE ROLE ada LOGIN;
	GRANT agog_nats_admin TO ada;
});
ok(AgogNatsTest::wait_for(sub { AgogNatsTest::worker_ready($node) }, 30),
	'the worker is connected with its streams');

my $stream = 'agog_features_research';
sub live_config { return ($nats->stream_info($_[0]) // {})->{config} // {}; }

# --- A. a description that tries to add fields to the configuration -----------
# As the administrator role, not a superuser.
my $inject = 'x","sealed":true,"deny_delete":true,"deny_purge":true,"x":"';
$node->safe_psql('postgres',
	"SET ROLE ada; UPDATE agog_nats.agents SET description = \$d\$$inject\$d\$ WHERE agent = 'cynthia'");
ok(AgogNatsTest::wait_for(sub { (live_config($stream)->{description} // '') eq $inject }, 15),
	'A: the stream keeps the description as written, quotes and all')
  or diag(explain(live_config($stream)));
my $cfg = live_config($stream);
ok(!$cfg->{sealed}, 'A: the stream is not sealed');
ok(!$cfg->{deny_delete} && !$cfg->{deny_purge}, 'A: nor denies deletes or purges');
is($node->safe_psql('postgres', 'SELECT streams_failed FROM agog_worker_status()'), '0',
	'A: every stream is in place');
# the stream still takes reports
like($node->safe_psql('postgres',
		"SELECT agog_publish_report_now('cynthia', 'research', 'desc', 'still open')"),
	qr/^agog_features_research\.\d+$/, 'A: the stream still takes reports');

# --- B. every character JSON escapes ---------------------------------------------
# A backslash, a quote, a line break, a tab, a control character, the
# characters Go's encoder writes as \u escapes (< > &), and UTF-8.
my $sql_desc = q{'back\slash "quoted" ' || chr(10) || 'tab' || chr(9) || 'bell' || chr(1) || ' <a&b> caf' || chr(233)};
my $want = $node->safe_psql('postgres', "SELECT $sql_desc");
$node->safe_psql('postgres',
	"SET ROLE ada; UPDATE agog_nats.agents SET description = $sql_desc WHERE agent = 'cynthia'");
ok(AgogNatsTest::wait_for(sub { (live_config($stream)->{description} // '') eq $want }, 15),
	'B: a description with every kind of escape arrives as written')
  or diag(explain(live_config($stream)->{description}));
is($node->safe_psql('postgres', 'SELECT streams_failed FROM agog_worker_status()'), '0',
	'B: every stream is in place');

# --- C. the next reconcile leaves the stream alone -------------------------------
# Another agent's change makes the worker reconcile every stream; the
# research stream already is as wanted and must not be updated again.
sub left_alone_on_reconcile
{
	my ($label, $sylvia) = @_;
	my $off = AgogNatsTest::log_offset($node);
	$node->safe_psql('postgres',
		"SET ROLE ada; UPDATE agog_nats.agents SET description = '$sylvia' WHERE agent = 'sylvia'");
	ok(AgogNatsTest::wait_for(
			sub { (live_config('agog_features_critique')->{description} // '') eq $sylvia }, 15),
		"$label: the worker reconciled after another agent changed");
	ok(AgogNatsTest::wait_for(
			sub { AgogNatsTest::log_since($node, $off) =~ /updated JetStream stream "agog_features_critique"/ }, 5),
		"$label: ... and logged that update");
	unlike(AgogNatsTest::log_since($node, $off), qr/updated JetStream stream "$stream"/,
		"$label: the research stream, already as wanted, is not updated again");
	return;
}
left_alone_on_reconcile('C', 'Sylvia, again');

# --- D. an agent whose max_age is shorter than the duplicate window ---------------
my $NS_PER_S = 1_000_000_000;
$node->safe_psql('postgres', q{
	SET ROLE ada;
	INSERT INTO agog_nats.agents (agent, task_type, description, max_age)
	VALUES ('flash', 'flash', 'short-lived', '30 seconds');
});
ok(AgogNatsTest::wait_for(sub { defined $nats->stream_info('agog_features_flash') }, 15),
	'D: an agent whose max_age (30 s) is below the duplicate window (120 s) gets its stream')
  or diag($node->safe_psql('postgres', 'SELECT streams_failed, last_error FROM agog_worker_status()'));
$cfg = live_config('agog_features_flash');
is($cfg->{max_age}, 30 * $NS_PER_S, 'D: ... with its max_age');
is($cfg->{duplicate_window}, 30 * $NS_PER_S, 'D: ... and a duplicate window of its max_age');
is($cfg->{description}, 'short-lived', 'D: ... and its description');
like($node->safe_psql('postgres',
		"SELECT agog_publish_report_now('flash', 'flash', 'quick', 'gone in 30 s')"),
	qr/^agog_features_flash\.1$/, 'D: it takes reports');
# lowered further, then raised past the window: the window follows, up to the setting
$node->safe_psql('postgres',
	"SET ROLE ada; UPDATE agog_nats.agents SET max_age = '20 seconds' WHERE agent = 'flash'");
ok(AgogNatsTest::wait_for(
		sub { (live_config('agog_features_flash')->{duplicate_window} // 0) == 20 * $NS_PER_S }, 15),
	'D: max_age lowered to 20 s: the window follows it')
  or diag(explain(live_config('agog_features_flash')));
is(live_config('agog_features_flash')->{max_age}, 20 * $NS_PER_S, 'D: ... and the max_age is 20 s');
$node->safe_psql('postgres',
	"SET ROLE ada; UPDATE agog_nats.agents SET max_age = '1 hour' WHERE agent = 'flash'");
ok(AgogNatsTest::wait_for(
		sub { (live_config('agog_features_flash')->{duplicate_window} // 0) == 120 * $NS_PER_S }, 15),
	'D: max_age raised to an hour: the window is the setting\'s 2 minutes again')
  or diag(explain(live_config('agog_features_flash')));
is(live_config($stream)->{duplicate_window}, 120 * $NS_PER_S,
	'D: the other streams keep the 2-minute window');
is($node->safe_psql('postgres', 'SELECT streams_failed FROM agog_worker_status()'), '0',
	'D: every stream is in place');

# --- E. characters Go's encoder escapes above ASCII -----------------------------------
# nats-server writes U+2028 and U+2029 as \u escapes in the stream info; a
# reader that decoded them to other bytes would find the description
# changed at every reconcile and update the stream every time.
my $sep_desc = q{'line' || chr(8232) || 'paragraph' || chr(8233) || 'end'};
$want = $node->safe_psql('postgres', "SELECT $sep_desc");
$node->safe_psql('postgres',
	"SET ROLE ada; UPDATE agog_nats.agents SET description = $sep_desc WHERE agent = 'cynthia'");
sub live_bytes
{
	my $d = live_config($_[0])->{description} // '';
	utf8::encode($d) if utf8::is_utf8($d);    # JSON::PP decodes the \u escapes to characters
	return $d;
}
ok(AgogNatsTest::wait_for(sub { live_bytes($stream) eq $want }, 15),
	'E: a description with U+2028 and U+2029 arrives as written')
  or diag(explain(live_config($stream)->{description}));
left_alone_on_reconcile('E', 'Sylvia, once more');

$node->stop;
$nats->stop;
done_testing();
