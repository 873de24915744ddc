
# A three-node JetStream cluster: agog_nats.url lists the three servers and
# agog_nats.stream_replicas = 3.  The worker makes the six streams with three
# replicas; reports committed before and after the server the worker is
# connected to is killed (SIGKILL) are all published, each once, and fetched
# back (agog_fetch_report asks the stream leader when replicas > 1, so it
# never serves the previous report); a fresh backend connects past the dead
# server; the killed server, started again on its store, catches up to the
# same stream state as the two others; killing the research stream's
# leader while reports are committed loses and doubles none on the two
# survivors (the killed leader's own catch-up is nats-server's, see there).

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use AgogNatsTest;

# Three servers, each routing to the other two.
my @names = map { "agog_n$_" } 1 .. 3;
my @route_ports = map { AgogNatsTest::free_port() } 1 .. 3;
my @nats;
for my $i (0 .. 2)
{
	my $routes = join(', ',
		map { "nats-route://127.0.0.1:$route_ports[$_]" } grep { $_ != $i } 0 .. 2);
	push @nats, AgogNatsTest::NatsServer->new(
		name       => $names[$i],
		extra_conf => "server_name: $names[$i]\n"
		  . "cluster {\n    name: agog_cluster\n"
		  . "    listen: 127.0.0.1:$route_ports[$i]\n"
		  . "    routes: [ $routes ]\n}\n");
}
$_->start for @nats;

