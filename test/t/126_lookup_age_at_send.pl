
# The resend check judges a report's age when it is sent, not when it was
# claimed.  Before sending again a report whose earlier send has no known
# outcome, the worker looks it up by message id if that send may be older
# than half the duplicate window (JetStream's deduplication covers a resend
# only within the window).  The age was taken at the claim, but the batch
# is sent after every look-up in it: a report young enough at the claim to
# skip its look-up could go out past the window, behind a slow look-up of
# another report of the batch, and be stored a second time.
#
# Here: a 10 s window (look-ups past 5 s), a path to nats-server that delays
# every chunk by 50 ms, and one batch of two reports:
#   A: "sent" long ago with no known outcome (made so by hand), on a subject
#      of 80 messages: its look-up walks them, one direct get each (8 s);
#   B: really sent about 4 s before, stored by JetStream, its ack lost (its
#      row made pending again by hand): below 5 s at the claim.
# B must not be stored twice.

use strict;
use warnings;

use Time::HiRes ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;
use AgogJsClient;
use AgogProxy;
use AgogExactlyOnce;

my $nats = AgogNatsTest::NatsServer->new(name => 'natsage');
$nats->start;
my $proxy = AgogProxy->new(target_port => $nats->port);
$proxy->start;
my $node = AgogExactlyOnce::setup_node('lookupage', $proxy->url,
	'agog_nats.duplicate_window' => '10s',
	'agog_nats.timeout_ms'       => '5s');

# 80 messages on A's subject, for its look-up to walk.
is($node->safe_psql('postgres',
		"SELECT count(agog_publish_report_now('cynthia', 'research', 'walk', 'filler ' || g)) "
		  . 'FROM generate_series(1, 80) g'),
	'80', '80 messages on agog.deliverables.cynthia.research.walk');

# A: committed with its row made "sent 30 s ago, no known outcome", and not
# due, in the same transaction: the worker never sends it before the batch.
my $a_id = $node->safe_psql('postgres', q{
	BEGIN;
	SELECT agog_publish_report('cynthia', 'research', 'walk', 'report A') AS a \gset
	UPDATE agog_nats.outbox
	   SET attempts = 1, first_sent_at = now() - interval '30 s',
	       next_attempt_at = now() + interval '1 hour'
	 WHERE id = :a;
	COMMIT;
	SELECT :a;
});
like($a_id, qr/^\d+$/, 'A is committed, pending, not due');

# B: sent and stored for real; then its ack "lost": pending again.
my $b_id = $node->safe_psql('postgres',
	"SELECT agog_publish_report('sylvia', 'critique', 'late', 'report B')");
ok(AgogExactlyOnce::wait_until(
		sub {
			$node->safe_psql('postgres', "SELECT state FROM agog_nats.outbox WHERE id = $b_id") eq 'published';
		},
		10),
	'B is published');
$node->safe_psql('postgres', qq{
	UPDATE agog_nats.outbox
	   SET state = 'pending', stream = NULL, seq = NULL, duplicate = NULL,
	       published_at = NULL, next_attempt_at = now() + interval '1 hour'
	 WHERE id = $b_id;
});
my $b_msg_id = $node->safe_psql('postgres', "SELECT msg_id FROM agog_nats.outbox WHERE id = $b_id");

sub copies
{
	my ($msg_id) = @_;
	my $js = AgogJsClient->new($nats->port, timeout_s => 5);
	return scalar grep { ($_->{msg_id} // '') eq $msg_id } $js->stream_messages('agog_features_critique');
}
is(copies($b_msg_id), 1, 'B is stored once');

# Every chunk 50 ms late both ways; then both due at once, B about 4 s old.
$proxy->mode('delay', 50);
my $b_age = $node->safe_psql('postgres',
	"SELECT extract(epoch FROM now() - first_sent_at) FROM agog_nats.outbox WHERE id = $b_id");
Time::HiRes::sleep(4 - $b_age) if $b_age < 4;
$node->safe_psql('postgres',
	"UPDATE agog_nats.outbox SET next_attempt_at = now() WHERE id IN ($a_id, $b_id)");
note(sprintf('B made due %.1f s after its first send',
		$node->safe_psql('postgres',
			"SELECT extract(epoch FROM now() - first_sent_at) FROM agog_nats.outbox WHERE id = $b_id")));

ok(AgogExactlyOnce::wait_until(
		sub {
			$node->safe_psql('postgres',
				"SELECT count(*) FROM agog_nats.outbox WHERE id IN ($a_id, $b_id) AND state = 'published'") == 2;
		},
		60),
	'A and B are published');
my ($attempts_a, $attempts_b) = split /\|/, $node->safe_psql('postgres',
	"SELECT string_agg(attempts::text, '|' ORDER BY id) FROM agog_nats.outbox WHERE id IN ($a_id, $b_id)");
is("$attempts_a $attempts_b", '2 2', 'both went out in one claim (their second attempt)');
note('B: ' . $node->safe_psql('postgres',
		"SELECT 'published ' || round(extract(epoch FROM published_at - first_sent_at), 1) || ' s after its first send, duplicate ' || duplicate FROM agog_nats.outbox WHERE id = $b_id"));
is(copies($b_msg_id), 1, 'B is still stored once: looked up before it was sent past the window');
is($node->safe_psql('postgres', "SELECT duplicate FROM agog_nats.outbox WHERE id = $b_id"), 't',
	'B is recorded as found already stored');

$proxy->mode('pass');
$node->stop;
$proxy->stop;
$nats->stop;
done_testing();
