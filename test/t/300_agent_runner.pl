
# agog-agent against real servers: usage errors (missing agent, missing or
# unknown command, bad option, bad DSN, unreachable database, unknown agent,
# database without the extension); a two-stage workflow run by two runners
# (the notice on stdin, the input report as a file, the environment, the
# result file, the report in JetStream, the private directory removed); a
# command that fails its first attempt (retried; the blockers carry the end
# of its stderr); bad result files; a command that outlives its deadline
# (stopped with SIGTERM, or SIGKILL when it ignores SIGTERM, before the
# deadline, so that its failed notice arrives); heartbeats keeping a lease
# longer than itself; a notification queued by libpq with the answer to a
# heartbeat (taken at once); --jobs (commands at once) and --once.

use strict;
use warnings;

use Time::HiRes qw(usleep);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;
use AgogAgentTest;

my ($nats, $node, $dir, $cap) = AgogAgentTest::setup();
my $dsn = $node->connstr('postgres');
$ENV{CAPTURE} = $cap;    # for the commands of the runners run by run_agent

sub psql { return $node->safe_psql('postgres', @_); }
sub script { return AgogAgentTest::script($dir, @_); }
sub slurp { return AgogAgentTest::slurp(@_); }

# True while $pid runs (a zombie waiting for init to reap it does not count).
sub alive
{
	my ($pid) = @_;
	my $stat = slurp("/proc/$pid/stat");
	return $stat ne '' && $stat !~ /^\d+ \(.*\) Z /;
}

sub runner
{
	my (%o) = @_;
	return AgogAgentTest::Runner->start(dsn => $dsn, env => { CAPTURE => $cap }, %o);
}

# Stop a runner with SIGTERM; it must exit 0, promptly when idle.
sub stop_ok
{
	my ($r, $what) = @_;
	my $t0 = Time::HiRes::time();
	my $rc = $r->stop(20);
	is($rc, 0, "$what: exits 0 on SIGTERM");
	cmp_ok(Time::HiRes::time() - $t0, '<', 3, "$what: ... within 3 s when idle");
}

# The notices of workflow $wf: "attempt|status|outcome|summary|blockers" per line.
sub notices
{
	my ($wf) = @_;
	return psql(qq{
		SELECT n.attempt || '|' || (n.notice->>'status') || '|' || n.outcome || '|'
		       || (n.notice->>'summary') || '|' || replace(n.notice->>'blockers', E'\\n', '\\n')
		  FROM agog_nats.notices n JOIN agog_nats.tasks t ON t.id = n.task_id
		 WHERE t.workflow_id = $wf ORDER BY n.attempt});
}

# --- usage errors --------------------------------------------------------------
my ($rc, $out) = AgogAgentTest::run_agent(10, '--help');
is($rc, 0, '--help exits 0');
like($out, qr/^Usage: agog-agent --agent NAME \[OPTIONS\] -- COMMAND/m, '--help prints the usage');
like($out, qr/AGOG_RESULT_FILE/, '--help lists the environment variables');

my @cases = (
	[ [ '--', '/bin/true' ], 2, qr/--agent NAME is required/, 'no --agent' ],
	[ [ '--agent', 'jen', '--dsn', $dsn ], 2, qr/no COMMAND given/, 'no command' ],
	[ [ '--agent', 'jen', '--dsn', $dsn, '--', "$dir/no-such-command" ],
		2, qr/command not found or not executable: \S*no-such-command$/m, 'a missing command' ],
	[ [ '--agent', 'jen', '--', 'no-such-command-anywhere' ],
		2, qr/command not found or not executable: no-such-command-anywhere \(searched PATH\)/,
		'a command not on PATH' ],
	[ [ '--agent', 'a.b', '--', '/bin/true' ], 2, qr/agent "a\.b" is not a valid name/, 'a bad agent name' ],
	[ [ '--agent', 'jen', '--jobs', '0', '--', '/bin/true' ], 2, qr/--jobs must be/, '--jobs 0' ],
	[ [ '--agent', 'jen', '--bogus', '--', '/bin/true' ], 2, qr/unknown option "--bogus"/, 'an unknown option' ],
	[ [ '--agent', 'jen', '--dsn', 'nonsense', '--', '/bin/true' ],
		2, qr/invalid --dsn: missing "=" after "nonsense"/, 'a DSN libpq cannot parse' ],
	[ [ '--agent', 'jen', '--dsn', "host=$dir port=1 dbname=postgres", '--', '/bin/true' ],
		1, qr/could not connect to the database given by --dsn: .*No such file or directory/,
		'a DSN naming no server' ],
	[ [ '--agent', 'casper', '--dsn', $dsn, '--', '/bin/true' ],
		2, qr/unknown agent "casper" in database "postgres"/, 'an unknown agent' ],);
