
# Agents that speak only NATS (issue 5, point 4), with the built-in NATS
# client of AgogNatsTest and nothing of PostgreSQL:
#   - a one-stage pipeline for agent jen: the tiny task notice arrives on
#     agog.tasks.jen.<feature> (subscription, and the agog_tasks stream by
#     direct get) with every field, a few hundred bytes;
#   - the agent publishes a seed-format report to
#     agog.deliverables.jen.frontend.<feature> and the seed's completion
#     notice to agog.notices.jen.<feature>: the workflow completes, woken by
#     the notice (latency measured over five workflows);
#   - the same notice sent again is applied once;
#   - malformed notices land in agog_nats.bad_notices with their error and
#     are acknowledged, not redelivered (durable consumer agog_nats_worker);
#   - acknowledged only after commit: (A) with agog_nats.notices renamed
#     the apply fails; the notice must come back and be applied once after
#     the table is renamed back; (B) the same with agog_nats.bad_notices
#     renamed too.  The worker's transaction fails: it logs a warning, puts
#     the notice back and goes on (it used to exit 1 and be restarted).

use strict;
use warnings;

use JSON::PP;
use Time::HiRes ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;
use AgogWorkflowTest;

my $t_start = Time::HiRes::time();

my ($nats, $node) = AgogWorkflowTest::setup('wfnats');
is($node->safe_psql('postgres',
		q{SELECT agog_define_pipeline('solo', '[{"stage": "build", "agent": "jen"}]', 'one stage for jen')}),
	1, 'one-stage pipeline for jen defined');

sub q1 { return $node->safe_psql('postgres', $_[0]); }

# The seed's report and completion notice of jen for $feature.
sub report_body { return AgogWorkflowTest::jen_report(@_); }
sub notice_body { return AgogWorkflowTest::jen_notice(@_); }
sub js_publish { return AgogWorkflowTest::js_publish($nats, @_); }

sub consumer { return AgogWorkflowTest::consumer_info($nats, 'agog_notices', 'agog_nats_worker'); }

# The durable consumer has acknowledged every message of agog_notices.
sub consumer_settled
{
	my $ci = consumer() or return 0;
	my $si = $nats->js_api('STREAM.INFO.agog_notices', '', 5) or return 0;
	return $ci->{num_ack_pending} == 0 && $ci->{num_pending} == 0
	  && $ci->{ack_floor}{stream_seq} == $si->{state}{last_seq};
}

sub task_of
{
	my ($wf) = @_;
	return q1("SELECT id FROM agog_nats.tasks WHERE workflow_id = $wf");
}

sub wf_state
{
	my ($wf) = @_;
	return AgogWorkflowTest::try_query($node, "SELECT state FROM agog_nats.workflows WHERE id = $wf") // '';
}

# --- the tiny task notice ------------------------------------------------------------
my $sub = AgogWorkflowTest::subscribe($nats, 'agog.tasks.jen.>');
my $wf = q1(q{SELECT agog_start_workflow('nats-1', 'solo')});
my $msg = AgogWorkflowTest::next_msg($sub, 10);
ok($msg, 'a task notice arrives on agog.tasks.jen.> within 10 s');
close $sub;
$msg //= { subject => '', headers => {}, body => '{}' };
is($msg->{subject}, 'agog.tasks.jen.nats-1', 'on agog.tasks.jen.nats-1');
my $task = task_of($wf);
my $n = eval { JSON::PP->new->decode($msg->{body}) } // {};
note("task notice ($msg->{subject}, " . length($msg->{body}) . " bytes): $msg->{body}");
is_deeply(
	{ map { $_ => $n->{$_} } qw(workflow task stage agent taskType feature attempt report_subject notice_subject) },
	{
		workflow       => $wf,
		task           => $task,
		stage          => 'build',
		agent          => 'jen',
		taskType       => 'frontend',
		feature        => 'nats-1',
		attempt        => 1,
		report_subject => 'agog.deliverables.jen.frontend.nats-1',
		notice_subject => 'agog.notices.jen.nats-1'
	},
	'the notice names workflow, task, stage, agent, taskType, feature, attempt and both subjects');