# The meta group elects a leader once the three see each other.
sub meta_leader
{
	my ($n) = @_;
	my $jsz = eval { $n->monitor_get('/jsz') };
	return $jsz && $jsz->{meta_cluster} ? ($jsz->{meta_cluster}{leader} // '') : '';
}
ok(AgogNatsTest::wait_for(sub { !grep { meta_leader($_) eq '' } @nats }, 30),
	'the three servers form a JetStream cluster with a meta leader');

my $url = join(',', map { $_->url } @nats);
# A stream's new leader is elected several seconds after the old one dies
# (4.5-7.1 s measured here, more than agog_nats.timeout_ms's default 5 s);
# a timeout well above it lets agog_publish_report_now wait for the new
# leader on a slow machine too.
my $node = AgogNatsTest::new_node('cluster', $url, 'agog_nats.stream_replicas' => 3,
	'agog_nats.timeout_ms' => 20000);
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION agog_nats');
ok(AgogNatsTest::wait_for(
		sub { AgogNatsTest::worker_ready($node) },
		30),
	'the worker connects to the cluster and puts the six streams in place');
my @problems = AgogNatsTest::builtin_stream_problems($nats[0], num_replicas => 3);
is_deeply(\@problems, [], 'the six streams have three replicas and the seed\'s limits')
  or diag(join("\n", @problems));

# The number of messages each server holds for a stream ('' if it does not
# show the stream).
sub messages_on
{
	my ($n, $stream) = @_;
	my $s = eval { $n->stream_info($stream) };
	return $s && $s->{state} ? $s->{state}{messages} // 0 : '';
}

# The content of cynthia's research report on $feature; a new stream leader
# may still be in election, so it asks again (30 s at most) until a fetch
# succeeds with a row.
sub fetch_eventually
{
	my ($feature) = @_;
	my $content = '';
	AgogNatsTest::wait_for(
		sub {
			my ($ret, $out) = $node->psql('postgres',
				"SELECT content FROM agog_fetch_report('cynthia', 'research', '$feature')");
			$content = $out // '';
			return $ret == 0 && $content ne '';
		},
		30);
	return $content;
}

my $published_sql = q{SELECT count(*) FILTER (WHERE state = 'published') || '/' || count(*) FROM agog_nats.outbox WHERE kind = 'report'};

# Ten reports committed in one transaction: published, and fetched back.
$node->safe_psql('postgres', q{
	SELECT agog_publish_report('cynthia', 'research', 'before-' || g, 'report before ' || g)
	  FROM generate_series(1, 10) g;});
ok(AgogNatsTest::wait_for(sub { $node->safe_psql('postgres', $published_sql) eq '10/10' }, 30),
	'ten committed reports are published to the replicated stream');
is($node->safe_psql('postgres', q{SELECT content FROM agog_fetch_report('cynthia', 'research', 'before-7')}),
	'report before 7', 'a report is fetched back from the stream leader');
like($node->safe_psql('postgres', q{SELECT agog_publish_report_now('sylvia', 'critique', 'now-1', 'critique now')}),
	qr/^agog_features_critique\.\d+$/, 'agog_publish_report_now publishes to a replicated stream');

# Kill the server the worker is connected to.
my $server = AgogNatsTest::worker_status($node)->{server} // '';
my ($victim) = grep { $_->url eq $server } @nats;
ok($victim, "the worker is connected to one of the three ($server)");
$victim //= $nats[0];
my @alive = grep { $_ != $victim } @nats;
my $since_sql = q{SELECT extract(epoch FROM connected_since) FROM agog_worker_status()};
my $since_before = $node->safe_psql('postgres', $since_sql);
$victim->kill9;

# Reports committed right after the kill wait in the outbox and are all
# published once the worker has moved to another server.
$node->safe_psql('postgres', q{
	SELECT agog_publish_report('cynthia', 'research', 'after-' || g, 'report after ' || g)
	  FROM generate_series(1, 30) g;});
ok(AgogNatsTest::wait_for(sub { $node->safe_psql('postgres', $published_sql) eq '40/40' }, 60),
	'the 30 reports committed after the kill are published too')
  or diag($node->safe_psql('postgres', $published_sql));
my $moved = AgogNatsTest::worker_status($node);
ok($moved->{connected} && ($moved->{server} // '') ne $server,
	'the worker is connected to another server (' . ($moved->{server} // 'none') . ')');
# (The worker usually sees the disconnect apart from the reconnect; this
# checks the result, and covers the case where it sees them together only
# when the timing gives it.)
my $since_after = $node->safe_psql('postgres', $since_sql);
ok($since_after ne '' && $since_after > $since_before,
	"connected_since is the reconnect's time ($since_before, then $since_after)");

# A fresh backend connects past the dead server.
like($node->safe_psql('postgres', q{SELECT agog_publish_report_now('sylvia', 'critique', 'now-2', 'critique after the kill')}),
	qr/^agog_features_critique\.\d+$/, 'a new backend publishes with one server of three dead');
is(fetch_eventually('after-30'), 'report after 30',
	'a report committed after the kill is fetched back');
is($node->safe_psql('postgres', q{SELECT content FROM agog_fetch_report('sylvia', 'critique', 'now-2')}),
	'critique after the kill', 'and so is the report published now after the kill');

# Every report once: 40 messages on the research stream, on both survivors.
ok(AgogNatsTest::wait_for(
		sub { !grep { messages_on($_, 'agog_features_research') ne '40' } @alive }, 30),
	'both surviving servers hold the 40 reports, none twice and none lost')
  or diag(join(', ', map { messages_on($_, 'agog_features_research') } @alive));

# The killed server, started again on its store, catches up.
$victim->start;
ok(AgogNatsTest::wait_for(sub { messages_on($victim, 'agog_features_research') eq '40' }, 60),
	'the restarted server catches up to the 40 reports')
  or diag(messages_on($victim, 'agog_features_research'));
ok(AgogNatsTest::wait_for(
		sub { !grep { messages_on($_, 'agog_features_critique') ne '2' } @nats }, 30),
	'all three hold the two reports published now')
  or diag(join(', ', map { messages_on($_, 'agog_features_critique') } @nats));

# Kill the research stream's leader while reports are being committed: a
# new leader is elected, and every report is stored once.
my $leader_name = '';
AgogNatsTest::wait_for(
	sub {
		my $s = eval { $nats[0]->stream_info('agog_features_research') };
		$leader_name = $s && $s->{cluster} ? ($s->{cluster}{leader} // '') : '';
		return $leader_name ne '';
	},
	30);
my ($leader) = grep { $names[$_] eq $leader_name } 0 .. 2;
ok(defined $leader, "the research stream has a leader ($leader_name)");
$leader //= 0;
$node->safe_psql('postgres', q{
	SELECT agog_publish_report('cynthia', 'research', 'leader-' || g, 'report ' || g)
	  FROM generate_series(1, 10) g;});
$nats[$leader]->kill9;
# Right after the kill the stream has no leader for a moment, and nobody
# answers a publish: agog_publish_report_now waits for the new one (within
# agog_nats.timeout_ms) instead of failing.
my $t0 = time();
like($node->safe_psql('postgres',
		q{SELECT agog_publish_report_now('cynthia', 'research', 'now-3', 'during the election')}),
	qr/^agog_features_research\.\d+$/,
	'agog_publish_report_now right after the stream leader\'s death succeeds');
note(sprintf('the publish waited %.1f s for the new leader', time() - $t0));
$node->safe_psql('postgres', q{
	SELECT agog_publish_report('cynthia', 'research', 'leader-' || g, 'report ' || g)
	  FROM generate_series(11, 20) g;});
ok(AgogNatsTest::wait_for(sub { $node->safe_psql('postgres', $published_sql) eq '60/60' }, 60),
	'reports committed around the stream leader\'s death are all published')
  or diag($node->safe_psql('postgres', $published_sql));
@alive = map { $nats[$_] } grep { $_ != $leader } 0 .. 2;
ok(AgogNatsTest::wait_for(
		sub { !grep { messages_on($_, 'agog_features_research') ne '61' } @alive }, 30),
	'the two survivors hold the 60 reports and the one published now, each once')
  or diag(join(', ', map { messages_on($_, 'agog_features_research') } @alive));
is(fetch_eventually('leader-20'), 'report 20', 'the new leader serves the last report');
$nats[$leader]->start;
# The killed leader comes back into the research stream's group, restoring
# at least the 40 reports it held before the first kill, so that the part
# below runs on three servers.
ok(AgogNatsTest::wait_for(
		sub { (messages_on($nats[$leader], 'agog_features_research') || 0) >= 40 }, 30),
	'the killed leader is back with the research stream');
# It then usually catches up to the 61 within 2-4 s.  Not asserted: Debian
# 12's nats-server 2.9.10 sometimes leaves a leader killed within a
# millisecond of a pipelined publish behind for good (measured: 4 of 217
# such kills with nats-server alone, no PostgreSQL; its debug log shows the
# replayed uncommitted entry refused as "msgid is duplicate"; fixed upstream
# in nats-server 2.9.21 and 2.11, PRs #4365 and #6415), and once in CI it
# stayed at its restored count.  That is the server's own replication of a
# killed replica; what agog_nats sent is checked above: the two survivors
# hold every report exactly once.
if (AgogNatsTest::wait_for(
		sub { !grep { messages_on($_, 'agog_features_research') ne '61' } @nats }, 30))
{
	note('the restarted server caught up to the 61 research reports');
}
else
{
	note('nats-server did not catch the restarted replica up (research messages: '
		  . join(', ', map { "$names[$_] " . messages_on($nats[$_], 'agog_features_research') } 0 .. 2)
		  . '); see the comment above');
}

# Two of three servers down (not the worker's): the streams have no leader
# for as long as they are down, and a publish gets "no responders".  A
# report at its tenth such refusal stays pending (with one replica it would
# be dead), and is published once the servers are back.
my $now_on = AgogNatsTest::worker_status($node)->{server} // '';
my @down = grep { $_->url ne $now_on } @nats;
is(scalar(@down), 2, "two servers other than the worker's ($now_on)");
$_->kill9 for @down;
$node->safe_psql('postgres',
	q{SELECT agog_publish_report('cynthia', 'research', 'quorum-1', 'two of three down')});
like(AgogNatsTest::tenth_refusal($node, 'quorum-1', '%electing a new leader%', 'two of three down', 60, 60),
	qr/^pending 10 /, 'after its tenth "no responders" the report is still pending, not dead');
my $row_sql = q{SELECT state || ' ' || attempts || ' ' || coalesce(last_error, '') FROM agog_nats.outbox WHERE feature = 'quorum-1'};
$_->start for @down;
$node->safe_psql('postgres',
	q{UPDATE agog_nats.outbox SET next_attempt_at = now() WHERE feature = 'quorum-1'});
ok(AgogNatsTest::wait_for(
		sub { $node->safe_psql('postgres', $row_sql) =~ /^published / }, 90),
	'with the servers back the report is published')
  or diag($node->safe_psql('postgres', $row_sql));
is(fetch_eventually('quorum-1'), 'two of three down', 'and fetched back');

unlike(AgogNatsTest::log_since($node), qr/terminated by signal|server process .* was terminated/,
	'no crash');
$node->stop;
$_->stop for @nats;
done_testing();
