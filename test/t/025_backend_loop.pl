
# A backend's connection without nats.c's threads (single-replica streams,
# no TLS): the backend reads its socket itself, so nothing answers the
# server between calls.  Each call must first take in what arrived: the
# server's PINGs are answered then (a session that calls often keeps its
# connection), and a connection the server closed while the backend was
# idle (PINGs unanswered for too long) is opened again before the call
# sends anything, so the call succeeds.  The server here pings every second
# and closes a client after three unanswered PINGs.  A session's end closes
# its connection at once (nats.c's own close would wait half a second for a
# PONG nothing reads).

use strict;
use warnings;

use Time::HiRes qw(usleep);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;

my $nats = AgogNatsTest::NatsServer->new(extra_conf => "ping_interval: \"1s\"\nping_max: 3\n");
$nats->start;
my $node = AgogNatsTest::new_node('loop', $nats);
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION agog_nats');
ok(AgogNatsTest::wait_for(sub { AgogNatsTest::worker_ready($node) }, 30),
	'the worker is connected with its streams');

# The connections of a backend, as the server lists them: [open, closed].
sub backend_conns
{
	my ($pid) = @_;
	my $name = "agog_nats backend $pid";
	my @open = grep { ($_->{name} // '') eq $name }
	  @{ $nats->monitor_get('/connz?limit=1024')->{connections} || [] };
	my @closed = grep { ($_->{name} // '') eq $name }
	  @{ $nats->monitor_get('/connz?state=closed&limit=1024')->{connections} || [] };
	return (\@open, \@closed);
}

my $publish = "SELECT agog_publish_report_now('roy', 'backend', 'loop-%s', 'report %s')";
my $fetch = "SELECT content FROM agog_fetch_report('roy', 'backend', 'loop-%s')";

# --- the backend starts no thread for its connection ------------------------------
my $bg = $node->background_psql('postgres');
my $pid = $bg->query_safe('SELECT pg_backend_pid()');
like($bg->query_safe(sprintf($publish, 0, 0)), qr/^agog_features_backend\.\d+$/,
	'a first publish opens the connection');
opendir(my $dh, "/proc/$pid/task") or die "no /proc/$pid/task: $!";
my $tasks = grep { /^\d+$/ } readdir($dh);
closedir($dh);
# nats.c's library runs a timer, a callback and a garbage-collector thread;
# a threaded connection would add its reader.
cmp_ok($tasks, '<=', 4,
	"the backend runs no nats.c thread for its connection ($tasks tasks: itself and the library's three)");

# --- a backend that calls now and then answers the PINGs, keeps its connection ----
# The server pings a client that sent nothing for a second; with a call
# every 1.5 s a PING is outstanding between calls, answered by the next one.
for my $i (1 .. 6)
{
	usleep(1_500_000);
	is($bg->query_safe(sprintf($fetch, 0)), 'report 0', "busy session: fetch $i")
	  if $i % 2 == 0;
	$bg->query_safe(sprintf($publish, $i, $i)) if $i % 2 != 0;
}
my ($open, $closed) = backend_conns($pid);
is(scalar(@$open), 1, 'busy session: one open connection after 9 s of calls');
is(scalar(@$closed), 0, 'busy session: the server closed none of its connections')
  or diag(explain($closed));

# --- an idle backend's connection, closed by the server, is opened again --------
ok(AgogNatsTest::wait_for(sub { (backend_conns($pid))[1]->@* >= 1 }, 30),
	'idle session: the server closed its connection within 30 s');
($open, $closed) = backend_conns($pid);
is(scalar(@$closed), 1, 'idle session: one connection closed');
like($closed->[0]{reason} // '', qr/Stale Connection/i,
	'idle session: as stale (its PINGs went unanswered)');
like($bg->query_safe(sprintf($publish, 'after', 'after idle')), qr/^agog_features_backend\.\d+$/,
	'idle session: the next publish opens a new connection and succeeds');
is($bg->query_safe(sprintf($fetch, 'after')), 'report after idle',
	'idle session: the report is in JetStream');
($open, $closed) = backend_conns($pid);
is(scalar(@$open), 1, 'idle session: one open connection again');

# the same for a fetch as the first call after the idle time
ok(AgogNatsTest::wait_for(sub { (backend_conns($pid))[1]->@* >= 2 }, 30),
	'idle session: the server closed the new connection too');
is($bg->query_safe(sprintf($fetch, 'after')), 'report after idle',
	'idle session: a fetch as the first call after the close succeeds');
is($bg->query_safe('SELECT count(*) FROM agog_stream_status()'), '6',
	'idle session: and the stream list after it');

# --- a frozen server: a large publish is not piled up in nats.c's buffer -------
# A slice that runs out sends the publish again; while the last copy is still
# waiting to be written (the server takes nothing), no new copy is added.
# The 9 MB report fits the socket's buffers only in part, so without that
# rule every slice of the 2 s timeout would add 9 MB to the backend (65 MB
# at its peak against 17 MB with it, measured).
sub vm_hwm_bytes
{
	my ($p) = @_;
	open(my $fh, '<', "/proc/$p/status") or die "no /proc/$p/status: $!";
	while (<$fh>) { return $1 * 1024 if /^VmHWM:\s+(\d+) kB/; }
	die "no VmHWM for $p";
}
my $big = $node->background_psql('postgres', on_error_stop => 0);
my $big_pid = $big->query_safe('SELECT pg_backend_pid()');
$big->query_safe(sprintf($publish, 'warm', 'warm'));
$big->query_safe("SELECT length(repeat('x', 9000000) || 'y')");    # the statement's own peak
my $hwm_before = vm_hwm_bytes($big_pid);
$nats->freeze;
my $t0 = Time::HiRes::time();
$big->query("SELECT agog_publish_report_now('roy', 'backend', 'big', repeat('x', 9000000))");
my $took = Time::HiRes::time() - $t0;
my $growth = vm_hwm_bytes($big_pid) - $hwm_before;
$nats->thaw;
like($big->{stderr}, qr/could not publish the report to NATS JetStream/,
	'frozen server: a 9 MB publish fails after the timeout');
$big->{stderr} = '';
cmp_ok($took, '<', 10, sprintf('frozen server: within a bound (%.1f s)', $took));
cmp_ok($growth, '<', 40 * 1024 * 1024,
	sprintf('frozen server: the backend grew by %.0f MB at its peak, not by a copy per slice',
		$growth / 1024 / 1024));
like($big->query_safe(sprintf($publish, 'thawed', 'thawed')), qr/^agog_features_backend\.\d+$/,
	'thawed: the same session publishes again');
$big->quit;

# --- a session's end closes its connection without waiting ----------------------
# The time from a session's client leaving to its backend being gone: with
# nats.c's own close of the thread-less connection that is half a second.
my @exit_ms;
for my $i (1 .. 5)
{
	my $s = $node->background_psql('postgres');
	my $p = $s->query_safe('SELECT pg_backend_pid()');
	is($s->query_safe(sprintf($fetch, 0)), 'report 0', "session $i fetches");
	$s->quit;
	my $t = Time::HiRes::time();
	usleep(5_000) while -d "/proc/$p" && Time::HiRes::time() - $t < 10;
	push @exit_ms, (Time::HiRes::time() - $t) * 1000;
}
my @sorted = sort { $a <=> $b } @exit_ms;
cmp_ok($sorted[2], '<', 250,
	sprintf('a session that used NATS ends promptly (median %.0f ms; %s)',
		$sorted[2], join(', ', map { sprintf('%.0f', $_) } @exit_ms)));

$bg->quit;
$node->stop;
$nats->stop;
done_testing();
