
# Helpers for the workflow-engine TAP tests (test/t/2xx_*.pl): a node with
# the extension and a ready worker, instant agents (SQL procedures run by
# background psql processes that a supervisor restarts after a crash), the
# event-log consistency checks, and the outbox-versus-JetStream exactly-once
# check (every message of a stream read back by direct get over one
# pipelined connection of the built-in client).
#
#   use AgogNatsTest;
#   use AgogWorkflowTest;
#   my ($nats, $node) = AgogWorkflowTest::setup('crash', restart_after_crash => \'on');
#   AgogWorkflowTest::install_agents($node);
#   my $pool = AgogWorkflowTest::AgentPool->new($node, max_sleep => 0.05);
#   $pool->start;
#   ok(AgogWorkflowTest::wait_for(sub { ... }, 60, $pool), '...');
#   AgogWorkflowTest::check_event_log($node, 'all');
#   AgogWorkflowTest::check_exactly_once($nats, $node);

package AgogWorkflowTest;

use strict;
use warnings;

use Carp qw(croak);
use JSON::PP;
use POSIX qw(:sys_wait_h);
use Time::HiRes qw(usleep);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;

# The seed's feature pipeline: agent => task type, in stage order.
our @FEATURE_AGENTS = qw(cynthia sylvia roy jen billy priya);
our %TASK_TYPE = (
	cynthia => 'research',
	sylvia  => 'critique',
	roy     => 'backend',
	jen     => 'frontend',
	billy   => 'qa',
	priya   => 'statistics');

# The seven streams the outbox publishes to.
sub outbox_streams
{
	return ('agog_tasks', map { "agog_features_$TASK_TYPE{$_}" } @FEATURE_AGENTS);
}

# Like AgogNatsTest::wait_for, but also lets $pool (an AgentPool, optional)
# restart agents that died while waiting.
sub wait_for
{
	my ($code, $timeout_s, $pool) = @_;
	return AgogNatsTest::wait_for(
		sub {
			$pool->tick if $pool;
			return $code->();
		},
		$timeout_s);
}

# One value (first column of the first row) or undef when the query fails
# (the server may be restarting); never dies.
sub try_query
{
	my ($node, $sql) = @_;
	my ($rc, $out, $err) = (1, '', '');
	eval {
		($rc, $out, $err) = $node->psql('postgres', $sql, on_error_stop => 1);
		1;
	} or return undef;
	return undef if $rc != 0;
	return $out;
}

# agog_worker_status() as a hash ref, or undef when it cannot be read.
sub worker_status
{
	my ($node) = @_;
	my $out = try_query($node,
		q{SELECT coalesce(pid, 0), connected::int, streams_ok, streams_failed FROM agog_worker_status()});
	return undef unless defined $out && $out =~ /^(\d+)\|(\d)\|(\d+)\|(\d+)$/;
	return { pid => $1, connected => $2, streams_ok => $3, streams_failed => $4 };
}

# True when the worker runs (with a pid other than $not_pid, if given), is
# connected, and has the six agent streams (and the two workflow streams)
# in place.
sub worker_ready
{
	my ($node, $not_pid) = @_;
	my $st = worker_status($node) or return 0;
	return 0 unless $st->{pid} && $st->{connected} && $st->{streams_ok} == 6 && $st->{streams_failed} == 0;
	return 0 if defined $not_pid && $st->{pid} == $not_pid;
	return 1;
}

# A nats-server and a started node (agog_nats.database = postgres) with the
# extension created and the worker ready (asserted). %conf goes to
# AgogNatsTest::new_node.
sub setup
{
	my ($name, %conf) = @_;
	my $nats = AgogNatsTest::NatsServer->new(name => "nats_$name");
	$nats->start;
	my $node = AgogNatsTest::new_node($name, $nats, %conf);
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION agog_nats');
	ok(wait_for(sub { worker_ready($node) }, 30),
		"$name: worker connected with streams_ok = 6 within 30 s")
	  or diag(explain(worker_status($node)));
	return ($nats, $node);
}

