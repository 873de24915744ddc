
# The exactly-once check of the fault suite (test/t/1*.pl), and the few
# helpers every scenario shares: a node with the extension and its six
# streams, committing reports, waiting for the outbox to drain.
#
# Each scenario names its reports by a feature prefix ("kill9-", ...) and ends
# with
#
#   AgogExactlyOnce::check(node => $node, nats => $nats, prefix => 'kill9-',
#       expect => 1000, absent => ['kill9rb-']);
#
# which reads every message of every agent stream straight from nats-server
# (AgogJsClient: $JS.API.STREAM.INFO and a direct get per sequence, never
# through the proxy) and compares the scenario's messages, by their
# Nats-Msg-Id header, with the scenario's rows of agog_nats.outbox:
#   - the outbox holds the expected number of committed reports, all of
#     them published (none pending; dead only as many as expected_dead);
#   - JetStream holds exactly as many of the scenario's messages as there
#     are published reports, and no Nats-Msg-Id twice (in any stream);
#   - every published report is in JetStream once, at the stream and
#     sequence the outbox recorded, with the outbox's body;
#   - every message of the scenario in JetStream is a published report
#     (nothing from a transaction that rolled back or vanished);
#   - features listed in `absent` (rolled-back reports) are nowhere: no
#     outbox row, no message.

package AgogExactlyOnce;

use strict;
use warnings;

use Carp qw(croak);
use Digest::MD5 qw(md5_hex);
use Time::HiRes ();
use Test::More;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use AgogNatsTest;
use AgogJsClient;

# The six built-in agents: [agent, task type].
our @AGENTS = (
	[ cynthia => 'research' ],
	[ sylvia  => 'critique' ],
	[ roy     => 'backend' ],
	[ jen     => 'frontend' ],
	[ billy   => 'qa' ],
	[ priya   => 'statistics' ]);

# Poll $code every $step_s (default 0.1) until true (returns true) or
# $timeout_s passes (false).
sub wait_until
{
	my ($code, $timeout_s, $step_s) = @_;
	$step_s //= 0.1;
	my $deadline = Time::HiRes::time() + $timeout_s;
	while (1)
	{
		my $r = eval { $code->() };
		return 1 if $r;
		return 0 if Time::HiRes::time() >= $deadline;
		Time::HiRes::sleep($step_s);
	}
}

# One value from $node, or undef when the query fails (server restarting).
sub try_query
{
	my ($node, $sql) = @_;
	my ($rc, $out, $err) = $node->psql('postgres', $sql);
	return undef if $rc != 0;
	return $out;
}

# streams_ok of agog_worker_status(), or undef.
sub streams_ok
{
	my ($node) = @_;
	return try_query($node, 'SELECT streams_ok FROM agog_worker_status() WHERE connected');
}

# The worker's pid, or undef.
sub worker_pid
{
	my ($node) = @_;
	my $p = try_query($node, 'SELECT pid FROM agog_worker_status()');
	return defined $p && $p =~ /^\d+$/ ? $p : undef;
}