is_deeply($n->{inputs}, [], 'inputs: none for a first stage');
like($n->{deadline} // '', qr/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/, 'deadline is ISO 8601 UTC with milliseconds');
is(q1("SELECT to_char(deadline AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') FROM agog_nats.tasks WHERE id = $task"),
	$n->{deadline} // '', 'deadline is the task\'s deadline');
is(join(',', sort keys %$n),
	'agent,attempt,deadline,feature,inputs,notice_subject,report_subject,stage,task,taskType,workflow',
	'and nothing else');
cmp_ok(length($msg->{body}), '<', 1024, 'a few hundred bytes (' . length($msg->{body}) . ')');
is($msg->{headers}{'Nats-Msg-Id'},
	q1(q{SELECT msg_id FROM agog_nats.outbox WHERE kind = 'task' AND subject = 'agog.tasks.jen.nats-1'}),
	'its Nats-Msg-Id is the outbox row\'s message id');
my $dg = $nats->request_msg('$JS.API.DIRECT.GET.agog_tasks', '{"last_by_subj":"agog.tasks.jen.nats-1"}', 5);
is($dg && $dg->{body}, $msg->{body}, 'the agog_tasks stream holds the same notice (direct get, last by subject)');
is($dg && $dg->{headers}{'Nats-Msg-Id'}, $msg->{headers}{'Nats-Msg-Id'}, 'with the same Nats-Msg-Id');

# --- report and completion notice over NATS; latency ---------------------------------------
my (@latency_ms, @apply_ms);
my @nats_wfs = ($wf);
for my $i (1 .. 5)
{
	my $feature = "nats-$i";
	if ($i > 1)
	{
		push @nats_wfs, q1("SELECT agog_start_workflow('$feature', 'solo')");
	}
	my $w = $nats_wfs[-1];
	ok(AgogNatsTest::wait_for(sub { q1("SELECT state FROM agog_nats.tasks WHERE workflow_id = $w") eq 'dispatched' }, 10),
		"$feature: task dispatched within 10 s");
	my $ack = js_publish("agog.deliverables.jen.frontend.$feature", report_body($feature));
	is($ack && $ack->{stream}, 'agog_features_frontend', "$feature: report stored in agog_features_frontend over plain NATS");
	my $t_pub = Time::HiRes::time();
	my $nack = js_publish("agog.notices.jen.$feature", notice_body($feature));
	is($nack && $nack->{stream}, 'agog_notices', "$feature: completion notice stored in agog_notices");
	ok(AgogNatsTest::wait_for(sub { wf_state($w) eq 'completed' }, 10), "$feature: workflow completed within 10 s");
	my ($done_at, $received_at) = split /\|/, q1(
		"SELECT extract(epoch FROM (SELECT at FROM agog_nats.events WHERE workflow_id = $w AND kind = 'workflow_completed')), "
		  . "extract(epoch FROM (SELECT received_at FROM agog_nats.notices n JOIN agog_nats.tasks t ON t.id = n.task_id WHERE t.workflow_id = $w))");
	push @latency_ms, ($done_at - $t_pub) * 1000 if $done_at;
	push @apply_ms, ($received_at - $t_pub) * 1000 if $received_at;
	is(q1("SELECT report_message_id FROM agog_nats.tasks WHERE workflow_id = $w"),
		$ack ? "agog_features_frontend.$ack->{seq}" : 'no ack',
		"$feature: the task records the report's message id from JetStream");
	is(q1("SELECT source || ' ' || outcome FROM agog_nats.notices n JOIN agog_nats.tasks t ON t.id = n.task_id WHERE t.workflow_id = $w"),
		'nats advanced', "$feature: one notice row, from NATS, advanced");
	ok(AgogNatsTest::wait_for(\&consumer_settled, 10), "$feature: the notice is acknowledged within 10 s");
}
diag(sprintf('NATS completion notice published -> workflow completed: %s ms (p50 %.1f, max %.1f); '
		  . '-> applying transaction started: p50 %.1f ms',
		join(', ', map { sprintf('%.1f', $_) } @latency_ms),
		AgogWorkflowTest::percentile(50, @latency_ms) // -1, AgogWorkflowTest::percentile(100, @latency_ms) // -1,
		AgogWorkflowTest::percentile(50, @apply_ms) // -1));
is(scalar(@latency_ms), 5, 'five latencies measured');
cmp_ok(AgogWorkflowTest::percentile(50, @latency_ms) // 1e9, '<', 500,
	'the worker is woken by a notice: median notice -> completed well under 1 s (< 500 ms; a 1 s poll would give ~500 ms and more)');

# --- the same notice again: applied once ------------------------------------------------
my $bad0 = q1('SELECT count(*) FROM agog_nats.bad_notices');
my $dup = notice_body('nats-1');
ok(js_publish('agog.notices.jen.nats-1', $dup), 'the same notice sent again');
ok(AgogNatsTest::wait_for(\&consumer_settled, 10), 'the duplicate is acknowledged within 10 s');
is(q1("SELECT count(*) FROM agog_nats.notices WHERE task_id = $task"), 1, 'still one row in agog_nats.notices');
is(q1("SELECT count(*) FROM agog_nats.events WHERE task_id = $task AND kind = 'task_completed'"), 1,
	'still one task_completed event');
is(q1('SELECT count(*) FROM agog_nats.bad_notices'), $bad0, 'a duplicate is not a bad notice');

# --- malformed notices: kept with their error, acknowledged ------------------------------
my $malformed_json = notice_body('nats-1');
$malformed_json =~ s/"agent":"jen",//;
ok(js_publish('agog.notices.jen.nats-1', 'not json at all'), 'a notice that is not JSON sent');
ok(js_publish('agog.notices.jen.nats-1', $malformed_json), 'a JSON notice missing "agent" sent');
ok(js_publish('agog.notices.jen.nats-1', '{"status": "complete"}'), 'a JSON notice missing most fields sent');
ok(AgogNatsTest::wait_for(sub { q1('SELECT count(*) FROM agog_nats.bad_notices') == $bad0 + 3 }, 10),
	'the three land in agog_nats.bad_notices within 10 s');
my $bad = q1("SELECT body || ' => ' || error FROM agog_nats.bad_notices WHERE id > (SELECT coalesce(max(id), 0) FROM agog_nats.bad_notices) - 3 ORDER BY id");
note("bad notices:\n$bad");
like($bad, qr/^not json at all => 22P02: invalid input syntax for type json/m, 'not JSON: kept with the JSON error');
like($bad, qr/=> 22023: completion notice is missing "agent"/, 'missing "agent": kept with an error naming the field');
like($bad, qr/^\{"status": "complete"\} => 22023: completion notice is missing "\w+"/m, 'missing fields: kept with an error naming one');
is(q1(q{SELECT count(*) FROM agog_nats.bad_notices WHERE subject = 'agog.notices.jen.nats-1'}), $bad0 + 3,
	'each kept with its subject');
ok(AgogNatsTest::wait_for(\&consumer_settled, 10),
	'the durable consumer agog_nats_worker has nothing pending or unacknowledged');
sleep 3;
is(q1('SELECT count(*) FROM agog_nats.bad_notices'), $bad0 + 3, 'three seconds later: not delivered again');
my $ci = consumer() // {};
is($ci->{num_redelivered}, 0, 'the consumer redelivered nothing');
is($ci->{num_ack_pending}, 0, 'and has no unacknowledged message');
is(wf_state($wf), 'completed', 'the workflow is still completed');

# --- the same notice again after the task was retried: still applied once --------------
# A "failed" notice retries the task; sent again (as a redelivery would send
# it) while the next attempt is dispatched, it is the same notice, and must
# not count as that attempt's failure.
is(q1(q{SELECT agog_define_pipeline('retry1', '[{"stage": "build", "agent": "jen", "max_attempts": 3, "retry_backoff": "0 seconds"}]')}),
	1, 'pipeline retry1 (jen, 3 attempts, no backoff) defined');
my $wr = q1(q{SELECT agog_start_workflow('nats-r1', 'retry1')});
my $tr = task_of($wr);
ok(AgogNatsTest::wait_for(sub { q1("SELECT state || ' ' || attempt FROM agog_nats.tasks WHERE id = $tr") eq 'dispatched 1' }, 10),
	'retry: attempt 1 dispatched');
my $failed = notice_body('nats-r1', status => 'failed', ready_for_next_stage => JSON::PP::false,
	blockers => 'the tests are red');
ok(js_publish('agog.notices.jen.nats-r1', $failed), 'retry: a "failed" notice sent');
ok(AgogNatsTest::wait_for(sub { q1("SELECT state || ' ' || attempt FROM agog_nats.tasks WHERE id = $tr") eq 'dispatched 2' }, 10),
	'retry: the task is retried: attempt 2 dispatched within 10 s');
ok(AgogNatsTest::wait_for(\&consumer_settled, 10), 'retry: the notice is acknowledged');
ok(js_publish('agog.notices.jen.nats-r1', $failed), 'retry: the same "failed" notice sent again');
ok(AgogNatsTest::wait_for(\&consumer_settled, 10), 'retry: the second copy is acknowledged');
Time::HiRes::sleep(0.5);
is(q1("SELECT string_agg(attempt || ' ' || outcome, ', ' ORDER BY attempt) FROM agog_nats.notices WHERE task_id = $tr"),
	'1 retried', 'retry: one notice row (attempt 1, retried): the copy is not applied to attempt 2');
is(q1("SELECT count(*) FROM agog_nats.events WHERE task_id = $tr AND kind = 'task_retry'"), 1,
	'retry: one task_retry event');
ok(AgogNatsTest::wait_for(sub { q1("SELECT state FROM agog_nats.tasks WHERE id = $tr") eq 'dispatched' }, 10),
	'retry: the task is dispatched');
my $att = q1("SELECT attempt FROM agog_nats.tasks WHERE id = $tr");
is($att, 2, 'retry: still at attempt 2');
ok(js_publish('agog.deliverables.jen.frontend.nats-r1', report_body('nats-r1')), 'retry: the report published');
ok(js_publish('agog.notices.jen.nats-r1', notice_body('nats-r1')), 'retry: the completion notice sent');
ok(AgogNatsTest::wait_for(sub { wf_state($wr) eq 'completed' }, 10), 'retry: the workflow completes');
is(q1("SELECT string_agg(attempt || ' ' || outcome, ', ' ORDER BY attempt) FROM agog_nats.notices WHERE task_id = $tr"),
	"1 retried, $att advanced", 'retry: the notices of the task: attempt 1 retried, the last advanced');
is(q1("SELECT count(*) FROM agog_nats.events WHERE task_id = $tr AND kind = 'task_dispatched'"), $att,
	'retry: task_dispatched events = attempts');

# --- acknowledged only after commit ----------------------------------------------------------
# Start a workflow, publish its report; with $tables renamed send its notice,
# see the worker take it; rename back; the notice must be applied once.
sub transient
{
	my ($label, $feature, $renames) = @_;
	my $w = q1("SELECT agog_start_workflow('$feature', 'solo')");
	ok(AgogNatsTest::wait_for(sub { q1("SELECT state FROM agog_nats.tasks WHERE workflow_id = $w") eq 'dispatched' }, 10),
		"$label: task dispatched");
	ok(js_publish("agog.deliverables.jen.frontend.$feature", report_body($feature)), "$label: report published over NATS");
	my $st0 = AgogWorkflowTest::worker_status($node);
	my $off = AgogNatsTest::log_offset($node);
	my $delivered0 = (consumer() // {})->{delivered}{stream_seq} // 0;
	q1(join(';', map { "ALTER TABLE agog_nats.$_ RENAME TO ${_}_x" } @$renames));
	my $t_rename = Time::HiRes::time();
	my $nack = js_publish("agog.notices.jen.$feature", notice_body($feature));
	ok($nack, "$label: completion notice sent while " . join(' and ', @$renames) . ' are renamed');
	ok(AgogNatsTest::wait_for(sub { ((consumer() // {})->{delivered}{stream_seq} // 0) >= ($nack->{seq} // 1e9) }, 10),
		"$label: the worker took the notice from the consumer within 10 s");
	ok(AgogNatsTest::wait_for(
			sub {
				AgogNatsTest::log_since($node, $off) =~ /exited with exit code 1|(ERROR|WARNING):/
				  || !(consumer() // {})->{num_ack_pending};
			},
			10),
		"$label: within 10 s the worker's apply ended (an error logged, or the notice acknowledged)");
	Time::HiRes::sleep(0.5);
	my $ci1 = consumer() // {};
	note("$label: consumer after the failed apply: num_ack_pending $ci1->{num_ack_pending}, "
		  . "ack floor $ci1->{ack_floor}{stream_seq}, delivered $ci1->{delivered}{stream_seq}");
	like(AgogNatsTest::log_since($node, $off),
		qr/WARNING:  agog_nats worker could not apply a completion notice on "agog\.notices\.jen\.$feature"/,
		"$label: the worker's transaction failed, with a warning");
	Time::HiRes::sleep(1);
	unlike(AgogNatsTest::log_since($node, $off), qr/exited with exit code/, "$label: the worker did not exit");
	is((AgogWorkflowTest::worker_status($node) // {})->{pid}, $st0->{pid}, "$label: the same worker runs on");
	cmp_ok($ci1->{num_ack_pending} // 0, '>=', 1,
		"$label: the notice whose apply failed was not acknowledged");
	q1(join(';', map { "ALTER TABLE agog_nats.${_}_x RENAME TO $_" } reverse @$renames));
	is(q1("SELECT count(*) FROM agog_nats.bad_notices WHERE subject = 'agog.notices.jen.$feature'"),
		0, "$label: a valid notice whose apply failed is not recorded as a bad notice")
	  or diag(q1("SELECT error FROM agog_nats.bad_notices WHERE subject = 'agog.notices.jen.$feature'"));
	my $t_back = Time::HiRes::time();
	# AckWait of the durable consumer is 10 s: redelivery comes after it.
	my $lost = 0;
	my $ok = AgogNatsTest::wait_for(
		sub {
			return 1 if wf_state($w) eq 'completed';
			# acknowledged and not applied: it will never come back.  The
			# worker acknowledges after its commit, so the state is read
			# again once the consumer is settled: the apply may have
			# committed between the two reads.
			if (Time::HiRes::time() - $t_back > 5 && consumer_settled())
			{
				return 1 if wf_state($w) eq 'completed';
				$lost = 1;
				return 1;
			}
			return 0;
		},
		90);
	ok($ok && !$lost,
		"$label: after the rename back the notice is redelivered and the workflow completes (within 90 s; AckWait is 10 s)")
	  or diag($lost ? "$label: the notice was acknowledged without being applied: it is lost; the task is "
		  . q1("SELECT state FROM agog_nats.tasks WHERE workflow_id = $w") : "$label: timed out");
	note(sprintf('%s: completed %.1f s after the notice was sent', $label, Time::HiRes::time() - $t_rename)) if $ok && !$lost;
	is(q1("SELECT count(*) FROM agog_nats.notices n JOIN agog_nats.tasks t ON t.id = n.task_id WHERE t.workflow_id = $w"),
		$lost ? 'lost' : 1, "$label: applied once (one row in agog_nats.notices)");
	ok(AgogNatsTest::wait_for(\&consumer_settled, 10), "$label: the consumer ends with nothing pending");
	push @nats_wfs, $w;
	return $w;
}

transient('A', 'nats-t1', ['notices']);
ok(AgogNatsTest::wait_for(sub { AgogWorkflowTest::worker_ready($node) }, 30), 'worker ready after A');
transient('B', 'nats-t2', [ 'notices', 'bad_notices' ]);
ok(AgogNatsTest::wait_for(sub { AgogWorkflowTest::worker_ready($node) }, 30), 'worker ready after B');

# --- the event log of the NATS workflows ---------------------------------------------------
my $ids = join(',', @nats_wfs);
AgogWorkflowTest::check_event_log($node, 'NATS agents', "w.id IN ($ids)", nats_agents => 1, no_retries => 1);

$node->stop;
note(sprintf('220_nats_agents: %.1f s', Time::HiRes::time() - $t_start));
done_testing();
