
# Fault suite (issue 3, point 7): publishers with synchronous_commit = off
# and an immediate stop. A commit that was not flushed when PostgreSQL
# stopped vanishes with its report; JetStream must then have no message for
# it: after the restart every message in the streams is a report of the
# outbox, and every published report is in the streams exactly once.
#   A. the publishing sessions SET synchronous_commit = off;
#   B. synchronous_commit = off for the whole cluster (ALTER SYSTEM), as an
#      operator may set it; reports committed after the restart must not be
#      confused with vanished ones either;
#   C. the worker's own records (committed without waiting for the flush)
#      are lost, and their reports resent.
# To give the stop the window of an OS crash or an fsync stall, the WAL
# writer is frozen (SIGSTOP) for 1.5 to 3 s before the immediate stop.

use strict;
use warnings;

use IPC::Run ();
use Time::HiRes ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;
use AgogExactlyOnce;

my $t_start = Time::HiRes::time();
my $seed = $ENV{AGOG_TEST_SEED} // int(rand(1e6));
srand($seed);
note("random seed $seed (set AGOG_TEST_SEED to replay)");

my $nats = AgogNatsTest::NatsServer->new(name => 'nats');
$nats->start;
# An immediate stop loses the WAL not yet written out of the WAL buffers.
# Large WAL buffers keep asynchronous commits there while the WAL writer is
# frozen (below).
my $node = AgogExactlyOnce::setup_node('async', $nats->url, wal_buffers => \'16MB');

