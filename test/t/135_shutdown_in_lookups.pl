
# SIGTERM while the worker looks reports up by message id.  Before it sends
# again a report whose earlier send has no known outcome and is older than
# half the duplicate window, the worker walks the report's subject for its
# message id, within agog_nats.timeout_ms.  A shutdown request cut short the
# look-up under way, but the claim's loop went on to the next report, whose
# look-up waited its first slice (250 ms) before it saw the request: a
# batch of 40 such reports kept a worker asked to stop for about ten
# seconds.  The worker stops looking reports up once it is asked to stop
# (their leases run out; they are looked up again by the next worker).

use strict;
use warnings;

use Time::HiRes ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;
use AgogProxy;
use AgogExactlyOnce;

my $nats = AgogNatsTest::NatsServer->new(name => 'natsterm');
$nats->start;
my $proxy = AgogProxy->new(target_port => $nats->port);
$proxy->start;
my $node = AgogExactlyOnce::setup_node('termlookup', $proxy->url,
	'agog_nats.duplicate_window' => '2s',
	'agog_nats.timeout_ms'       => '2s');

# 40 reports stored by the server, their acks lost: each is pending with no
# known outcome, and due again past half the 2 s window.
$proxy->mode('drop_s2c');
AgogExactlyOnce::commit_reports($node, 'term-', 40, size => 200);
my $t_commit = Time::HiRes::time();
ok(AgogExactlyOnce::wait_until(
		sub {
			($node->safe_psql('postgres',
					"SELECT count(*) FROM agog_nats.outbox WHERE starts_with(feature, 'term-') "
					  . "AND state = 'pending' AND attempts >= 2")) == 40;
		},
		20),
	'the 40 reports are claimed a second time (their first acks were lost)');
# The look-ups get no answer either: each takes the 2 s timeout.  Stop the
# worker well inside the loop over the 40.
Time::HiRes::sleep(1.5);
my $pid = AgogExactlyOnce::worker_pid($node);
like($pid // '', qr/^\d+$/, 'the worker runs');
my $off = AgogNatsTest::log_offset($node);
my $t_term = Time::HiRes::time();
kill 'TERM', $pid;
my $gone = 0;
while (Time::HiRes::time() - $t_term < 30)
{
	if (!kill(0, $pid)) { $gone = 1; last; }
	Time::HiRes::usleep(20_000);
}
my $stop_s = Time::HiRes::time() - $t_term;
ok($gone, 'the worker exits after SIGTERM');
note(sprintf('SIGTERM %.1f s after the commit; the worker exited %.3f s later',
		$t_term - $t_commit, $stop_s));
cmp_ok($stop_s, '<', 2.0,
	sprintf('it stops within 2 s, not after a slice for every report left to look up (%.3f s)', $stop_s));
like(AgogNatsTest::log_since($node, $off), qr/agog_nats worker shutting down/, 'it logs its shutdown');

# The path comes back: the next worker finds every report stored once.
$proxy->reset;
$proxy->mode('pass');
ok(AgogExactlyOnce::wait_drained($node, 'term-', 60), 'after the path is back, all 40 are published');
AgogExactlyOnce::check(
	node   => $node,
	nats   => $nats,
	prefix => 'term-',
	name   => 'after the shutdown in look-ups',
	expect => 40);

$node->stop;
$proxy->stop;
$nats->stop;
done_testing();
