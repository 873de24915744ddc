
# The background worker's life: it provisions the six agent streams with the
# seed's configuration, follows agog_nats.duplicate_window and agog_nats.url
# on SIGHUP, puts the streams back after the server restarts on an empty
# store, logs an outage once (not once per attempt), stops promptly on
# SIGTERM (also while it connects to a frozen server) and is restarted, and
# exits with code 1 (at once) on a fault so that the postmaster restarts it.
# A backend's cached connection follows agog_nats.url too.

use strict;
use warnings;

use Time::HiRes qw(usleep);
use Time::Local ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;

my $NS_PER_S = 1_000_000_000;

my $nats1 = AgogNatsTest::NatsServer->new(name => 'nats1');
$nats1->start;
my $node = AgogNatsTest::new_node('main', $nats1);
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION agog_nats');

sub status { return AgogNatsTest::worker_status($node); }

# Poll until the worker is connected to $url with every stream in place and
# (if given) streams checked after epoch $after and a pid other than $not_pid.
sub worker_ready
{
	my (%c) = @_;
	my $st = status();
	return 0 unless $st->{pid} && $st->{connected} && ($st->{streams_ok} // 0) == 6;
	return 0 if defined $c{url} && ($st->{server} // '') ne $c{url};
	return 0 if defined $c{not_pid} && $st->{pid} == $c{not_pid};
	return 0
	  if defined $c{after} && ($st->{streams_checked_at} // 0) <= $c{after};
	return 1;
}

# "2026-01-02 03:04:05.678" (a log line's time, UTC) as epoch seconds.
sub log_time
{
	my ($t) = @_;
	return 0 unless defined $t;
	my ($y, $mo, $d, $h, $mi, $sec) = $t =~ /^(\d+)-(\d+)-(\d+) (\d+):(\d+):([\d.]+)$/
	  or return 0;
	return Time::Local::timegm(0, $mi, $h, $d, $mo - 1, $y) + $sec;
}

sub sql_now { return $node->safe_psql('postgres', 'SELECT extract(epoch FROM clock_timestamp())'); }

# Lines of $text matching the worker's "NATS is unreachable" messages.
sub outage_lines
{
	my ($text) = @_;
	return grep { /agog_nats worker (could not connect to NATS|lost its NATS connection)/ }
	  split /\n/, $text;
}

# --- worker running, six streams with the seed's configuration ----------------
ok(AgogNatsTest::wait_for(sub { worker_ready(url => $nats1->url) }, 30),
	'worker connected to nats1 with six streams in place within 30 s')
  or diag(explain(status()));
my $st = status();
like($st->{pid}, qr/^\d+$/, 'agog_worker_status() shows the worker pid');
is($node->safe_psql('postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE pid = $st->{pid} AND backend_type = 'agog_nats worker'"),
	'1', 'the pid is the agog_nats worker process');
is($st->{streams_failed}, 0, 'no stream failed');

my @problems;
ok(AgogNatsTest::wait_for(sub { @problems = AgogNatsTest::builtin_stream_problems($nats1); !@problems }, 10),
	'six streams in JetStream with the seed configuration and a 2 min duplicate window')
  or diag(join("\n", @problems));
my $jsz = $nats1->jsz;
my @names = sort map { $_->{name} } map { @{ $_->{stream_detail} || [] } }
  @{ $jsz->{account_details} || [] };
is_deeply(\@names, [ sort(AgogNatsTest::builtin_streams(), 'agog_notices', 'agog_tasks') ],
	'exactly the six agent streams and the two workflow streams exist');
is_deeply($nats1->stream_info('agog_features_research')->{config}{subjects},
	['agog.deliverables.cynthia.>'], 'research stream captures agog.deliverables.cynthia.>');

# --- an idle worker sleeps -----------------------------------------------------
# With no task scheduled the orchestration step runs about once a second (its
# poll), and a claim of the outbox about as often.  The step once answered "due
# now" when no task was scheduled, and the worker then woke every 10 ms to run
# it and claim twice: about 100 steps and 200 claims a second, at rest.
$node->safe_psql('postgres', "ALTER SYSTEM SET track_functions = 'pl'; SELECT pg_reload_conf();");
sub idle_calls
{
	return $node->safe_psql('postgres',
		"SELECT coalesce(sum(calls) FILTER (WHERE funcname = 'orchestrate'), 0) || ' ' || "
		  . "coalesce(sum(calls) FILTER (WHERE funcname = 'claim_outbox'), 0) "
		  . "FROM pg_stat_user_functions WHERE schemaname = 'agog_nats'");
}
# the worker flushes its function counts at most once a second: settle first
usleep(2_500_000);
my ($steps0, $claims0) = split / /, idle_calls();
my $t_idle = Time::HiRes::time();
usleep(4_000_000);
my ($steps1, $claims1) = split / /, idle_calls();
my $idle_s = Time::HiRes::time() - $t_idle;
note(sprintf('idle worker over %.1f s: %d orchestration steps, %d claims',
		$idle_s, $steps1 - $steps0, $claims1 - $claims0));
cmp_ok($steps1 - $steps0, '>=', 1, 'an idle worker still runs its orchestration step (its poll)');
cmp_ok($steps1 - $steps0, '<=', 3 * $idle_s + 3,
	'an idle worker runs the orchestration step about once a second, not every 10 ms');
cmp_ok($claims1 - $claims0, '<=', 3 * $idle_s + 3,
	'an idle worker claims from the outbox about once a second, not every 10 ms');

# --- a trickle: one claim a report, not two -------------------------------------
# Reports committed one at a time, each waking the worker on its own: each wake-up
# claims once.  The worker once drained before the orchestration check on every
# wake-up, and then again in the outbox's own drain, which found nothing: two
# claims (two transactions) for each report that trickled in.
my $trickle = 40;
usleep(1_500_000);
my (undef, $claims_t0) = split / /, idle_calls();
for my $i (1 .. $trickle)
{
	$node->safe_psql('postgres',
		"SELECT agog_publish_report('roy', 'backend', 'trickle', 'report $i')");
	usleep(30_000);
}
ok(AgogNatsTest::wait_for(
		sub {
			$node->safe_psql('postgres',
				"SELECT count(*) FROM agog_nats.outbox WHERE feature = 'trickle' AND state = 'published'"
			) == $trickle;
		},
		20),
	"the $trickle trickled reports are published");
usleep(1_500_000);
my (undef, $claims_t1) = split / /, idle_calls();
note(sprintf('%d reports committed one at a time: %d claims',
		$trickle, $claims_t1 - $claims_t0));
cmp_ok($claims_t1 - $claims_t0, '<=', 1.5 * $trickle,
	'a report that trickles in costs the worker one claim, not two');
$node->safe_psql('postgres', "ALTER SYSTEM RESET track_functions; SELECT pg_reload_conf();");

# --- duplicate_window follows a reload -----------------------------------------
$node->safe_psql('postgres',
	"ALTER SYSTEM SET agog_nats.duplicate_window = '5s'; SELECT pg_reload_conf();");
ok(AgogNatsTest::wait_for(
		sub {
			@problems = AgogNatsTest::builtin_stream_problems($nats1,
				duplicate_window => 5 * $NS_PER_S);
			!@problems;
		},
		20),
	'after SIGHUP the worker updates all six streams to a 5 s duplicate window')
  or diag(join("\n", @problems));
like(AgogNatsTest::log_since($node),
	qr/agog_nats updated JetStream stream "agog_features_research" to match/,
	'the update is logged');

# --- outage, then the server comes back on an empty store -----------------------
$st = status();
my $reconnects0 = $st->{reconnects};
my $pid0        = $st->{pid};
my $off         = AgogNatsTest::log_offset($node);
my $t_down      = Time::HiRes::time();
$nats1->stop;
ok(AgogNatsTest::wait_for(sub { !status()->{connected} }, 10),
	'worker reports disconnected within 10 s of nats1 stopping');
# keep NATS down for about 6 s (this is the outage, not an assertion)
my $rest = 6 - (Time::HiRes::time() - $t_down);
usleep(int($rest * 1e6)) if $rest > 0;
my $outage_log = AgogNatsTest::log_since($node, $off);
my @lines = outage_lines($outage_log);
cmp_ok(scalar(@lines), '>=', 1, 'the outage is logged');
cmp_ok(scalar(@lines), '<=', 2, 'the outage is logged once per change of state, not per attempt')
  or diag(join("\n", @lines));

$nats1->wipe_store;
$nats1->start;
my $t_up = Time::HiRes::time();
ok(AgogNatsTest::wait_for(sub { !AgogNatsTest::builtin_stream_problems($nats1, duplicate_window => 5 * $NS_PER_S) }, 15),
	'after a restart on an empty store the six streams are back within 15 s')
  or diag(join("\n", AgogNatsTest::builtin_stream_problems($nats1, duplicate_window => 5 * $NS_PER_S)));
note(sprintf('streams back %.2f s after nats1 listened again', Time::HiRes::time() - $t_up));
ok(AgogNatsTest::wait_for(sub { worker_ready(url => $nats1->url) }, 15),
	'worker connected again with six streams');
$st = status();
cmp_ok($st->{reconnects}, '>', $reconnects0, 'agog_worker_status().reconnects increased');
is($st->{pid}, $pid0, 'the same worker process rode out the outage');
like(AgogNatsTest::log_since($node, $off), qr/agog_nats worker reconnected to NATS at nats:\/\/127\.0\.0\.1:${\ $nats1->port}/,
	'the reconnect is logged');

# --- SIGHUP: agog_nats.url changes to a second server ---------------------------
my $nats2 = AgogNatsTest::NatsServer->new(name => 'nats2');
$nats2->start;
# A session that already holds a connection to nats1.
my $bg = $node->background_psql('postgres');
like($bg->query_safe(
		"SELECT agog_publish_report_now('cynthia', 'research', 'switch', 'to nats1')"),
	qr/^agog_features_research\.\d+$/, 'a session publishes to nats1 (its connection is cached)');
my $research1 = $nats1->stream_info('agog_features_research')->{state}{messages};
$off = AgogNatsTest::log_offset($node);
$node->safe_psql('postgres',
	"ALTER SYSTEM SET agog_nats.url = '" . $nats2->url . "'; SELECT pg_reload_conf();");
ok(AgogNatsTest::wait_for(sub { worker_ready(url => $nats2->url) }, 20),
	'after SIGHUP the worker is connected to nats2 (server shows its port)')
  or diag(explain(status()));
like(status()->{server}, qr/:${\ $nats2->port}$/, 'agog_worker_status().server has nats2\'s port');
ok(AgogNatsTest::wait_for(sub { !AgogNatsTest::builtin_stream_problems($nats2, duplicate_window => 5 * $NS_PER_S) }, 15),
	'the six streams appear in nats2')
  or diag(join("\n", AgogNatsTest::builtin_stream_problems($nats2, duplicate_window => 5 * $NS_PER_S)));
is(status()->{pid}, $pid0, 'the same worker process switched servers');
like(AgogNatsTest::log_since($node, $off), qr/agog_nats\.url changed, reconnecting to NATS/,
	'the url change is logged');
like($bg->query_safe(
		"SELECT agog_publish_report_now('cynthia', 'research', 'switch', 'to nats2')"),
	qr/^agog_features_research\.1$/,
	'after the reload the same session publishes to nats2 (first message of its stream)');
is($nats2->stream_info('agog_features_research')->{state}{messages}, 1,
	'... and the message is in nats2');
is($nats1->stream_info('agog_features_research')->{state}{messages}, $research1,
	'... not in nats1');
$bg->quit;

# --- SIGHUP to a server that is down: connect failures are logged once ----------
$nats1->stop;
$off = AgogNatsTest::log_offset($node);
my $t_switch = Time::HiRes::time();
$node->safe_psql('postgres',
	"ALTER SYSTEM SET agog_nats.url = '" . $nats1->url . "'; SELECT pg_reload_conf();");
ok(AgogNatsTest::wait_for(sub { my $s = status(); !$s->{connected} && defined $s->{last_error} }, 10),
	'worker pointed at a stopped server reports disconnected with a last error');
$rest = 6 - (Time::HiRes::time() - $t_switch);
usleep(int($rest * 1e6)) if $rest > 0;
@lines = outage_lines(AgogNatsTest::log_since($node, $off));
cmp_ok(scalar(@lines), '>=', 1, 'the failed connects are logged');
cmp_ok(scalar(@lines), '<=', 2, 'failed connects are logged once, not per attempt (~6 s of retries)')
  or diag(join("\n", @lines));
$nats1->start;
ok(AgogNatsTest::wait_for(sub { worker_ready(url => $nats1->url) }, 15),
	'worker connects within 15 s once the server is up');

# --- SIGTERM: the worker stops within 1 s and is started again -----------------
$st = status();
my $old_pid = $st->{pid};
$off = AgogNatsTest::log_offset($node);
my $t_term = Time::HiRes::time();
kill 'TERM', $old_pid;
my $gone = 0;
while (Time::HiRes::time() - $t_term < 5)
{
	if (!kill(0, $old_pid)) { $gone = 1; last; }
	usleep(20_000);
}
my $stop_s = Time::HiRes::time() - $t_term;
ok($gone, 'the worker process exits after SIGTERM');
cmp_ok($stop_s, '<', 1.0, sprintf('... within 1 s (%.3f s)', $stop_s));
my $t_restart = Time::HiRes::time();
ok(AgogNatsTest::wait_for(sub { worker_ready(not_pid => $old_pid, url => $nats1->url) }, 12),
	'a new worker (another pid) starts and connects within 12 s');
note(sprintf('new worker ready %.2f s after the old one exited', Time::HiRes::time() - $t_restart));
my $log = AgogNatsTest::log_since($node, $off);
like($log, qr/agog_nats worker shutting down/, 'the worker logs its shutdown');
like($log, qr/background worker "agog_nats worker" \(PID $old_pid\) exited with exit code 1/,
	'it exits with code 1 (so the postmaster restarts it)');

# --- SIGTERM while the worker connects to a frozen server ----------------------
# The connect is bounded by agog_nats.timeout_ms (10 s here); SIGTERM must
# still end the worker within 1 s (the worker's contract: stop within a slice).
$nats1->freeze;
$st      = status();
$old_pid = $st->{pid};
$off     = AgogNatsTest::log_offset($node);
$node->safe_psql('postgres',
	"ALTER SYSTEM SET agog_nats.timeout_ms = '10s'; "
	  . "ALTER SYSTEM SET agog_nats.url = 'nats://localhost:${\ $nats1->port}'; "
	  . 'SELECT pg_reload_conf();');
ok(AgogNatsTest::wait_for(
		sub { AgogNatsTest::log_since($node, $off) =~ /agog_nats\.url changed, reconnecting to NATS/ },
		10),
	'frozen server: the worker starts connecting to the new url');
usleep(500_000);    # let it be well inside the connect (shapes the scenario)
$t_term = Time::HiRes::time();
kill 'TERM', $old_pid;
$gone = 0;
while (Time::HiRes::time() - $t_term < 15)
{
	if (!kill(0, $old_pid)) { $gone = 1; last; }
	usleep(20_000);
}
$stop_s = Time::HiRes::time() - $t_term;
ok($gone, 'frozen server: the worker exits after SIGTERM');
cmp_ok($stop_s, '<', 1.0,
	sprintf('frozen server: SIGTERM during a connect ends the worker within 1 s (%.3f s)', $stop_s));
$nats1->thaw;
$node->safe_psql('postgres',
	'ALTER SYSTEM RESET agog_nats.timeout_ms; '
	  . "ALTER SYSTEM SET agog_nats.url = '" . $nats1->url . "'; SELECT pg_reload_conf();");
ok(AgogNatsTest::wait_for(sub { worker_ready(not_pid => $old_pid, url => $nats1->url) }, 20),
	'after the thaw a new worker connects to nats1');

# --- fault: an SQL error in the stream check ends the worker with exit code 1 ---
$st      = status();
$old_pid = $st->{pid};
$off     = AgogNatsTest::log_offset($node);
$node->safe_psql('postgres', q{
	ALTER TABLE agog_nats.agents RENAME COLUMN description TO descr;
	-- wakes the worker: the statement trigger fires for no rows too
	DELETE FROM agog_nats.agents WHERE agent = 'nobody';});
ok(AgogNatsTest::wait_for(
		sub {
			AgogNatsTest::log_since($node, $off) =~
			  /background worker "agog_nats worker" \(PID $old_pid\) exited with exit code 1/;
		},
		15),
	'a failing stream check ends the worker with exit code 1');
$log = AgogNatsTest::log_since($node, $off);
like($log, qr/ERROR:  column "description" does not exist/, 'the fault is logged');
# The worker's exit must not wait on NATS: from its ERROR to the postmaster's
# "exited" line, by the log's millisecond timestamps.
my ($t_err)  = $log =~ /^(\S+ \S+) UTC \[$old_pid\] ERROR:/m;
my ($t_exit) = $log =~ /^(\S+ \S+) UTC \[\d+\] LOG:  background worker "agog_nats worker" \(PID $old_pid\) exited/m;
ok(defined $t_err && defined $t_exit, 'the log has the worker\'s ERROR and its exit');
my $exit_delay = defined $t_err && defined $t_exit ? log_time($t_exit) - log_time($t_err) : 999;
cmp_ok($exit_delay, '<', 0.5,
	sprintf('after the fault the worker exits at once (%.3f s from its ERROR to its exit)', $exit_delay));
$node->safe_psql('postgres',
	'ALTER TABLE agog_nats.agents RENAME COLUMN descr TO description');
my $t_fixed = sql_now();
ok(AgogNatsTest::wait_for(sub { worker_ready(not_pid => $old_pid, after => $t_fixed) }, 25),
	'after the fix a new worker connects and checks all six streams')
  or diag(explain(status()));
ok(!AgogNatsTest::builtin_stream_problems($nats1, duplicate_window => 5 * $NS_PER_S),
	'the streams are in place');

# --- no crash ----------------------------------------------------------------
$log = AgogNatsTest::log_since($node);
unlike($log, qr/terminated by signal|server process .* was terminated/,
	'no process of the node crashed');
unlike($log, qr/PANIC/, 'no PANIC');
ok(eval { $node->stop; 1 }, 'the node stops cleanly') or diag($@);
unlike(AgogNatsTest::log_since($node), qr/terminated by signal/, 'no crash at shutdown');

$nats1->stop;
$nats2->stop;
done_testing();