psql('CREATE DATABASE noext');
push @cases,
  [ [ '--agent', 'jen', '--dsn', $node->connstr('noext'), '--', '/bin/true' ],
	2, qr/the agog_nats extension is not installed in database "noext"/,
	'a database without the extension' ];
for my $c (@cases)
{
	my ($args, $want_rc, $want_msg, $what) = @$c;
	my $t0 = Time::HiRes::time();
	($rc, $out) = AgogAgentTest::run_agent(20, @$args);
	is($rc, $want_rc, "$what: exit status $want_rc");
	like($out, $want_msg, "$what: a clear message") or diag($out);
	cmp_ok(Time::HiRes::time() - $t0, '<', 10, "$what: at once");
}

# --- success: two stages, two runners, a report handed over as a file ---------
psql(q{SELECT agog_define_pipeline('pair', '[
	{"stage": "research", "agent": "cynthia", "timeout": "60 seconds"},
	{"stage": "critique", "agent": "sylvia", "depends_on": ["research"], "timeout": "60 seconds"}]')});
my $research = script('research.sh', <<'EOS');
cat >"$CAPTURE/research.stdin"
env | grep '^AGOG_' | sort >"$CAPTURE/research.env"
stat -c %a "$AGOG_WORK_DIR" >"$CAPTURE/research.mode"
printf '# Research on %s\n\nPlenty of findings.\n' "$AGOG_FEATURE"
echo "a note on stderr" >&2
cat >"$AGOG_RESULT_FILE" <<JSON
{"summary": "researched it", "complexity": "Low", "files_modified": 3,
 "metadata": {"custom_field": "custom_value"}, "report_metadata": {"files_analyzed": 15}}
JSON
EOS
my $critique = script('critique.sh', <<'EOS');
cat >"$CAPTURE/critique.stdin"
ls "$AGOG_INPUT_DIR" >"$CAPTURE/critique.ls"
echo "$AGOG_INPUTS" >"$CAPTURE/critique.inputs"
echo "$AGOG_WORK_DIR" >"$CAPTURE/critique.dir"
cp "$AGOG_INPUT_DIR/research.md" "$CAPTURE/critique.research.md" || exit 4
cp "$AGOG_INPUT_DIR/research.json" "$CAPTURE/critique.research.json"
echo "critique stderr line" >&2
echo "# Critique"
echo
echo "The research has $(wc -l <"$AGOG_INPUT_DIR/research.md") lines."
EOS
my $r1 = runner(agent => 'cynthia', command => [$research]);
my $r2 = runner(agent => 'sylvia', args => ['--verbose'], command => [$critique]);
ok($r1->wait_log(qr/agent cynthia ready/, 20) && $r2->wait_log(qr/agent sylvia ready/, 20),
	'two runners start and say they are ready');
my $wf = AgogAgentTest::start_workflow($node, 'search-box', 'pair');
is(AgogAgentTest::wait_workflow($node, $wf, 60), 'completed',
	'a two-stage workflow completes with one runner per agent');
is(psql("SELECT string_agg(stage || ':' || state || ':' || attempt, ',' ORDER BY position)
           FROM agog_nats.tasks WHERE workflow_id = $wf"),
	'research:completed:1,critique:completed:1', 'each task completed at its first attempt');
is(psql("SELECT count(*) FROM agog_nats.notices n JOIN agog_nats.tasks t ON t.id = n.task_id
          WHERE t.workflow_id = $wf"), '2', 'one completion notice per task');

my $rtask = psql("SELECT id FROM agog_nats.tasks WHERE workflow_id = $wf AND stage = 'research'");
my $expected = "# Research on search-box\n\nPlenty of findings.\n";
is(psql(qq{SELECT n.notice->>'status' || '|' || (n.notice->>'summary') || '|' || (n.notice->>'complexity')
                  || '|' || (n.notice->>'files_modified') || '|' || (n.notice->>'blockers')
                  || '|' || (n.notice->>'ready_for_next_stage') || '|' || (n.notice->>'nats_channel')
                  || '|' || (n.notice->'metadata'->>'custom_field')
                  || '|' || (n.notice->'metadata'->>'task_id' = '$rtask')
             FROM agog_nats.notices n WHERE n.task_id = $rtask}),
	'complete|researched it|Low|3|None|true|agog.deliverables.cynthia.research.search-box|custom_value|true',
	'the notice carries the fields of the result file, the defaults and the task id');
is(psql(qq{SELECT (n.notice->>'summary') || '|' || (n.notice->>'complexity') || '|'
                  || (n.notice->>'files_modified') || '|' || (n.notice->'metadata'->>'report_bytes')
             FROM agog_nats.notices n JOIN agog_nats.tasks t ON t.id = n.task_id
            WHERE t.workflow_id = $wf AND t.stage = 'critique'}),
	'Critique|Unknown|0|' . length("# Critique\n\nThe research has 3 lines.\n"),
	'without a result file: the summary is the report\'s first heading, complexity Unknown, 0 files');
ok(AgogNatsTest::wait_for(
		sub { psql(q{SELECT count(*) FROM agog_nats.reports WHERE kind = 'report' AND feature = 'search-box'
		                AND state = 'published'}) == 2 },
		15),
	'both reports reach JetStream (the worker has their PubAcks)');
is(psql(qq{SELECT content = \$j\$$expected\$j\$ FROM agog_fetch_report('cynthia', 'research', 'search-box')}),
	't', 'the research report in JetStream is the command\'s stdout');
is(psql(q{SELECT (metadata->>'files_analyzed') || '|' || (metadata->>'stage') || '|'
                 || (metadata->>'runner' ~ '^agog-agent@') || '|' || (metadata->>'attempt')
            FROM agog_fetch_report('cynthia', 'research', 'search-box')}),
	'15|research|true|1', 'its metadata has the result file\'s report_metadata and the runner\'s fields');
is(psql(q{SELECT count(*) FROM agog_nats.outbox WHERE kind = 'report' AND feature = 'search-box'}),
	'2', 'one report published per task');

my $stdin = slurp("$cap/research.stdin");
is(psql("SELECT notice = \$j\$$stdin\$j\$::jsonb FROM agog_nats.tasks WHERE id = $rtask"),
	't', 'the command gets the task notice on stdin');
my %env = map { /^([^=]+)=(.*)$/ ? ($1, $2) : () } split /\n/, slurp("$cap/research.env");
is($env{AGOG_TASK_ID}, $rtask, 'AGOG_TASK_ID');
is($env{AGOG_WORKFLOW_ID}, $wf, 'AGOG_WORKFLOW_ID');
is(join(',', map { $env{$_} // '?' } qw(AGOG_AGENT AGOG_TASK_TYPE AGOG_FEATURE AGOG_STAGE AGOG_ATTEMPT)),
	'cynthia,research,search-box,research,1',
	'AGOG_AGENT, AGOG_TASK_TYPE, AGOG_FEATURE, AGOG_STAGE, AGOG_ATTEMPT');
like($env{AGOG_DEADLINE} // '', qr/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/, 'AGOG_DEADLINE is ISO 8601 UTC');
is($env{AGOG_REPORT_SUBJECT}, 'agog.deliverables.cynthia.research.search-box', 'AGOG_REPORT_SUBJECT');
is($env{AGOG_INPUT_DIR}, "$env{AGOG_WORK_DIR}/inputs", 'AGOG_INPUT_DIR is inputs/ in AGOG_WORK_DIR');
is($env{AGOG_NOTICE_FILE}, "$env{AGOG_WORK_DIR}/notice.json", 'AGOG_NOTICE_FILE');
is($env{AGOG_RESULT_FILE}, "$env{AGOG_WORK_DIR}/result.json", 'AGOG_RESULT_FILE');
is($env{AGOG_INPUTS}, '', 'the first stage has no inputs');
is(slurp("$cap/research.mode"), "700\n", 'the task directory is private (0700)');
ok(!-e $env{AGOG_WORK_DIR}, 'the task directory is removed after the task');

is(slurp("$cap/critique.research.md"), $expected,
	'the next stage reads the research report from a file in AGOG_INPUT_DIR');
is(slurp("$cap/critique.ls"), "research.json\nresearch.md\n", 'inputs: <stage>.md and <stage>.json');
my $cdir = slurp("$cap/critique.dir");
chomp $cdir;
is(slurp("$cap/critique.inputs"), "$cdir/inputs/research.md\n", 'AGOG_INPUTS lists the input files');
like(slurp("$cap/critique.research.json"),
	qr/"subject": "agog\.deliverables\.cynthia\.research\.search-box".*"message_id": "agog_features_research\.\d+"/s,
	'<stage>.json has the subject and the message id');

like($r1->log_text,
	qr/agog-agent\[cynthia\] search-box attempt 1 \(task $rtask\): ok -> advanced, \d+\.\d\d s, report ${\ length($expected)} bytes$/m,
	'one line per task: agent, feature, attempt, outcome, duration, report size');
unlike($r1->log_text, qr/a note on stderr/, 'the command\'s stderr is not echoed by default');
like($r2->log_text, qr/stderr: critique stderr line/, '--verbose echoes the command\'s stderr');
like($r2->log_text, qr/claimed task \d+: critique search-box attempt 1/, '--verbose shows the claim');
stop_ok($r1, 'the cynthia runner');
stop_ok($r2, 'the sylvia runner');

# --- failure and retry: the blockers carry the end of stderr ------------------
psql(q{SELECT agog_define_pipeline('flaky', '[{"stage": "build", "agent": "roy", "max_attempts": 3,
	"retry_backoff": "0 seconds", "timeout": "60 seconds"}]')});
my $flaky = script('flaky.sh', <<'EOS');
cat >/dev/null
if [ "$AGOG_ATTEMPT" = 1 ]; then
    for i in $(seq 1 100); do echo "noise line $i: the quick brown fox jumps over the lazy dog" >&2; done
    echo "FINAL LINE: the build broke" >&2
    exit 3
fi
echo "# Build report (attempt $AGOG_ATTEMPT)"
EOS
my $r3 = runner(agent => 'roy', args => ['--quiet'], command => [$flaky]);
$wf = AgogAgentTest::start_workflow($node, 'flaky-one', 'flaky');
is(AgogAgentTest::wait_workflow($node, $wf, 60), 'completed',
	'a command that fails its first attempt: the stage is retried and completes');
my @n = split /\n/, notices($wf);
is(scalar(@n), 2, 'two notices: the failure and the completion');
my ($a1, $s1, $o1, $sum1, $bl1) = split /\|/, $n[0], 5;
is("$a1|$s1|$o1|$sum1", '1|failed|retried|the command exited with status 3',
	'attempt 1: a failed notice, the task retried');
like($bl1, qr/^the command exited with status 3; stderr: .*FINAL LINE: the build broke$/s,
	'its blockers end with the end of stderr');
(my $blockers = $bl1) =~ s/\\n/\n/g;
unlike($blockers, qr/noise line 1:/, '... only the end of it');
cmp_ok(length($blockers), '<=', 2048 + 60, '... about the last 2 KB');
cmp_ok(length($blockers), '>', 1500, '... not less');
like($n[1], qr/^2\|complete\|advanced\|Build report \(attempt 2\)\|None$/, 'attempt 2 completes the task');
is(psql(q{SELECT count(*) FROM agog_nats.outbox WHERE kind = 'report' AND feature = 'flaky-one'}),
	'1', 'nothing was published for the failed attempt');
like(psql("SELECT detail->>'reason' FROM agog_nats.events WHERE workflow_id = $wf AND kind = 'task_retry'"),
	qr/FINAL LINE: the build broke/, 'the retry event records the reason');
my $log3 = $r3->log_text;
like($log3, qr/warning: flaky-one attempt 1 \(task \d+\): exit 3 -> retried, .*FINAL LINE: the build broke$/m,
	'--quiet: a task that did not complete is still reported, as a warning with stderr\'s last line');
unlike($log3, qr/ok -> advanced|ready/, '--quiet: nothing else');
stop_ok($r3, 'the roy runner');

# --- bad result files and empty reports ---------------------------------------
psql(q{SELECT agog_define_pipeline('picky', '[{"stage": "ui", "agent": "jen", "max_attempts": 6,
	"retry_backoff": "0 seconds", "timeout": "60 seconds"}]')});
my $picky = script('picky.sh', <<'EOS');
cat >/dev/null
case $AGOG_ATTEMPT in
1) echo '# r'; echo '{not json' >"$AGOG_RESULT_FILE" ;;
2) echo '# r'; echo '[1, 2]' >"$AGOG_RESULT_FILE" ;;
3) : ;;
4) echo '# r'; echo '{"files_modified": "two"}' >"$AGOG_RESULT_FILE" ;;
5) echo '# r'; mkfifo "$AGOG_RESULT_FILE" ;;
*) echo '# Picky report'; echo '{"summary": "fine", "files_modified": 2}' >"$AGOG_RESULT_FILE" ;;
esac
EOS
my $r4 = runner(agent => 'jen', command => [$picky]);
$wf = AgogAgentTest::start_workflow($node, 'picky-one', 'picky');
is(AgogAgentTest::wait_workflow($node, $wf, 60), 'completed', 'after five bad results the sixth completes');
@n = split /\n/, notices($wf);
like($n[0], qr/^1\|failed\|retried\|\$AGOG_RESULT_FILE is not valid JSON: invalid input syntax for type json/,
	'a result file that is not JSON fails the attempt, saying so');
like($n[1], qr/^2\|failed\|retried\|\$AGOG_RESULT_FILE must hold a JSON object, not an array/,
	'a result file that is not an object too');
like($n[2], qr/^3\|failed\|retried\|the command exited 0 but wrote no report on its standard output/,
	'exit 0 with an empty stdout too');
like($n[3], qr/^4\|failed\|retried\|could not publish the report and complete the task: completion notice field "files_modified" must be a number/,
	'a mistyped notice field: the transaction is rolled back and the attempt fails with the error');
like($n[4], qr/^5\|failed\|retried\|could not read \$AGOG_RESULT_FILE: not a regular file/,
	'a result file that is a FIFO fails the attempt (it used to block the runner for good)');
like($n[5], qr/^6\|complete\|advanced\|fine\|None$/, 'the sixth attempt completes');
is(psql(q{SELECT count(*) FROM agog_nats.outbox WHERE kind = 'report' AND feature = 'picky-one'}),
	'1', 'only the completed attempt published its report');
stop_ok($r4, 'the jen runner');

# --- a command that outlives its deadline ---------------------------------------
psql(q{SELECT agog_define_pipeline('slow', '[{"stage": "check", "agent": "billy", "timeout": "5 seconds",
	"max_attempts": 2, "retry_backoff": "0 seconds"}]')});
my $slow = script('slow.sh', <<'EOS');
cat >/dev/null
echo "working hard on attempt $AGOG_ATTEMPT" >&2
if [ "$AGOG_ATTEMPT" = 1 ]; then trap '' TERM; fi
sleep 60 &
echo $! >"$CAPTURE/slow.$AGOG_ATTEMPT.child"
wait
echo "# finished"
EOS
my $r5 = runner(agent => 'billy', command => [$slow]);
$wf = AgogAgentTest::start_workflow($node, 'slow-one', 'slow');
is(AgogAgentTest::wait_workflow($node, $wf, 30), 'failed',
	'a command that never finishes: both attempts time out and the workflow fails');
@n = split /\n/, notices($wf);
is(scalar(@n), 2, 'the runner sent both failed notices (before the worker\'s own timeout)');
like($n[0], qr/^1\|failed\|retried\|the command ran past the task's deadline \(\S+\) and was stopped \(SIGTERM, then SIGKILL\)\|.*stderr: working hard on attempt 1$/,
	'attempt 1 ignored SIGTERM: SIGKILL, and the notice carries its stderr');
like($n[1], qr/^2\|failed\|failed\|the command ran past the task's deadline \(\S+\) and was stopped \(SIGTERM\)\|.*stderr: working hard on attempt 2$/,
	'attempt 2 ended on SIGTERM; no attempts left: failed');
for my $at (1, 2)
{
	my $child = slurp("$cap/slow.$at.child");
	chomp $child;
	ok($child && !alive($child), "attempt $at: the command's child process was killed too");
}
my @durations = $r5->log_text =~ /slow-one attempt \d \(task \d+\): deadline -> \w+, (\d+\.\d+) s/g;
is(scalar(@durations), 2, 'two task lines with the outcome "deadline"');
cmp_ok($_, '<', 5.0, "the command was stopped before the 5 s deadline ($_ s)") for @durations;
like(psql("SELECT reason FROM agog_nats.workflows WHERE id = $wf"),
	qr/^stage check failed after 2 attempts: failed: the command ran past the task's deadline/,
	'the workflow\'s reason says why');
stop_ok($r5, 'the billy runner');

# --- heartbeats keep a lease longer than itself --------------------------------
psql(q{SELECT agog_define_pipeline('long', '[{"stage": "think", "agent": "cynthia", "timeout": "60 seconds",
	"max_attempts": 1}]')});
my $long = script('long.sh', "cat >/dev/null\nsleep 5\necho '# thought long'\n");
my $r6 = runner(agent => 'cynthia', args => [ '--lease', '3', '--verbose' ], command => [$long]);
$wf = AgogAgentTest::start_workflow($node, 'long-one', 'long');
is(AgogAgentTest::wait_workflow($node, $wf, 30), 'completed',
	'a 5 s command with a 3 s lease completes: heartbeats renew the lease');
my @hb = $r6->log_text =~ /(heartbeat, lease until)/g;
cmp_ok(scalar(@hb), '>=', 3, 'heartbeats every second (a third of the lease)');
stop_ok($r6, 'the heartbeating runner');

# --- a notification that arrives with another statement's answer --------------
# A NOTIFY that commits while one of the runner's statements runs reaches the
# runner with that statement's answer, and libpq queues it: the socket stays
# quiet. The runner must take it before it sleeps, not at its next poll (10 s),
# or a retried attempt can wait past its deadline. Made certain here: the
# runner's heartbeat waits for a row lock held by this test while the next
# task is dispatched (and notified), then the lock goes.
psql(q{SELECT agog_define_pipeline('queued', '[{"stage": "one", "agent": "sylvia", "timeout": "60 seconds",
	"max_attempts": 1}]')});
my $gate = script('gate.sh', <<'EOS');
cat >/dev/null
date +%s.%N >"$CAPTURE/gate.$AGOG_FEATURE.start"
while [ "$AGOG_FEATURE" = q-first ] && [ ! -e "$CAPTURE/gate.open" ]; do sleep 0.1; done
echo "# through the gate"
EOS
# --poll 3600: without the fix only the next heartbeat (10 s, a third of the
# lease) would find the queued notification; the lease outlasts the lock.
my $r7 = runner(agent => 'sylvia', args => [ '--jobs', '2', '--lease', '30', '--poll', '3600' ],
	command => [$gate]);
my $wf_first = AgogAgentTest::start_workflow($node, 'q-first', 'queued');
ok(AgogNatsTest::wait_for(sub { -e "$cap/gate.q-first.start" }, 15), 'the first task runs');
my $holder = $node->background_psql('postgres');
$holder->query_safe("BEGIN; SELECT 1 FROM agog_nats.tasks WHERE workflow_id = $wf_first FOR UPDATE");
ok(AgogNatsTest::wait_for(
		sub {
			psql(q{SELECT count(*) FROM pg_stat_activity
				    WHERE application_name = 'agog-agent sylvia' AND wait_event_type = 'Lock'}) == 1;
		},
		15),
	'its heartbeat waits for the row lock');
my $wf_second = AgogAgentTest::start_workflow($node, 'q-second', 'queued');
ok(AgogNatsTest::wait_for(
		sub { psql("SELECT count(*) FROM agog_nats.tasks WHERE workflow_id = $wf_second AND state = 'dispatched'") == 1 },
		15),
	'the second task is dispatched (and notified) meanwhile');
my $released = Time::HiRes::time();
$holder->query_safe('COMMIT');
ok(AgogNatsTest::wait_for(sub { -e "$cap/gate.q-second.start" }, 15), 'the second task runs');
# Never started: infinitely late (a string such as "never" would compare as 0).
my $picked = -e "$cap/gate.q-second.start" ? slurp("$cap/gate.q-second.start") - $released : 9**9**9;
cmp_ok($picked, '<', 2.5,
	"... taken from libpq's queue at once (in $picked s), not at the next heartbeat (10 s)");
open(my $fh, '>', "$cap/gate.open") or die "gate.open: $!";
close $fh;
is(AgogAgentTest::wait_workflow($node, $wf_first, 30), 'completed', 'the first workflow completes');
is(AgogAgentTest::wait_workflow($node, $wf_second, 30), 'completed', 'the second too');
$holder->quit;
stop_ok($r7, 'the gated runner');

# --- --jobs and --once -------------------------------------------------------------
psql(q{SELECT agog_define_pipeline('batch', '[{"stage": "count", "agent": "priya", "timeout": "60 seconds",
	"max_attempts": 1}]')});
my $batch = script('batch.sh', <<'EOS');
cat >/dev/null
if [ "$AGOG_FEATURE" = b-bad ]; then echo "bad batch" >&2; exit 1; fi
date +%s.%N >"$CAPTURE/batch.$AGOG_FEATURE.start"
sleep 1.5
date +%s.%N >"$CAPTURE/batch.$AGOG_FEATURE.end"
echo "# batch $AGOG_FEATURE"
EOS
my @wfs = map { AgogAgentTest::start_workflow($node, "b$_", 'batch') } 1 .. 3;
ok(AgogNatsTest::wait_for(
		sub { psql(q{SELECT count(*) FROM agog_nats.tasks WHERE agent = 'priya' AND state = 'dispatched'}) == 3 },
		15),
	'three tasks dispatched to priya');
($rc, $out) = AgogAgentTest::run_agent(60, '--agent', 'priya', '--dsn', $dsn, '--once', '--jobs', '2', '--', $batch);
is($rc, 0, '--once runs the dispatched tasks and exits 0');
my @lines = $out =~ /^.*b\d attempt 1 \(task \d+\): ok -> advanced.*$/mg;
is(scalar(@lines), 3, '... all three') or diag($out);
is(AgogAgentTest::wait_workflow($node, $_, 10), 'completed', "workflow $_ completed") for @wfs;
my @iv = map { [ slurp("$cap/batch.b$_.start") + 0, slurp("$cap/batch.b$_.end") + 0 ] } 1 .. 3;
my $overlap = 0;
for my $i (0 .. 2)
{
	for my $j ($i + 1 .. 2)
	{
		$overlap++ if $iv[$i][0] < $iv[$j][1] && $iv[$j][0] < $iv[$i][1];
	}
}
cmp_ok($overlap, '>=', 1, '--jobs 2: two commands ran at the same time');
my $max_at_once = 0;
for my $t (map { $_->[0] + 0.01 } @iv)
{
	my $n = grep { $_->[0] <= $t && $t < $_->[1] } @iv;
	$max_at_once = $n if $n > $max_at_once;
}
cmp_ok($max_at_once, '<=', 2, '--jobs 2: never more than two');

# --once --jobs 2 with one task: a task dispatched while it runs is run too
# (the first empty claim, for the free slot, once ended the claiming).
my $wf4 = AgogAgentTest::start_workflow($node, 'b4', 'batch');
ok(AgogNatsTest::wait_for(
		sub { psql("SELECT state = 'dispatched' FROM agog_nats.tasks WHERE workflow_id = $wf4") eq 't' }, 15),
	'one task dispatched to priya');
my $once = runner(agent => 'priya', args => [ '--once', '--jobs', '2' ], command => [$batch]);
ok(AgogNatsTest::wait_for(sub { -e "$cap/batch.b4.start" }, 20), '--once --jobs 2 runs it');
my $wf5 = AgogAgentTest::start_workflow($node, 'b5', 'batch');
is($once->wait_exit(30), 0, '--once exits 0');
like($once->log_text, qr/b5 attempt 1 \(task \d+\): ok -> advanced/,
	'... after running the task dispatched meanwhile too') or diag($once->log_text);
is(AgogAgentTest::wait_workflow($node, $wf5, 10), 'completed', 'that workflow completed');

my $t0 = Time::HiRes::time();
($rc, $out) = AgogAgentTest::run_agent(30, '--agent', 'priya', '--dsn', $dsn, '--once', '--', $batch);
is($rc, 0, '--once with nothing dispatched exits 0');
cmp_ok(Time::HiRes::time() - $t0, '<', 5, '... at once');
my $bad = AgogAgentTest::start_workflow($node, 'b-bad', 'batch');
ok(AgogNatsTest::wait_for(
		sub { psql("SELECT state = 'dispatched' FROM agog_nats.tasks WHERE workflow_id = $bad") eq 't' }, 15),
	'a failing task dispatched');
($rc, $out) = AgogAgentTest::run_agent(30, '--agent', 'priya', '--dsn', $dsn, '--once', '--', $batch);
is($rc, 3, '--once exits 3 when a task did not complete');
like($out, qr/b-bad attempt 1 \(task \d+\): exit 1 -> failed, .*bad batch$/m, '... and says which');

# --- no task directory is left behind -------------------------------------------
my @left = glob("$ENV{TMPDIR}/agog-agent.*");
is(scalar(@left), 0, 'no task directory is left in TMPDIR') or diag("@left");

$node->stop;
$nats->stop;
done_testing();
