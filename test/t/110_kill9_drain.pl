
# Fault suite (issue 3, point 7): 1,000 reports committed in 40
# transactions; nats-server is killed with SIGKILL three times at random
# points of the drain and restarted on the same store each time. At the end
# every committed report is in JetStream exactly once.
#
# Each round feeds the drain its own 250 reports, spread over 10 commits
# about 20 ms apart, once the worker is connected: a drain that catches up
# at once after a restart (750 backlogged reports take well under the
# poll's first look) must not leave a round with nothing in flight to kill.

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
my $seed = $ENV{AGOG_TEST_SEED} // int(rand(1e6));
srand($seed);
note("random seed $seed (set AGOG_TEST_SEED to replay)");

my $nats = AgogNatsTest::NatsServer->new(name => 'nats');
$nats->start;
my $node = AgogExactlyOnce::setup_node('kill9', $nats->url);

my @streams = map { "agog_features_$_->[1]" } @AgogExactlyOnce::AGENTS;

# Messages in the six streams, straight from the server; undef while it is
# down or recovering.
sub js_total
{
	my $js = AgogJsClient->new($nats->port, timeout_s => 1);
	my $total = 0;
	my @r = eval { $js->requests([ map { [ "\$JS.API.STREAM.INFO.$_", '' ] } @streams ], 1) };
	$js->close;
	return undef if @r != @streams;
	for my $r (@r)
	{
		return undef unless $r && !defined $r->{status};
		my $i = eval { JSON::PP->new->decode($r->{body}) } or return undef;
		return undef if $i->{error};
		$total += $i->{state}{messages};
	}
	return $total;
}

# A background session commits the reports: 25 per transaction, 10
# transactions ($from..$from+249) with a short pause between them, so the
# drain is busy for a while after each feed.
my $bg = $node->background_psql('postgres');
sub feed
{
	my ($from) = @_;
	for my $i (0 .. 9)
	{
		my $lo = $from + 25 * $i;
		$bg->{stdin} .= AgogExactlyOnce::publish_sql('k9-', $lo, $lo + 24, size => 8000)
		  . ";\nSELECT pg_sleep(0.02);\n";
	}
	$bg->{run}->pump_nb;
}

my $poll = AgogExactlyOnce::Session->new($node);
my @kills;
for my $round (1 .. 3)
{
	ok(AgogExactlyOnce::wait_until(
			sub { ($poll->query('SELECT connected FROM agog_nats.worker_health') // '') eq 't' }, 30),
		"round $round: the worker is connected within 30 s");
	feed(250 * ($round - 1) + 1);

	# Wait until the drain is in the middle of a batch: JetStream holds more
	# of the reports than the outbox has marked published (acks in flight or
	# not yet recorded); then kill at a random point up to 20 ms later.
	my ($pub, $js) = (0, 0);
	my $in_drain = AgogExactlyOnce::wait_until(
		sub {
			$pub = $poll->query(
				"SELECT count(*) FROM agog_nats.outbox WHERE starts_with(feature, 'k9-') AND state = 'published'");
			return 0 unless defined $pub;
			$js = js_total() // return 0;
			return $js > $pub;
		},
		30, 0.002);
	ok($in_drain, "round $round: caught the drain mid-batch (JetStream has $js messages, $pub marked published)");
	Time::HiRes::sleep(rand(0.02));
	$nats->kill9;
	my $pending = AgogExactlyOnce::count_state($node, 'k9-') // '?';
	my $published = AgogExactlyOnce::count_state($node, 'k9-', 'published') // '?';
	push @kills, "kill $round: JetStream had >= $js with $pub marked; after the kill $published published, $pending pending";
	note($kills[-1]);
	Time::HiRes::sleep(0.5 + rand(1.0));
	$nats->start;    # same store
}
$poll->quit;
feed(751);
ok($bg->quit, 'the background session committed its 40 transactions and ended cleanly');

ok(AgogExactlyOnce::wait_drained($node, 'k9-', 60), 'after the last restart every report is published within 60 s');
my $res = AgogExactlyOnce::check(
	node   => $node,
	nats   => $nats,
	prefix => 'k9-',
	name   => '1,000 reports, nats-server killed three times',
	expect => 1000);
note('kills: ' . join('; ', @kills));
note('worker: ' . $node->safe_psql('postgres',
		'SELECT reconnects, disconnects, reports_published FROM agog_nats.worker_health'));

$node->stop;
$nats->stop;
note(sprintf('110_kill9_drain took %.1f s', Time::HiRes::time() - $t_start));
done_testing();
