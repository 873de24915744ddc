
# Fault suite (issue 3, point 7): the worker dies between publish and
# mark-done.
#   A. 3 x 200 reports; after each commit the worker is killed with SIGKILL
#      while a batch is in flight: JetStream has stored part of it, the
#      PubAcks are still on their way (the proxy delays each direction by
#      120 ms), or the outbox has not recorded them yet. With
#      restart_after_crash on (the default) the postmaster restarts the whole
#      cluster each time; the restarted worker sends the claimed reports
#      again and each ends in JetStream exactly once.
#   B. 2 x 200 reports; PostgreSQL stopped with -m immediate in the same
#      window after each commit, and started again: exactly once.

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
# PostgreSQL::Test::Cluster turns restart_after_crash off; PostgreSQL's
# default, and what this scenario is about, is on.
my $node = AgogExactlyOnce::setup_node('wkill', $proxy->url, restart_after_crash => \'on');
is($node->safe_psql('postgres', 'SHOW restart_after_crash'), 'on', 'restart_after_crash is on');
my @streams = map { "agog_features_$_->[1]" } @AgogExactlyOnce::AGENTS;

# Messages of the six streams, straight from the server; undef on a failure.
sub js_total
{
	my $js = AgogJsClient->new($nats->port, timeout_s => 1);
	my @r = eval { $js->requests([ map { [ "\$JS.API.STREAM.INFO.$_", '' ] } @streams ], 1) };
	$js->close;
	return undef if @r != @streams;
	my $total = 0;
	for my $r (@r)
	{
		return undef unless $r && !defined $r->{status};
		my $i = eval { JSON::PP->new->decode($r->{body}) } or return undef;
		return undef if $i->{error};
		$total += $i->{state}{messages};
	}
	return $total;
}

my $poll = AgogExactlyOnce::Session->new($node);

# Wait until a batch of $prefix is in flight: JetStream has stored new
# messages (more than $floor, its count before this round's commit) and holds
# more messages than the outbox has marked published (overall, so a row
# marked since the last poll cannot fool it). Returns a description, or undef
# on timeout.
sub wait_in_flight
{
	my ($prefix, $floor, $timeout_s) = @_;
	my $desc;
	AgogExactlyOnce::wait_until(
		sub {
			my $r = $poll->query(
				"SELECT count(*) FILTER (WHERE state = 'published'), "
				  . "count(*) FILTER (WHERE state = 'pending' AND starts_with(feature, '$prefix')) "
				  . 'FROM agog_nats.outbox') // return 0;
			my ($pub, $pending) = split /\|/, $r;
			return 0 unless $pending > 0;
			my $js = js_total() // return 0;
			$desc = "JetStream $js messages (was $floor), outbox $pub published, $pending of $prefix pending";
			return $js > $floor && $js > $pub;
		},
		$timeout_s, 0.005);
	return $desc;
}

# Wait for the cluster to answer and the worker to be connected with its six
# streams again.
sub wait_back
{
	my ($timeout_s) = @_;
	return AgogExactlyOnce::wait_until(sub { (AgogExactlyOnce::streams_ok($node) // 0) == 6 }, $timeout_s, 0.2);
}

$proxy->mode('delay', 120);

# --- A. SIGKILL of the worker with acks in flight ------------------------------------
my $log_from = -s $node->logfile;
my @kills;
for my $round (1 .. 3)
{
	# Each round commits 200 more reports, so there is a fresh batch to catch.
	my $floor = js_total();
	AgogExactlyOnce::commit_reports($node, "wk-$round-", 200, size => 1000);
	my $desc = wait_in_flight("wk-$round-", $floor, 40);
	ok($desc, "A$round: a batch is in flight (stored by JetStream, not yet marked)");
	my $pid = AgogExactlyOnce::worker_pid($node);
	ok($pid && kill('KILL', $pid), "A$round: SIGKILL to the worker (pid " . ($pid // '?') . ')');
	push @kills, "A$round: " . ($desc // 'not in flight') . ', killed ' . ($pid // '?');
	note($kills[-1]);
	ok(wait_back(40), "A$round: the cluster restarted and the worker is back with its streams within 40 s")
	  or last;
}
my $log = slurp_file($node->logfile, $log_from);
my @sig9 = $log =~ /background worker "agog_nats worker" \(PID \d+\) was terminated by signal 9/g;
is(scalar @sig9, 3, 'A: the log shows the worker terminated by signal 9 three times');
like($log, qr/all server processes terminated; reinitializing/, 'A: the postmaster reinitialized after the crash');

ok(AgogExactlyOnce::wait_drained($node, 'wk-', 40), 'A: all 600 published within 40 s of the last restart');
my $res = AgogExactlyOnce::check(
	node   => $node,
	nats   => $nats,
	prefix => 'wk-',
	name   => 'A: worker killed three times mid-batch',
	expect => 600);
cmp_ok($res->{duplicates}, '>', 0,
	"A: the kills hit between publish and mark-done ($res->{duplicates} reports were already stored and acked as duplicates on the resend)");

# --- B. immediate stop with acks in flight ---------------------------------------------
for my $round (1 .. 2)
{
	my $floor = js_total();
	AgogExactlyOnce::commit_reports($node, "imm-$round-", 200, size => 1000);
	my $desc = wait_in_flight("imm-$round-", $floor, 40);
	ok($desc, "B$round: a batch is in flight (stored by JetStream, not yet marked)");
	$node->stop('immediate');
	note("B$round: " . ($desc // 'not in flight') . ', stopped -m immediate');
	$poll->query('SELECT 1');    # drop the session's dead connection
	$node->start;
	ok(wait_back(40), "B$round: started again, the worker is back with its streams within 40 s");
}
ok(AgogExactlyOnce::wait_drained($node, 'imm-', 40), 'B: all 400 published within 40 s of the last start');
$res = AgogExactlyOnce::check(
	node   => $node,
	nats   => $nats,
	prefix => 'imm-',
	name   => 'B: PostgreSQL stopped -m immediate twice mid-batch',
	expect => 400);
cmp_ok($res->{duplicates}, '>', 0,
	"B: the stops hit between publish and mark-done ($res->{duplicates} acked as duplicates on the resend)");

# A is still exactly once after B.
AgogExactlyOnce::check(node => $node, nats => $nats, prefix => 'wk-', name => 'A, at the end', expect => 600);

$poll->quit;
$node->stop;
$proxy->stop;
$nats->stop;
note(sprintf('130_worker_kill took %.1f s', Time::HiRes::time() - $t_start));
done_testing();
