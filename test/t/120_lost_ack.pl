
# Fault suite (issue 3, point 7): acknowledgements lost on the way back.
# PostgreSQL talks to nats-server through AgogProxy. While the proxy drops
# server-to-client bytes, the server stores the reports but the worker never
# sees a PubAck: nothing may be marked published, and once the path is back
# each report must be in JetStream exactly once:
#   A. default duplicate window (2 min): the resend is deduplicated;
#   B. duplicate window 5 s and an outage of 8 s: the resend is past the
#      window, so the worker must find the earlier copy by its message id;
#   C. duplicate window 5 s, the publishes themselves lost (client-to-server
#      dropped) for longer than the window: the search finds nothing and the
#      report is sent again, once.

use strict;
use warnings;

use JSON::PP;
use Time::HiRes ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;
use AgogJsClient;
use AgogProxy;
use AgogExactlyOnce;

my $t_start = Time::HiRes::time();
my $nats = AgogNatsTest::NatsServer->new(name => 'nats');
$nats->start;
my $proxy = AgogProxy->new(target_port => $nats->port);
$proxy->start;
my $node = AgogExactlyOnce::setup_node('lostack', $proxy->url);
my @streams = map { "agog_features_$_->[1]" } @AgogExactlyOnce::AGENTS;

# Messages of the six streams, straight from the server (not via the proxy).
sub js_total
{
	my $js = AgogJsClient->new($nats->port, timeout_s => 2);
	my $total = 0;
	for my $s (@streams)
	{
		my $i = eval { $js->stream_info($s) } or return undef;
		$total += $i->{state}{messages};
	}
	return $total;
}

sub published_count
{
	my ($prefix) = @_;
	return AgogExactlyOnce::count_state($node, $prefix, 'published') // -1;
}

# --- A. ack lost, default duplicate window ----------------------------------------------
my $base = js_total();
$proxy->mode('drop_s2c');
AgogExactlyOnce::commit_reports($node, 'ack-', 50, size => 300);
ok(AgogExactlyOnce::wait_until(sub { (js_total() // 0) == $base + 50 }, 20),
	'A: with server-to-client dropped, the server still stores the 50 reports');
Time::HiRes::sleep(1);
is(published_count('ack-'), 0,
	'A: no PubAck reached the worker: none is marked published (1 s after the server had them all)');
like($proxy->stats->{dropped_s2c}, qr/^[1-9]\d*$/, 'A: the proxy did drop server-to-client bytes');

$proxy->reset;
$proxy->mode('pass');
my $t_pass = Time::HiRes::time();
ok(AgogExactlyOnce::wait_drained($node, 'ack-', 30), 'A: path back: all published within 30 s');
note(sprintf('A: drained %.1f s after the path came back', Time::HiRes::time() - $t_pass));
my $res = AgogExactlyOnce::check(
	node   => $node,
	nats   => $nats,
	prefix => 'ack-',
	name   => 'A: lost acks, 2 min window',
	expect => 50);
is($res->{duplicates}, 50, 'A: each report was resent and acknowledged as a duplicate (the lost-ack path ran)');

# --- B. duplicate window 5 s, outage of 8 s after the send ---------------------------------
$node->safe_psql('postgres', "ALTER SYSTEM SET agog_nats.duplicate_window = '5s'; SELECT pg_reload_conf();");
ok(AgogExactlyOnce::wait_until(
		sub {
			my $js = AgogJsClient->new($nats->port, timeout_s => 2);
			for my $s (@streams)
			{
				my $i = $js->stream_info($s) or return 0;
				return 0 unless $i->{config}{duplicate_window} == 5_000_000_000;
			}
			return 1;
		},
		20),
	'B: the worker set duplicate_window = 5 s on the six streams');
is($nats->stream_info('agog_features_research')->{config}{duplicate_window},
	5_000_000_000, 'B: the monitor shows duplicate_window 5 s');

$base = js_total();
$proxy->mode('drop_s2c');
AgogExactlyOnce::commit_reports($node, 'ackw-', 20, size => 300);
my $t_send = Time::HiRes::time();
ok(AgogExactlyOnce::wait_until(sub { (js_total() // 0) == $base + 20 }, 20),
	'B: the server stores the 20 reports, their acks are dropped');
$proxy->mode('blackhole');
Time::HiRes::sleep(8);
is(published_count('ackw-'), 0, 'B: after 8 s of blackhole none is marked published');
$proxy->reset;
$proxy->mode('pass');
note(sprintf('B: path back %.1f s after the commit', Time::HiRes::time() - $t_send));
$t_pass = Time::HiRes::time();
ok(AgogExactlyOnce::wait_drained($node, 'ackw-', 30), 'B: path back: all published within 30 s');
note(sprintf('B: drained %.1f s after the path came back', Time::HiRes::time() - $t_pass));
$res = AgogExactlyOnce::check(
	node   => $node,
	nats   => $nats,
	prefix => 'ackw-',
	name   => 'B: lost acks, outage longer than the 5 s window',
	expect => 20);
is($node->safe_psql('postgres',
		"SELECT count(*) FROM agog_nats.outbox WHERE starts_with(feature, 'ackw-') "
		  . "AND published_at - first_sent_at > interval '5 s' AND duplicate"),
	'20', 'B: each was recorded more than 5 s after its first send, as found already stored');
is(js_total(), $base + 20, 'B: JetStream holds no more than it did before the outage ended');

# --- C. publishes lost (client-to-server dropped) longer than the window -----------------
$base = js_total();
$proxy->mode('drop_c2s');
AgogExactlyOnce::commit_reports($node, 'ackc-', 10, size => 300);
Time::HiRes::sleep(7);
is(js_total(), $base, 'C: with client-to-server dropped, nothing reached the server in 7 s');
is(published_count('ackc-'), 0, 'C: none is marked published');
$proxy->reset;
$proxy->mode('pass');
$t_pass = Time::HiRes::time();
ok(AgogExactlyOnce::wait_drained($node, 'ackc-', 30), 'C: path back: all published within 30 s');
note(sprintf('C: drained %.1f s after the path came back', Time::HiRes::time() - $t_pass));
AgogExactlyOnce::check(
	node   => $node,
	nats   => $nats,
	prefix => 'ackc-',
	name   => 'C: publishes lost for longer than the window',
	expect => 10);

# The earlier scenarios are untouched by the later ones.
AgogExactlyOnce::check(node => $node, nats => $nats, prefix => 'ack', name => 'A+B+C', expect => 80);

$node->stop;
$proxy->stop;
$nats->stop;
note(sprintf('120_lost_ack took %.1f s', Time::HiRes::time() - $t_start));
done_testing();
