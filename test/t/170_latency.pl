
# Fault suite (issue 3, point 7, with AgogProxy's delay): a slow path to
# nats-server. With 250 ms each way (a 500 ms round trip, a long satellite
# or intercontinental link) and agog_nats.timeout_ms = 5000, every wait is
# far within its bound: the worker must connect, put its streams in place
# and publish committed reports, exactly once. Then the delay rises to
# 400 ms while reports are in flight, and falls back to none.

use strict;
use warnings;

use Time::HiRes ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;
use AgogProxy;
use AgogExactlyOnce;

my $t_start = Time::HiRes::time();
my $nats = AgogNatsTest::NatsServer->new(name => 'nats');
$nats->start;
my $proxy = AgogProxy->new(target_port => $nats->port);
$proxy->start;
$proxy->mode('delay', 250);

my $node = AgogNatsTest::new_node('slow', $proxy->url, 'agog_nats.timeout_ms' => 5000);
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION agog_nats');
my $t0 = Time::HiRes::time();
ok(AgogExactlyOnce::wait_until(sub { (AgogExactlyOnce::streams_ok($node) // 0) == 6 }, 30),
	'500 ms round trip: the worker connects and has its six streams within 30 s');
note(sprintf('worker ready after %.1f s; status: %s', Time::HiRes::time() - $t0,
		$node->safe_psql('postgres', 'SELECT connected, streams_ok, last_error FROM agog_worker_status()')));

AgogExactlyOnce::commit_reports($node, 'slow-', 30, size => 500);
ok(AgogExactlyOnce::wait_drained($node, 'slow-', 30), '500 ms round trip: 30 reports published within 30 s');
AgogExactlyOnce::check(node => $node, nats => $nats, prefix => 'slow-', name => '500 ms round trip', expect => 30);

# The delay rises while a batch is in flight, then goes away.
AgogExactlyOnce::commit_reports($node, 'slower-', 30, size => 500);
$proxy->mode('delay', 400);
Time::HiRes::sleep(3);
$proxy->mode('pass');
ok(AgogExactlyOnce::wait_drained($node, 'slower-', 30), 'delay 400 ms then none: published within 30 s');
AgogExactlyOnce::check(node => $node, nats => $nats, prefix => 'slow', name => 'slow path, at the end', expect => 60);

$node->stop;
$proxy->stop;
$nats->stop;
note(sprintf('170_latency took %.1f s', Time::HiRes::time() - $t_start));
done_testing();
