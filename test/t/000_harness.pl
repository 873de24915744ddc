
# Self-test of the TAP plumbing: AgogNatsTest::NatsServer (start, freeze,
# thaw, restart, kill9, wipe_store, monitoring, raw requests) and a plain
# PostgreSQL::Test::Cluster node. Does not need the agog_nats extension.

use strict;
use warnings;

use IO::Select;
use IO::Socket::INET;
use Time::HiRes;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;

# Connect to the server and return its first protocol line (INFO {...}),
# or undef if nothing arrives within $timeout_s.
sub first_line
{
	my ($port, $timeout_s) = @_;
	my $s = IO::Socket::INET->new(
		PeerAddr => '127.0.0.1',
		PeerPort => $port,
		Proto    => 'tcp',
		Timeout  => 2) or return undef;
	my $line = '';
	my $sel  = IO::Select->new($s);
	my $deadline = Time::HiRes::time() + $timeout_s;
	while ($line !~ /\n/ && Time::HiRes::time() < $deadline)
	{
		next unless $sel->can_read(0.1);
		sysread($s, $line, 4096, length $line) or last;
	}
	close $s;
	return $line =~ /\n/ ? $line : undef;
}

# --- helpers ---------------------------------------------------------------
my $i = 0;
ok(AgogNatsTest::wait_for(sub { ++$i >= 3 }, 5), 'wait_for: true once the code is');
ok(!AgogNatsTest::wait_for(sub { 0 }, 0.3), 'wait_for: false on timeout');
my $p1 = AgogNatsTest::free_port();
my $p2 = AgogNatsTest::free_port();
isnt($p1, $p2, 'free_port gives distinct ports');

# --- nats-server --------------------------------------------------------------
my $nats = AgogNatsTest::NatsServer->new;
$nats->start;
like($nats->url, qr{^nats://127\.0\.0\.1:\d+$}, 'url');
is($nats->url, 'nats://127.0.0.1:' . $nats->port, 'url has the port');
ok(AgogNatsTest::port_accepts($nats->port), 'client port accepts');
like(first_line($nats->port, 5), qr/^INFO \{/, 'server greets with INFO');
like(first_line($nats->port, 5), qr/"max_payload":10485760/, 'max_payload is 10 MB');

my $jsz = $nats->jsz;
ok(ref $jsz eq 'HASH' && exists $jsz->{config}, 'jsz via the monitor port');
is($nats->stream_info('HARNESS'), undef, 'stream_info: undef for no stream');

# Make a stream and a message with the raw client, independent of nats.c.
my $created = $nats->js_api('STREAM.CREATE.HARNESS',
	{ name => 'HARNESS', subjects => ['harness.>'], storage => 'file' });
ok($created && !$created->{error}, 'stream created through $JS.API')
  or diag(explain($created));
my $ack = $nats->request('harness.one', 'hello');
like($ack // '', qr/"stream":"HARNESS"/, 'publish acknowledged by JetStream');
is($nats->request('nobody.listens', 'x'), 'NO_RESPONDERS', 'no responders');
my $si = $nats->stream_info('HARNESS');
is($si && $si->{state}{messages}, 1, 'stream_info: one message');
is_deeply($si && $si->{config}{subjects}, ['harness.>'], 'stream_info: config');

# Freeze: the kernel still accepts connections, but nothing answers.
my $pid = $nats->pid;
$nats->freeze;
ok(!defined first_line($nats->port, 1), 'frozen server does not answer');
$nats->thaw;
like(first_line($nats->port, 5), qr/^INFO /, 'thawed server answers');

# Restart keeps port and store.
$nats->restart;
isnt($nats->pid, $pid, 'restart: new process');
like(first_line($nats->port, 5), qr/^INFO /, 'restart: same port answers');
ok(AgogNatsTest::wait_for(sub { my $s = $nats->stream_info('HARNESS'); $s && $s->{state}{messages} == 1 }, 10),
	'restart: stream and message kept');

# Crash, wipe, start empty.
$nats->kill9;
ok(!$nats->is_running, 'kill9: gone');
ok(!AgogNatsTest::port_accepts($nats->port), 'kill9: port closed');
$nats->wipe_store;
$nats->start;
is($nats->stream_info('HARNESS'), undef, 'wipe_store: no stream after start');

# Stop, also from frozen.
$nats->freeze;
$nats->stop;
ok(!$nats->is_running, 'stop of a frozen server');
ok(!AgogNatsTest::port_accepts($nats->port), 'stop: port closed');

# --- PostgreSQL node without the extension -------------------------------------
my $node = PostgreSQL::Test::Cluster->new('plain');
$node->init;
$node->start;
is($node->safe_psql('postgres', 'SELECT 1'), '1', 'plain node answers SELECT 1');
$node->stop;

# new_node writes the configuration (the node is not started: the extension
# may not be installed).
my $cfg = AgogNatsTest::new_node('cfg', $nats, 'agog_nats.timeout_ms' => 500,
	'agog_nats.stream' => "it's");
my $conf = slurp_file($cfg->data_dir . '/postgresql.conf');
like($conf, qr/^shared_preload_libraries = 'agog_nats'$/m, 'new_node: preload');
like($conf, qr/^agog_nats\.url = 'nats:\/\/127\.0\.0\.1:\d+'$/m, 'new_node: url');
like($conf, qr/^agog_nats\.timeout_ms = 500$/m, 'new_node: extra setting');
like($conf, qr/^agog_nats\.stream = 'it''s'$/m, 'new_node: quoting');

done_testing();