# A background session committing $n reports, one per transaction (about
# 400 a second), features "$prefix<i>", with synchronous_commit as the
# session has it; a notice every 10 commits tells how far it got.
sub start_publisher
{
	my ($prefix, $n, $set) = @_;
	my $agents = join(', ', map { "'$_->[0]'" } @AgogExactlyOnce::AGENTS);
	my $tasks  = join(', ', map { "'$_->[1]'" } @AgogExactlyOnce::AGENTS);
	my $sql = ($set // '') . "DO \$\$\n"
	  . "DECLARE a text[] := ARRAY[$agents]; t text[] := ARRAY[$tasks];\n"
	  . "BEGIN\n"
	  . "  FOR i IN 1..$n LOOP\n"
	  . "    PERFORM agog_publish_report(a[1 + i % 6], t[1 + i % 6], '$prefix' || i, repeat('a', 500) || i);\n"
	  . "    COMMIT;\n"
	  . "    PERFORM pg_sleep(0.002);\n"
	  . "    IF i % 10 = 0 THEN RAISE NOTICE 'committed %', i; END IF;\n"
	  . "  END LOOP;\n"
	  . "END \$\$;\n";
	my $file = "$PostgreSQL::Test::Utils::tmp_check/publisher_$prefix.err";
	my ($in, $out) = ($sql, '');
	my $h = IPC::Run::start(
		[ $node->installed_command('psql'), '-XAtq', '-d', $node->connstr('postgres') ],
		'<', \$in, '>', \$out, '2>', $file);
	return { h => $h, file => $file };
}

# The highest "committed N" notice the publisher saw.
sub publisher_seen
{
	my ($p) = @_;
	eval { $p->{h}->pump_nb; } unless $p->{done};    # (pump_nb would run a finished harness again)
	my $text = -e $p->{file} ? slurp_file($p->{file}) : '';
	my @n = $text =~ /committed (\d+)/g;
	return @n ? $n[-1] : 0;
}

sub finish_publisher
{
	my ($p) = @_;
	eval { $p->{h}->finish; };
	eval { $p->{h}->kill_kill; };
	$p->{done} = 1;
}

# Run publishers, then stop -m immediate once the worker has published some
# of their reports; start again, wait for the drain, check.
sub scenario
{
	my ($label, $prefix, $set) = @_;
	my @pubs = map { start_publisher("$prefix$_-", 3000, $set) } 1 .. 2;
	ok(AgogExactlyOnce::wait_until(
			sub {
				publisher_seen($_) for @pubs;    # feeds their input
				(AgogExactlyOnce::count_state($node, $prefix, 'published') // 0) >= 200;
			},
			30, 0.02),
		"$label: the worker is publishing while the publishers commit")
	  or diag('publisher errors: ' . join(' / ', map { slurp_file($_->{file}) } @pubs));
	# Freeze the WAL writer (as an fsync stall would): asynchronous commits
	# stay in the WAL buffers; a synchronous commit still writes and flushes
	# them itself. Then stop -m immediate a random 1.5 to 3 s later.
	my $walwriter = $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'walwriter'");
	ok($walwriter =~ /^\d+$/ && kill('STOP', $walwriter), "$label: WAL writer (pid $walwriter) frozen");
	my $until = Time::HiRes::time() + 1.5 + rand(1.5);
	while (Time::HiRes::time() < $until)
	{
		publisher_seen($_) for @pubs;
		Time::HiRes::sleep(0.01);
	}
	my $published_before = AgogExactlyOnce::count_state($node, $prefix, 'published');
	$node->stop('immediate');    # the postmaster SIGKILLs the frozen WAL writer after 5 s
	kill('CONT', $walwriter);
	note("$label: $published_before reports marked published just before the stop");
	finish_publisher($_) for @pubs;
	my @seen = map { publisher_seen($_) } @pubs;
	$node->start;
	my $rows = $node->safe_psql('postgres',
		"SELECT count(*) FILTER (WHERE starts_with(feature, '${prefix}1-')) || ' ' || "
		  . "count(*) FILTER (WHERE starts_with(feature, '${prefix}2-')) FROM agog_nats.outbox");
	my @rows = split / /, $rows;
	note("$label: the publishers saw at least @seen commits; the outbox kept @rows reports after the restart");
	ok(AgogExactlyOnce::wait_until(sub { (AgogExactlyOnce::streams_ok($node) // 0) == 6 }, 30),
		"$label: after the restart the worker is back with its streams");
	ok(AgogExactlyOnce::wait_drained($node, $prefix, 40), "$label: the remaining reports are published within 40 s");
	return AgogExactlyOnce::check(node => $node, nats => $nats, prefix => $prefix, name => $label);
}

# --- A. the publishers' sessions are asynchronous ------------------------------------
scenario('A: SET synchronous_commit = off, immediate stop', 'aca', "SET synchronous_commit = off;\n");

# --- B. the whole cluster is asynchronous ---------------------------------------------
$node->safe_psql('postgres', "ALTER SYSTEM SET synchronous_commit = off; SELECT pg_reload_conf();");
scenario('B: cluster-wide synchronous_commit = off, immediate stop', 'acb');

# Reports committed after the restart get fresh message ids: none is taken
# for a vanished report's message already in JetStream.
AgogExactlyOnce::commit_reports($node, 'acc-', 300, txns => 3);
ok(AgogExactlyOnce::wait_drained($node, 'acc-', 30), 'B: reports committed after the restart are published');
AgogExactlyOnce::check(node => $node, nats => $nats, prefix => 'acc-', name => 'B: after the restart',
	expect => 300);

# --- C. the worker's records are lost -------------------------------------------------
# The worker commits the record of a batch (published, at which sequence)
# without waiting for the WAL flush (flush_outcomes); only its claim waits.  With the WAL
# writer frozen, records stay in the WAL buffers until the next claim's
# commit flushes them: the records of the last batches before an immediate
# stop are lost.  Their reports are then claimed again and resent, and
# JetStream, within its duplicate window, acknowledges each at the sequence
# it already holds.  Reports committed synchronously (they must not vanish
# themselves), and the WAL writer frozen before they commit.
$node->safe_psql('postgres', "ALTER SYSTEM RESET synchronous_commit; SELECT pg_reload_conf();");
my $walwriter = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'walwriter'");
ok($walwriter =~ /^\d+$/ && kill('STOP', $walwriter), "C: WAL writer (pid $walwriter) frozen");
AgogExactlyOnce::commit_reports($node, 'acr-', 60, txns => 3);
ok(AgogExactlyOnce::wait_drained($node, 'acr-', 30), 'C: the 60 reports are marked published before the stop');
$node->stop('immediate');
kill('CONT', $walwriter);
$node->start;
ok(AgogExactlyOnce::wait_drained($node, 'acr-', 30), 'C: after the restart all 60 are published within 30 s');
# Each was claimed once before the stop; a lost record means a second claim.
my $reclaimed = $node->safe_psql('postgres',
	"SELECT count(*) FROM agog_nats.outbox WHERE starts_with(feature, 'acr-') AND attempts > 1");
cmp_ok($reclaimed, '>', 0,
	"C: the stop lost the records of the last batch: $reclaimed of the 60 were claimed again");
my $c = AgogExactlyOnce::check(node => $node, nats => $nats, prefix => 'acr-', name => 'C: records lost',
	expect => 60);
is($c->{duplicates}, $reclaimed,
	"C: each report whose record was lost was acknowledged by JetStream as a duplicate ($c->{duplicates})");

$node->stop;
$nats->stop;
note(sprintf('140_async_commit took %.1f s', Time::HiRes::time() - $t_start));
done_testing();