# A started node (AgogNatsTest::new_node, agog_nats.database = 'postgres')
# pointed at $url, with CREATE EXTENSION agog_nats done; asserts that the
# worker then has its six streams within 30 s.
sub setup_node
{
	my ($name, $url, %conf) = @_;
	my $node = AgogNatsTest::new_node($name, $url, %conf);
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION agog_nats');
	ok(wait_until(sub { (streams_ok($node) // 0) == 6 }, 30),
		"$name: the worker is connected and has the six agent streams");
	return $node;
}

# SQL that commits nothing by itself: a SELECT queueing reports $from..$to
# with features "$prefix<g>" (or just $prefix with same_subject), spread over
# the agents (all six, or the first $o{agents}), $o{size} bytes of content.
sub publish_sql
{
	my ($prefix, $from, $to, %o) = @_;
	my $size = $o{size} // 100;
	my $nag  = $o{agents} // scalar @AGENTS;
	my $vals = join(', ', map { "('$AGENTS[$_][0]', '$AGENTS[$_][1]', $_)" } 0 .. $nag - 1);
	my $feature = $o{same_subject} ? "'$prefix'" : "'$prefix' || g";
	return "SELECT count(agog_publish_report(a.agent, a.task_type, $feature, "
	  . "repeat('r', $size) || ' #' || g, jsonb_build_object('n', g))) "
	  . "FROM generate_series($from, $to) g "
	  . "JOIN (VALUES $vals) a(agent, task_type, k) ON a.k = g % $nag";
}

# Commit $n reports (features "$prefix1".."$prefix$n") in $o{txns}
# transactions (default 1). Dies if one fails. Other options: publish_sql.
sub commit_reports
{
	my ($node, $prefix, $n, %o) = @_;
	my $txns = $o{txns} // 1;
	my $per  = int(($n + $txns - 1) / $txns);
	my $done = 0;
	for (my $from = 1; $from <= $n; $from += $per)
	{
		my $to = $from + $per - 1;
		$to = $n if $to > $n;
		$done += $node->safe_psql('postgres', ($o{before} // '') . publish_sql($prefix, $from, $to, %o));
	}
	croak "committed $done reports, wanted $n" unless $done == $n;
	return $done;
}

# Rows of the outbox whose feature starts with $prefix, in state $state
# (default pending), or undef when the query fails.
sub count_state
{
	my ($node, $prefix, $state) = @_;
	$state //= 'pending';
	return try_query($node,
		"SELECT count(*) FROM agog_nats.outbox WHERE starts_with(feature, '$prefix') AND state = '$state'");
}

# Wait up to $timeout_s until no report of $prefix is pending (and at least
# one row exists). True when it happened.
sub wait_drained
{
	my ($node, $prefix, $timeout_s) = @_;
	return wait_until(
		sub {
			my $r = try_query($node,
				"SELECT count(*) FILTER (WHERE state = 'pending'), count(*) FROM agog_nats.outbox "
				  . "WHERE starts_with(feature, '$prefix')");
			return 0 unless defined $r;
			my ($p, $all) = split /\|/, $r;
			return $p == 0 && $all > 0;
		},
		$timeout_s, 0.2);
}

# The feature of a report subject agog.deliverables.<agent>.<task>.<feature>.
sub _feature
{
	my ($subject) = @_;
	my @t = split /\./, $subject // '';
	return @t == 5 ? $t[4] : '';
}

sub _starts
{
	my ($s, @prefixes) = @_;
	for my $p (@prefixes)
	{
		return 1 if substr($s, 0, length $p) eq $p;
	}
	return 0;
}

sub _list
{
	my ($title, @items) = @_;
	return '' unless @items;
	my $n = @items;
	splice(@items, 20) if @items > 20;
	return "$title ($n): " . join('; ', @items) . ($n > 20 ? '; ...' : '');
}

# check(node => $node, nats => $nats (or port => P), prefix => 'x-',
#       name => label (default prefix), expect => N committed (optional),
#       expect_dead => D (default 0), absent => [feature prefixes])
# Runs the assertions described at the top; returns a hash ref with ok (all
# passed), rows, published, pending, dead, duplicates (rows whose ack said
# duplicate), max_attempts, messages.
sub check
{
	my (%o) = @_;
	my $node   = $o{node} or croak 'check: node';
	my $prefix = $o{prefix} // croak 'check: prefix';
	my $name   = $o{name} // $prefix;
	my $port   = $o{port} // $o{nats}->port;
	my @absent = @{ $o{absent} || [] };
	my $all_ok = 1;
	my $res    = { messages => 0 };

	# The outbox side.
	my $rows_txt = $node->safe_psql('postgres',
		"SELECT id, msg_id, state, coalesce(stream, ''), coalesce(seq::text, ''), subject, "
		  . "md5(body), attempts, coalesce(duplicate::text, '') FROM agog_nats.outbox "
		  . "WHERE starts_with(feature, '$prefix') ORDER BY id");
	my @rows = map { my @f = split /\|/, $_, -1; {
			id => $f[0], msg_id => $f[1], state => $f[2], stream => $f[3], seq => $f[4],
			subject => $f[5], md5 => $f[6], attempts => $f[7], duplicate => $f[8] } }
	  grep { length } split /\n/, $rows_txt;
	my %by_msg_id = map { $_->{msg_id} => $_ } @rows;
	my %n = (pending => 0, published => 0, dead => 0);
	$n{ $_->{state} }++ for @rows;
	$res->{rows}         = scalar @rows;
	$res->{$_}           = $n{$_} for keys %n;
	$res->{duplicates}   = scalar grep { $_->{duplicate} eq 'true' } @rows;
	$res->{max_attempts} = 0;
	for (@rows) { $res->{max_attempts} = $_->{attempts} if $_->{attempts} > $res->{max_attempts}; }

	my $absent_rows = '';
	if (@absent)
	{
		my $cond = join(' OR ', map { "starts_with(feature, '$_')" } @absent);
		$absent_rows = $node->safe_psql('postgres',
			"SELECT string_agg(feature || ' (' || state || ')', ', ') FROM agog_nats.outbox WHERE $cond");
	}
	my @streams = split /\n/,
	  $node->safe_psql('postgres', 'SELECT stream_name FROM agog_nats.agents ORDER BY 1');

	# The JetStream side, straight from the server.
	my $js = AgogJsClient->new($port);
	my (@msgs, @all);
	for my $s (@streams)
	{
		for my $m ($js->stream_messages($s))
		{
			$m->{stream} = $s;
			push @all, $m;
			push @msgs, $m if _starts(_feature($m->{subject}), $prefix);
		}
	}
	$js->close;
	$res->{messages} = scalar @msgs;

	if (defined $o{expect})
	{
		is(scalar @rows, $o{expect}, "$name: the outbox holds the $o{expect} committed reports")
		  or $all_ok = 0;
	}
	my $want_dead = $o{expect_dead} // 0;
	is("pending $n{pending}, dead $n{dead}", "pending 0, dead $want_dead",
		"$name: every report is settled (published $n{published})") or $all_ok = 0;

	is(scalar @msgs, $n{published},
		"$name: JetStream holds exactly as many messages as published reports ($n{published})")
	  or $all_ok = 0;

	my (%seen, @dups);
	for my $m (@all)
	{
		next unless defined $m->{msg_id};
		push @{ $seen{ $m->{msg_id} } }, "$m->{stream}.$m->{seq}";
	}
	@dups = map { "$_ at " . join(', ', @{ $seen{$_} }) } grep { @{ $seen{$_} } > 1 } sort keys %seen;
	ok(!@dups, "$name: no Nats-Msg-Id is stored twice in any agent stream")
	  or do { $all_ok = 0; diag(_list('stored more than once', @dups)); };

	my %in_js;
	push @{ $in_js{ $_->{msg_id} // '' } }, $_ for @msgs;
	my @bad;
	for my $r (grep { $_->{state} eq 'published' } @rows)
	{
		my $found = $in_js{ $r->{msg_id} } || [];
		if (@$found != 1)
		{
			push @bad, "report $r->{id} ($r->{msg_id}, $r->{subject}) found " . scalar(@$found) . " times";
			next;
		}
		my $m = $found->[0];
		push @bad, "report $r->{id} recorded at $r->{stream}.$r->{seq}, stored at $m->{stream}.$m->{seq}"
		  if $r->{stream} ne $m->{stream} || $r->{seq} ne $m->{seq};
		push @bad, "report $r->{id} stored with a different body at $m->{stream}.$m->{seq}"
		  if md5_hex($m->{body}) ne $r->{md5};
		push @bad, "report $r->{id} recorded on $r->{subject}, stored on $m->{subject}"
		  if $r->{subject} ne ($m->{subject} // '');
	}
	ok(!@bad,
		"$name: every published report is in JetStream exactly once, at its recorded <stream>.<seq>, with its body")
	  or do { $all_ok = 0; diag(_list('problems', @bad)); };

	my @unknown;
	for my $m (@msgs)
	{
		my $r = defined $m->{msg_id} ? $by_msg_id{ $m->{msg_id} } : undef;
		if (!$r)
		{
			push @unknown, "$m->{stream}.$m->{seq} $m->{subject} msg_id "
			  . ($m->{msg_id} // '(none)') . ': no such report in the outbox';
		}
		elsif ($r->{state} ne 'published')
		{
			push @unknown, "$m->{stream}.$m->{seq} is report $r->{id}, which is $r->{state}";
		}
	}
	ok(!@unknown,
		"$name: every message in JetStream is a published report (nothing rolled back or vanished)")
	  or do { $all_ok = 0; diag(_list('messages without a published report', @unknown)); };

	if (@absent)
	{
		my @leaked = map { "$_->{stream}.$_->{seq} $_->{subject}" }
		  grep { _starts(_feature($_->{subject}), @absent) } @all;
		ok($absent_rows eq '' && !@leaked,
			"$name: nothing of the rolled-back reports (" . join(', ', @absent) . ') in the outbox or JetStream')
		  or do { $all_ok = 0; diag("outbox: $absent_rows; " . _list('in JetStream', @leaked)); };
	}
	note(sprintf('%s: %d reports, %d published (%d acked as duplicates, max %d attempts), %d dead, '
		  . '%d messages of the scenario, %d in all agent streams',
		$name, $res->{rows}, $n{published}, $res->{duplicates}, $res->{max_attempts}, $n{dead},
		scalar @msgs, scalar @all));
	$res->{ok} = $all_ok;
	return $res;
}


# ---------------------------------------------------------------------------
# A quiet persistent psql session, for polling many times a second (the
# PostgreSQL::Test::BackgroundPsql of PG 15 notes every query in the TAP log).
#
#   my $s = AgogExactlyOnce::Session->new($node);
#   my $n = $s->query('SELECT count(*) FROM ...');   # undef on an error
#   $s->quit;
# ---------------------------------------------------------------------------
package AgogExactlyOnce::Session;

use strict;
use warnings;

use Carp qw(croak);
use IPC::Run ();

sub new
{
	my ($class, $node, $db) = @_;
	my $self = bless { node => $node, db => $db // 'postgres', n => 0 }, $class;
	$self->_start;
	return $self;
}

sub _start
{
	my ($self) = @_;
	$self->{in}    = '';
	$self->{out}   = '';
	$self->{err}   = '';
	$self->{timer} = IPC::Run::timeout(60);
	$self->{run}   = IPC::Run::start(
		[ $self->{node}->installed_command('psql'), '-XAtq', '-v', 'ON_ERROR_STOP=0',
		  '-d', $self->{node}->connstr($self->{db}) ],
		'<', \$self->{in}, '>', \$self->{out}, '2>', \$self->{err}, $self->{timer});
}

# Run $sql; its output (chomped), or undef when it failed (the error is in
# $self->{last_error}). A session whose server went away (a crash restart)
# is opened again by the next call.
sub query
{
	my ($self, $sql) = @_;
	$self->_start unless $self->{run};
	my $mark = '__agog_done_' . ++$self->{n} . '__';
	$self->{out} = '';
	$self->{err} = '';
	$self->{in} .= "$sql;\n\\echo $mark\n";
	$self->{timer}->start(60);
	eval {
		$self->{run}->pump while $self->{out} !~ /\Q$mark\E\n/ && $self->{run}->pumpable;
		1;
	} or $self->{err} .= "pump: $@";
	if ($self->{out} !~ s/\Q$mark\E\n//)
	{
		$self->{last_error} = "psql session ended: $self->{err}";
		eval { $self->{run}->kill_kill; };
		$self->{run} = undef;
		return undef;
	}
	if ($self->{err} =~ /ERROR|FATAL|server closed|connection/)
	{
		$self->{last_error} = $self->{err};
		return undef;
	}
	chomp(my $r = $self->{out});
	return $r;
}

sub quit
{
	my ($self) = @_;
	return unless $self->{run};
	$self->{in} .= "\\q\n";
	eval { $self->{run}->finish; };
	eval { $self->{run}->kill_kill; } if $@;
	$self->{run} = undef;
}

sub DESTROY
{
	my ($self) = @_;
	local ($@, $?, $!);
	eval { $self->{run}->kill_kill if $self->{run}; };
}

1;