# The instant agent: a procedure that, until agent_ctl.stop, claims the next
# task of its agent, publishes the report and completes the task with the
# seed's completion notice, all in one transaction (like play() in
# sql/workflow.sql), optionally sleeping up to max_sleep seconds inside that
# transaction; agent_log records each completion in the same transaction.
our $AGENT_SQL = <<'EOSQL';
CREATE TABLE agent_ctl (stop boolean NOT NULL);
INSERT INTO agent_ctl VALUES (false);
CREATE TABLE agent_log (
    task_id bigint NOT NULL, attempt int NOT NULL, agent text NOT NULL,
    outcome text NOT NULL, pid int NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE INDEX ON agent_log (task_id);
CREATE FUNCTION agent_notice(who text, tt text, feature text, task bigint)
RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object(
        'status', 'complete', 'agent', who, 'task', feature,
        'nats_channel', format('agog.deliverables.%s.%s.%s', who, tt, feature),
        'summary', 'did ' || tt, 'complexity', 'Medium', 'blockers', 'None',
        'ready_for_next_stage', true,
        'completion_time', to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
        'files_modified', 2, 'metadata', jsonb_build_object('by', 'tap-agent', 'task_id', task))
$$;
CREATE PROCEDURE agent_loop(who text, max_sleep float8 DEFAULT 0)
LANGUAGE plpgsql AS $$
DECLARE
    c record;
    tt text;
    res text;
BEGIN
    LOOP
        EXIT WHEN (SELECT stop FROM agent_ctl);
        SELECT * INTO c FROM agog_claim_task(who, format('tap-%s-%s', who, pg_backend_pid()));
        IF c.task_id IS NULL THEN
            COMMIT;
            PERFORM pg_sleep(0.01);
            CONTINUE;
        END IF;
        tt := c.notice ->> 'taskType';
        PERFORM agog_publish_report(who, tt, c.feature,
            format('# %s on %s (attempt %s)%s', tt, c.feature, c.attempt, repeat(' words', 200)),
            jsonb_build_object('task_id', c.task_id));
        IF max_sleep > 0 THEN
            PERFORM pg_sleep(random() * max_sleep);
        END IF;
        res := agog_complete_task(c.task_id, agent_notice(who, tt, c.feature, c.task_id));
        INSERT INTO agent_log (task_id, attempt, agent, outcome, pid)
        VALUES (c.task_id, c.attempt, who, res, pg_backend_pid());
        COMMIT;
    END LOOP;
END
$$;
EOSQL

sub install_agents
{
	my ($node) = @_;
	$node->safe_psql('postgres', $AGENT_SQL);
}

# The p-th percentile (0..100, nearest rank) of a list of numbers.
sub percentile
{
	my ($p, @v) = @_;
	return undef unless @v;
	@v = sort { $a <=> $b } @v;
	my $i = int($p / 100 * @v + 0.999999) - 1;
	$i = 0 if $i < 0;
	$i = $#v if $i > $#v;
	return $v[$i];
}

# Event-log consistency of the workflows $where selects (a condition on w,
# an agog_nats.workflows row; 'true' for all): one assertion per rule, each
# a count of violations that must be 0. The workflows, their tasks and
# events are first copied to indexed temporary tables, so that the checks
# stay fast for thousands of workflows. %opt: nats_agents => 1 when some
# completions came over NATS (no claim before them), no_retries => 1 to
# also require that nothing was retried, failed or cancelled, agent_log =>
# 1 to compare with the instant agents' own log, outbox_reports => 1 when
# every report went through the outbox.
sub check_event_log
{
	my ($node, $label, $where, %opt) = @_;
	$where //= 'true';
	my @rules = (
		[ 'every workflow completed',
			"SELECT count(*) FROM cw WHERE state <> 'completed'" ],
		[ 'exactly one workflow_started per workflow',
			"SELECT count(*) FROM cw w WHERE (SELECT count(*) FROM ce e WHERE e.workflow_id = w.id AND e.kind = 'workflow_started') <> 1" ],
		[ 'exactly one workflow_completed per workflow',
			"SELECT count(*) FROM cw w WHERE (SELECT count(*) FROM ce e WHERE e.workflow_id = w.id AND e.kind = 'workflow_completed') <> 1" ],
		[ 'every task completed',
			"SELECT count(*) FROM ct WHERE state <> 'completed'" ],
		[ 'exactly one task_completed per task',
			"SELECT count(*) FROM ct t WHERE (SELECT count(*) FROM ce e WHERE e.task_id = t.id AND e.kind = 'task_completed') <> 1" ],
		[ 'task_dispatched events per task = tasks.attempt',
			"SELECT count(*) FROM ct t WHERE (SELECT count(*) FROM ce e WHERE e.task_id = t.id AND e.kind = 'task_dispatched') <> t.attempt" ],
		[ 'task_dispatched attempts are 1..attempt, in order',
			"SELECT count(*) FROM ct t WHERE ARRAY(SELECT (e.detail ->> 'attempt')::int FROM ce e WHERE e.task_id = t.id AND e.kind = 'task_dispatched' ORDER BY e.id) <> ARRAY(SELECT generate_series(1, t.attempt))" ],
		[ 'task_completed is for the task\'s last attempt',
			"SELECT count(*) FROM ce e JOIN ct t ON t.id = e.task_id WHERE e.kind = 'task_completed' AND (e.detail ->> 'attempt')::int <> t.attempt" ],
		[ 'a task is dispatched only after the stages it depends on completed',
			"SELECT count(*) FROM ce d JOIN ct t ON t.id = d.task_id JOIN ct u ON u.workflow_id = t.workflow_id AND u.stage = ANY (t.depends_on) WHERE d.kind = 'task_dispatched' AND NOT EXISTS (SELECT 1 FROM ce c WHERE c.task_id = u.id AND c.kind = 'task_completed' AND c.id < d.id)" ],
		[ 'workflow_completed comes after every task_completed of its workflow',
			"SELECT count(*) FROM ce c WHERE c.kind = 'workflow_completed' AND EXISTS (SELECT 1 FROM ce e WHERE e.workflow_id = c.workflow_id AND e.kind = 'task_completed' AND e.id > c.id)" ],
		[ 'notices: exactly one row per task, outcome advanced, for its last attempt',
			"SELECT count(*) FROM ct t WHERE (SELECT count(*) FROM agog_nats.notices n WHERE n.task_id = t.id) <> 1 OR NOT EXISTS (SELECT 1 FROM agog_nats.notices n WHERE n.task_id = t.id AND n.outcome = 'advanced' AND n.attempt = t.attempt)" ],
		[ 'a message id a task notice names is its upstream stage\'s report',
			"SELECT count(*) FROM ct t, jsonb_array_elements(t.notice -> 'inputs') i JOIN ct u ON u.stage = i ->> 'stage' WHERE u.workflow_id = t.workflow_id AND i ->> 'message_id' IS NOT NULL AND (i ->> 'message_id' IS DISTINCT FROM u.report_message_id OR i ->> 'subject' IS DISTINCT FROM u.report_subject)" ],
	);
	if ($opt{nats_agents})
	{
		push @rules,
		  [ 'no SQL task_completed without a task_claimed of the same attempt before it',
			"SELECT count(*) FROM ce c WHERE c.kind = 'task_completed' AND c.detail ->> 'source' = 'sql' AND NOT EXISTS (SELECT 1 FROM ce k WHERE k.task_id = c.task_id AND k.kind = 'task_claimed' AND k.detail ->> 'attempt' = c.detail ->> 'attempt' AND k.id < c.id)" ];
	}
	else
	{
		push @rules,
		  [ 'no task_completed without a task_claimed of the same attempt before it',
			"SELECT count(*) FROM ce c WHERE c.kind = 'task_completed' AND NOT EXISTS (SELECT 1 FROM ce k WHERE k.task_id = c.task_id AND k.kind = 'task_claimed' AND k.detail ->> 'attempt' = c.detail ->> 'attempt' AND k.id < c.id)" ],
		  [ 'every task_claimed follows the task_dispatched of its attempt',
			"SELECT count(*) FROM ce k WHERE k.kind = 'task_claimed' AND NOT EXISTS (SELECT 1 FROM ce d WHERE d.task_id = k.task_id AND d.kind = 'task_dispatched' AND d.detail ->> 'attempt' = k.detail ->> 'attempt' AND d.id < k.id)" ];
	}
	if ($opt{no_retries})
	{
		push @rules,
		  [ 'no task retried, failed or cancelled and no workflow failed (no deadline or lease could run out)',
			"SELECT count(*) FROM ce e WHERE e.kind IN ('task_retry', 'task_failed', 'task_cancelled', 'workflow_failed', 'workflow_cancelled')" ];
	}
	if ($opt{agent_log})
	{
		push @rules,
		  [ 'agent_log: one committed completion per task, outcome advanced',
			"SELECT count(*) FROM ct t WHERE (SELECT count(*) FROM agent_log a WHERE a.task_id = t.id) <> 1 OR NOT EXISTS (SELECT 1 FROM agent_log a WHERE a.task_id = t.id AND a.outcome = 'advanced' AND a.attempt = t.attempt)" ];
	}
	if ($opt{outbox_reports})
	{
		push @rules,
		  [ 'every task\'s report_message_id is its report\'s <stream>.<seq> in the outbox',
			"SELECT count(*) FROM ct t WHERE t.report_message_id IS DISTINCT FROM (SELECT o.stream || '.' || o.seq FROM agog_nats.outbox o WHERE o.subject = t.report_subject AND o.kind = 'report' ORDER BY o.id DESC LIMIT 1)" ];
	}
	my $sql = "CREATE TEMP TABLE cw AS SELECT w.* FROM agog_nats.workflows w WHERE $where;\n"
	  . "CREATE TEMP TABLE ct AS SELECT t.* FROM agog_nats.tasks t WHERE t.workflow_id IN (SELECT id FROM cw);\n"
	  . "CREATE TEMP TABLE ce AS SELECT e.* FROM agog_nats.events e WHERE e.workflow_id IN (SELECT id FROM cw);\n"
	  . "CREATE INDEX ON cw (id); CREATE INDEX ON ct (id); CREATE INDEX ON ct (workflow_id, stage);\n"
	  . "CREATE INDEX ON ce (task_id, kind, id); CREATE INDEX ON ce (workflow_id, kind, id);\n"
	  . "ANALYZE cw; ANALYZE ct; ANALYZE ce;\n"
	  . join("\nUNION ALL ", map { "SELECT $_, ($rules[$_][1])" } 0 .. $#rules) . " ORDER BY 1";
	my $out = $node->safe_psql('postgres', $sql);
	my %bad = map { split /\|/ } split /\n/, $out;
	for my $i (0 .. $#rules)
	{
		is($bad{$i}, 0, "$label: $rules[$i][0]");
	}
	my $null_ids = $node->safe_psql('postgres',
		"SELECT count(*) FROM agog_nats.workflows w JOIN agog_nats.tasks t ON t.workflow_id = w.id, "
		  . "jsonb_array_elements(t.notice -> 'inputs') i WHERE ($where) AND i ->> 'message_id' IS NULL");
	note("$label: task notice inputs without a message id (dispatched before the upstream report was published): $null_ids");
	return;
}

# Every message of $stream as [ { seq, subject, msg_id } ], read by direct
# get over one pipelined connection; dies on a protocol failure.
sub js_stream_messages
{
	my ($nats, $stream, $timeout_s) = @_;
	$timeout_s //= 60;
	my $info = $nats->js_api("STREAM.INFO.$stream", '', 10)
	  or croak "STREAM.INFO.$stream: no answer";
	croak "STREAM.INFO.$stream: $info->{error}{description}" if $info->{error};
	my ($first, $last) = @{ $info->{state} }{qw(first_seq last_seq)};
	my @msgs;
	return \@msgs if !$info->{state}{messages};
	my $s = $nats->_client(10) or croak "cannot connect to nats";
	print $s "SUB _INBOX.agogdg.* 1\r\n";
	my $chunk = 500;
	for (my $from = $first; $from <= $last; $from += $chunk)
	{
		my $to = $from + $chunk - 1;
		$to = $last if $to > $last;
		my $req = '';
		for my $seq ($from .. $to)
		{
			my $p = qq({"seq":$seq});
			$req .= "PUB \$JS.API.DIRECT.GET.$stream _INBOX.agogdg.$seq " . length($p) . "\r\n$p\r\n";
		}
		print $s $req;
		$s->flush;
		my $want = $to - $from + 1;
		my $got  = 0;
		my $done = AgogNatsTest::NatsServer::_read_until(
			$s,
			sub {
				my ($line, $buf) = @_;
				if ($line =~ /^HMSG\s+(\S+)\s+1\s+(?:\S+\s+)?(\d+)\s+(\d+)\s*$/)
				{
					my ($subj, $h, $n) = ($1, $2, $3);
					my $need = length($line) + 2 + $n + 2;
					return (undef, -1) if length($buf) < $need;
					my $hdr = substr($buf, length($line) + 2, $h);
					my @hl = split /\r\n/, $hdr;
					my $first_line = shift(@hl) // '';
					my %hh;
					for (@hl) { $hh{$1} = $2 if /^([^:]+):\s*(.*)$/; }
					my ($rseq) = $subj =~ /\.(\d+)$/;
					if ($first_line =~ /^NATS\/1\.0\s+(\d+)/)
					{
						push @msgs, { seq => $rseq, status => $1 };
					}
					else
					{
						push @msgs, {
							seq     => $hh{'Nats-Sequence'} // $rseq,
							subject => $hh{'Nats-Subject'},
							msg_id  => $hh{'Nats-Msg-Id'},
							bytes   => $n - $h,
						};
					}
					$got++;
					return (1, $need) if $got >= $want;
					return (undef, $need);
				}
				if ($line =~ /^MSG\s+(\S+)\s+1\s+(?:\S+\s+)?(\d+)\s*$/)
				{
					my ($subj, $n) = ($1, $2);
					my $need = length($line) + 2 + $n + 2;
					return (undef, -1) if length($buf) < $need;
					my ($rseq) = $subj =~ /\.(\d+)$/;
					push @msgs, { seq => $rseq, status => 'nohdr' };
					$got++;
					return (1, $need) if $got >= $want;
					return (undef, $need);
				}
				return (undef, undef);
			},
			$timeout_s);
		croak "direct get of $stream $from..$to: only $got of $want replies" unless $done;
	}
	close $s;
	return \@msgs;
}

# Exactly once, per stream of the outbox: every outbox row is published, its
# Nats-Msg-Id is in its target stream exactly once, at the (stream, seq)
# the outbox recorded, and the stream holds nothing else (messages whose
# subject matches $opt{foreign} are not from the outbox and are skipped).
# One assertion per stream, plus one on the outbox's states.
sub check_exactly_once
{
	my ($nats, $node, $label, %opt) = @_;
	my $out = $node->safe_psql('postgres',
		q{SELECT target_stream, msg_id, state, coalesce(stream, ''), coalesce(seq, 0) FROM agog_nats.outbox ORDER BY id});
	my (%rows, %states);
	for (split /\n/, $out)
	{
		my ($ts, $mid, $state, $st, $seq) = split /\|/;
		$states{$state}++;
		push @{ $rows{$ts} }, { msg_id => $mid, state => $state, stream => $st, seq => $seq };
	}
	my $total = 0;
	$total += $_ for values %states;
	is(join(',', map { "$_=$states{$_}" } sort keys %states), "published=$total",
		"$label: every outbox row ($total) is published (none pending or dead)");
	my %stats;
	for my $stream (outbox_streams())
	{
		my @problems;
		my $msgs = eval { js_stream_messages($nats, $stream) };
		if (!$msgs)
		{
			fail("$label: $stream holds each outbox row exactly once: cannot read it: $@");
			next;
		}
		my %by_id;
		my $foreign = 0;
		for my $m (@$msgs)
		{
			if (defined $m->{status})
			{
				push @problems, "seq $m->{seq}: direct get status $m->{status}";
				next;
			}
			if (defined $opt{foreign} && $m->{subject} =~ $opt{foreign})
			{
				$foreign++;
				next;
			}
			if (!defined $m->{msg_id})
			{
				push @problems, "seq $m->{seq} ($m->{subject}) has no Nats-Msg-Id";
				next;
			}
			push @{ $by_id{ $m->{msg_id} } }, $m->{seq};
		}
		my %expected;
		for my $r (@{ $rows{$stream} || [] })
		{
			$expected{ $r->{msg_id} } = 1;
			my $seqs = $by_id{ $r->{msg_id} } || [];
			if (@$seqs == 0)
			{
				push @problems, "outbox $r->{msg_id} ($r->{state}) is missing";
			}
			elsif (@$seqs > 1)
			{
				push @problems, "outbox $r->{msg_id} is stored " . scalar(@$seqs) . " times (seqs @$seqs)";
			}
			elsif ($r->{state} eq 'published' && ($r->{stream} ne $stream || $r->{seq} != $seqs->[0]))
			{
				push @problems, "outbox $r->{msg_id} recorded $r->{stream}.$r->{seq}, stored at $stream.$seqs->[0]";
			}
		}
		for my $id (sort keys %by_id)
		{
			push @problems, "$id (seqs @{ $by_id{$id} }) is in $stream but not in the outbox"
			  unless $expected{$id};
		}
		my $n = scalar(@{ $rows{$stream} || [] });
		$stats{$stream} = sprintf('%d msgs, %d distinct ids, %d outbox rows, %d foreign',
			scalar(@$msgs), scalar(keys %by_id), $n, $foreign);
		ok(!@problems, "$label: $stream holds each of its $n outbox rows exactly once and nothing else")
		  or diag(join("\n", (@problems > 20 ? (@problems[0 .. 19], '...') : @problems)));
	}
	note("$label: $_: $stats{$_}") for sort keys %stats;
	return;
}

# The current time as the seed writes it: ISO 8601 UTC with milliseconds.
sub iso_now
{
	my ($s, $us) = Time::HiRes::gettimeofday();
	my @t = gmtime($s);
	return sprintf('%04d-%02d-%02dT%02d:%02d:%02d.%03dZ', $t[5] + 1900, $t[4] + 1, @t[3, 2, 1, 0], $us / 1000);
}

my $canonical = JSON::PP->new->canonical;

# The seed's report of jen (frontend) for $feature, as a NATS-only agent
# publishes it.
sub jen_report
{
	my ($feature) = @_;
	return $canonical->encode({
		content  => "# Frontend for $feature\n\nBuilt by a NATS-only agent.\n" . ('lorem ipsum ' x 50),
		metadata => { agent => 'jen', taskType => 'frontend', feature => $feature, timestamp => iso_now(),
			components_created => 3 } });
}

# The seed's completion notice of jen for $feature; %over replaces fields.
sub jen_notice
{
	my ($feature, %over) = @_;
	return $canonical->encode({
		status               => 'complete',
		agent                => 'jen',
		task                 => $feature,
		nats_channel         => "agog.deliverables.jen.frontend.$feature",
		summary              => "frontend of $feature done",
		complexity           => 'Low',
		blockers             => 'None',
		ready_for_next_stage => JSON::PP::true,
		completion_time      => iso_now(),
		files_modified       => 3,
		metadata             => { tests => 'green' },
		%over });
}

# A JetStream publish (a request whose reply is the PubAck): the decoded
# ack, or undef.
sub js_publish
{
	my ($nats, $subject, $body) = @_;
	my $r = $nats->request($subject, $body, 5);
	return undef unless defined $r && $r ne 'NO_RESPONDERS';
	return eval { JSON::PP->new->decode($r) };
}

# Test::More assertions that the worker of $node is not held up while
# another session holds a lock ($label names the case): a report committed
# now is published within 10 s, and the worker does not wait on a lock.
sub worker_not_held
{
	my ($node, $label) = @_;
	my $q = sub { return $node->safe_psql('postgres', $_[0]); };
	my $t0 = Time::HiRes::time();
	my $id = $q->("SELECT agog_publish_report('roy', 'backend', 'meanwhile', 'published while $label')");
	ok(wait_for(sub { $q->("SELECT state FROM agog_nats.outbox WHERE id = $id") eq 'published' }, 10),
		"$label: a report committed meanwhile is published")
	  or diag($q->("SELECT pid, wait_event_type, wait_event, left(query, 60) FROM pg_stat_activity "
			  . "WHERE backend_type = 'agog_nats worker'"));
	note(sprintf('%s: published %.2f s after its commit', $label, Time::HiRes::time() - $t0));
	is($q->("SELECT wait_event_type IS DISTINCT FROM 'Lock' FROM pg_stat_activity "
			  . "WHERE backend_type = 'agog_nats worker'"),
		't', "$label: the worker does not wait on a lock");
	return;
}

# End $holder's transaction (a background_psql that holds a lock) and
# assert (15 s) that workflow $wf then fails, with its tasks' states
# ("stage state, ..." by stage) as $states.
sub release_then_failed
{
	my ($node, $holder, $wf, $states, $label) = @_;
	$holder->query_safe('ROLLBACK');
	$holder->quit;
	ok(wait_for(
			sub { $node->safe_psql('postgres', "SELECT state FROM agog_nats.workflows WHERE id = $wf") eq 'failed' },
			15),
		"$label: once the session ends, the workflow fails");
	is($node->safe_psql('postgres',
			"SELECT string_agg(stage || ' ' || state, ', ' ORDER BY stage) FROM agog_nats.tasks WHERE workflow_id = $wf"),
		$states, "$label: its tasks: $states");
	return;
}

# Start workflow $feature of pipeline $pipeline on $node and wait (an
# assertion, 10 s) until $n of its tasks are dispatched; returns its id.
sub start_dispatched
{
	my ($node, $feature, $pipeline, $n) = @_;
	my $wf = $node->safe_psql('postgres', "SELECT agog_start_workflow('$feature', '$pipeline')");
	ok(wait_for(
			sub {
				$node->safe_psql('postgres',
					"SELECT count(*) FROM agog_nats.tasks WHERE workflow_id = $wf AND state = 'dispatched'") == ($n // 1);
			},
			10),
		"$feature: " . ($n // 1) . " task(s) dispatched");
	return $wf;
}

# $JS.API.CONSUMER.INFO.<stream>.<durable>, decoded, or undef.
sub consumer_info
{
	my ($nats, $stream, $durable) = @_;
	return eval { $nats->js_api("CONSUMER.INFO.$stream.$durable", '', 5) };
}

# A core NATS subscription of the built-in client: returns a socket whose
# SUB the server has processed (PING/PONG).
sub subscribe
{
	my ($nats, $subject) = @_;
	my $s = $nats->_client(5) or croak "cannot connect to nats";
	print $s "SUB $subject 1\r\nPING\r\n";
	$s->flush;
	my $ok = AgogNatsTest::NatsServer::_read_until($s,
		sub { return $_[0] =~ /^PONG/ ? 1 : undef }, 5);
	croak "SUB $subject: no PONG" unless $ok;
	return $s;
}

# The next message on a subscription: { subject, headers, body } or undef
# after $timeout_s.
sub next_msg
{
	my ($s, $timeout_s) = @_;
	return AgogNatsTest::NatsServer::_read_until(
		$s,
		sub {
			my ($line, $buf) = @_;
			if ($line =~ /^MSG\s+(\S+)\s+1\s+(?:\S+\s+)?(\d+)\s*$/)
			{
				my ($subj, $n) = ($1, $2);
				my $need = length($line) + 2 + $n + 2;
				return (undef, -1) if length($buf) < $need;
				return ({ subject => $subj, headers => {}, body => substr($buf, length($line) + 2, $n) }, $need);
			}
			if ($line =~ /^HMSG\s+(\S+)\s+1\s+(?:\S+\s+)?(\d+)\s+(\d+)\s*$/)
			{
				my ($subj, $h, $n) = ($1, $2, $3);
				my $need = length($line) + 2 + $n + 2;
				return (undef, -1) if length($buf) < $need;
				my $all = substr($buf, length($line) + 2, $n);
				my @hl = split /\r\n/, substr($all, 0, $h);
				shift @hl;
				my %hh;
				for (@hl) { $hh{$1} = $2 if /^([^:]+):\s*(.*)$/; }
				return ({ subject => $subj, headers => \%hh, body => substr($all, $h) }, $need);
			}
			return (undef, undef);
		},
		$timeout_s);
}


# ---------------------------------------------------------------------------
# Instant agents run by background psql processes: one process per agent
# calls agent_loop(); a process that dies (its server crashed or was stopped)
# is started again by tick(), once the server takes connections. Errors
# other than those a crash or a stop causes are collected.
# ---------------------------------------------------------------------------
package AgogWorkflowTest::AgentPool;

use strict;
use warnings;

use POSIX qw(:sys_wait_h);
use Time::HiRes ();
use PostgreSQL::Test::Utils;

my @all_pools;

# new($node, agents => [...] (default the six), per_agent => 1,
#     max_sleep => seconds slept inside each task's transaction)
sub new
{
	my ($class, $node, %opt) = @_;
	my $self = bless {
		node      => $node,
		agents    => $opt{agents} || [@AgogWorkflowTest::FEATURE_AGENTS],
		per_agent => $opt{per_agent} // 1,
		max_sleep => $opt{max_sleep} // 0,
		dir       => PostgreSQL::Test::Utils::tempdir('agents'),
		procs     => [],
		spawns    => 0,
		exits     => 0,
		errors    => [],
		stopping  => 0,
		owner     => $$,
	}, $class;
	for my $a (@{ $self->{agents} })
	{
		push @{ $self->{procs} }, { agent => $a, slot => $_, pid => undef, next_try => 0 }
		  for 1 .. $self->{per_agent};
	}
	push @all_pools, $self;
	return $self;
}

sub _spawn
{
	my ($self, $p) = @_;
	my $n   = ++$self->{spawns};
	my $log = "$self->{dir}/$p->{agent}.$p->{slot}.$n.log";
	my $sql = "CALL agent_loop('$p->{agent}', $self->{max_sleep})";
	my $conn = $self->{node}->connstr('postgres') . " application_name=agent_$p->{agent}";
	my $pid = fork();
	die "fork: $!" unless defined $pid;
	if ($pid == 0)
	{
		my $null = POSIX::open('/dev/null', POSIX::O_RDONLY());
		POSIX::dup2($null, 0) if defined $null;
		if (open my $fh, '>', $log)
		{
			POSIX::dup2(fileno($fh), 1);
			POSIX::dup2(fileno($fh), 2);
		}
		{ exec('psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', $conn, '-c', $sql); }
		POSIX::_exit(127);
	}
	$p->{pid} = $pid;
	$p->{log} = $log;
	return;
}

# Start every agent process.
sub start
{
	my ($self) = @_;
	$self->{stopping} = 0;
	$self->_spawn($_) for grep { !$_->{pid} } @{ $self->{procs} };
	return $self;
}

# Known consequences of a crash or a stop of the server.
my $CRASH_RE = qr/terminating connection because of crash of another server process|server closed the connection unexpectedly|This probably means the server terminated abnormally|before or while processing the request|connection to server .* failed|the database system is (in recovery mode|starting up|shutting down|not yet accepting connections)|terminating connection due to (administrator command|unexpected postmaster exit|immediate shutdown command)|no connection to the server|could not send data to server|connection to server was lost|Connection refused|Is the server running|DETAIL:  The postmaster has commanded this server process|HINT:  In a moment you should be able to reconnect|CONTEXT:  |PL\/pgSQL function|SQL statement|Consistent recovery state has not been yet reached|^\s*$/;

# Reap agent processes that exited; record unexpected errors; start them
# again (unless stopping) at most every 200 ms each.
sub tick
{
	my ($self) = @_;
	my $now = Time::HiRes::time();
	for my $p (@{ $self->{procs} })
	{
		if ($p->{pid})
		{
			my $r = waitpid($p->{pid}, WNOHANG);
			next if $r == 0;
			my $status = $?;
			$self->{exits}++;
			$p->{pid} = undef;
			$p->{next_try} = $now + 0.2;
			my $text = PostgreSQL::Test::Utils::slurp_file($p->{log});
			for my $line (split /\n/, $text)
			{
				next if $line =~ $CRASH_RE;
				push @{ $self->{errors} }, "$p->{agent}: $line";
			}
			$p->{last_status} = $status;
		}
		if (!$p->{pid} && !$self->{stopping} && $now >= $p->{next_try})
		{
			$self->_spawn($p);
		}
	}
	return;
}

sub running
{
	my ($self) = @_;
	return scalar grep { $_->{pid} } @{ $self->{procs} };
}

sub spawns { return $_[0]->{spawns}; }
sub errors { return @{ $_[0]->{errors} }; }

# Set agent_ctl.stop and wait (up to $timeout_s) for every process to end;
# kill what is left. True when all ended by themselves.
sub stop
{
	my ($self, $timeout_s) = @_;
	$timeout_s //= 30;
	$self->{stopping} = 1;
	$self->{node}->safe_psql('postgres', 'UPDATE agent_ctl SET stop = true');
	my $ok = AgogNatsTest::wait_for(sub { $self->tick; $self->running == 0 }, $timeout_s);
	$self->kill_all unless $ok;
	return $ok;
}

sub kill_all
{
	my ($self) = @_;
	$self->{stopping} = 1;
	for my $p (@{ $self->{procs} })
	{
		next unless $p->{pid};
		kill 'TERM', $p->{pid};
		waitpid($p->{pid}, 0);
		$p->{pid} = undef;
	}
	return;
}

END
{
	local ($?, $!, $@);
	for my $pool (@all_pools)
	{
		next unless $pool && $pool->{owner} == $$;
		eval { $pool->kill_all; };
	}
}

1;
