
# Helpers for the agog-agent TAP tests (test/t/3*.pl), on top of
# AgogNatsTest. A test starts one or more runners against a node:
#
#   my $r = AgogAgentTest::Runner->start(
#       agent => 'jen', dsn => $node->connstr('postgres'),
#       args => ['--lease', 6], command => [$script]);
#   ok($r->wait_log(qr/ok -> advanced/, 20), 'task done');
#   $r->stop;        # SIGTERM, then wait; returns the exit status
#
# Every runner started here is stopped by its pid when its object goes away
# and at exit.

package AgogAgentTest;

use strict;
use warnings;

use Carp qw(croak);
use File::Spec;
use IPC::Run ();
use POSIX qw(:sys_wait_h);
use Time::HiRes qw(usleep);
use PostgreSQL::Test::Utils;
use Test::More ();
use AgogNatsTest;

# The agog-agent binary: $AGOG_AGENT, else on PATH, else in pg_config --bindir.
sub agent_bin
{
	return $ENV{AGOG_AGENT} if $ENV{AGOG_AGENT};
	for my $d (split /:/, $ENV{PATH} // '')
	{
		my $p = "$d/agog-agent";
		return $p if -x $p && !-d $p;
	}
	my $bindir = `pg_config --bindir 2>/dev/null`;
	chomp $bindir;
	return "$bindir/agog-agent" if $bindir && -x "$bindir/agog-agent";
	croak 'agog-agent not found (make install puts it in the PostgreSQL bindir)';
}

# Run agog-agent with @args to completion (at most $timeout_s, default 30);
# returns (exit status, stdout and stderr together).
sub run_agent
{
	my ($timeout_s, @args) = @_;
	my ($out, $err) = ('', '');
	my $h = IPC::Run::start([ agent_bin(), @args ], '<', \undef, '>', \$out, '2>', \$err,
		IPC::Run::timeout($timeout_s // 30));
	eval { $h->finish; 1 } or do { $h->kill_kill; return (-1, "timed out: $@\n$out$err"); };
	return ($h->result(0), $out . $err);
}

# Write an executable script $name in $dir with $body (a #!/bin/bash line
# and `set -u` are added) and return its path.
sub script
{
	my ($dir, $name, $body) = @_;
	my $path = "$dir/$name";
	open my $fh, '>', $path or croak "cannot write $path: $!";
	print $fh "#!/bin/bash\nset -u\n$body";
	close $fh;
	chmod 0755, $path;
	return $path;
}

# Slurp a file, or '' when it does not exist.
sub slurp
{
	my ($path) = @_;
	return '' unless -e $path;
	return PostgreSQL::Test::Utils::slurp_file($path);
}

# True while $pid exists and is not a zombie.
sub pid_alive
{
	my ($pid) = @_;
	my $stat = slurp("/proc/$pid/stat");
	return $stat ne '' && $stat !~ /^\d+ \(.*\) Z /;
}

# Wait until the worker of $node is connected with its six streams.
sub worker_ready
{
	my ($node, $timeout_s) = @_;
	return AgogNatsTest::wait_for(
		sub {
			my $st = AgogNatsTest::worker_status($node);
			return $st->{pid} && $st->{connected} && ($st->{streams_ok} // 0) == 6;
		},
		$timeout_s // 30);
}

# Start a workflow of $pipeline for $feature on $node; returns its id.
# The set-up every runner test starts with: a nats-server, a node with the
# extension whose worker is connected with its six streams (asserted), and a
# private directory with a "capture" directory in it for the commands.
# Returns ($nats, $node, $dir, $cap).
sub setup
{
	my $nats = AgogNatsTest::NatsServer->new;
	$nats->start;
	my $node = AgogNatsTest::new_node('main', $nats);
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION agog_nats');
	Test::More::ok(worker_ready($node), 'the worker is connected with its six streams');
	my $dir = PostgreSQL::Test::Utils::tempdir('agents');
	my $cap = "$dir/capture";
	mkdir $cap or die "mkdir $cap: $!";
	return ($nats, $node, $dir, $cap);
}

sub start_workflow
{
	my ($node, $feature, $pipeline) = @_;
	$pipeline //= 'feature';
	return $node->safe_psql('postgres',
		"SELECT agog_start_workflow('$feature', '$pipeline')");
}

# The state of workflow $wf (polls until it is not running, at most
# $timeout_s); returns the final state or 'running'.
sub wait_workflow
{
	my ($node, $wf, $timeout_s) = @_;
	my $state = 'running';
	AgogNatsTest::wait_for(
		sub {
			$state = $node->safe_psql('postgres', "SELECT state FROM agog_nats.workflows WHERE id = $wf");
			return $state ne 'running';
		},
		$timeout_s // 60);
	return $state;
}


package AgogAgentTest::Runner;

use strict;
use warnings;

use Carp qw(croak);
use POSIX qw(:sys_wait_h);
use Scalar::Util qw(weaken);
use Time::HiRes qw(usleep);
use PostgreSQL::Test::Utils;
use Test::More ();

my @all_runners;
my $seq = 0;

# AgogAgentTest::Runner->start(agent => NAME, dsn => DSN, args => [...],
#   command => [...], env => {...}, name => 'log name')
sub start
{
	my ($class, %o) = @_;
	$seq++;
	my $name = $o{name} // "agent$seq-$o{agent}";
	my $test = $0;
	$test =~ s{.*/}{};
	$test =~ s/\.[^.]+$//;
	my $log = "$PostgreSQL::Test::Utils::log_path/${test}_$name.log";
	my @cmd = (AgogAgentTest::agent_bin(), '--agent', $o{agent}, '--dsn', $o{dsn},
		@{ $o{args} || [] }, '--', @{ $o{command} });
	my $pid = fork();
	croak "fork: $!" unless defined $pid;
	if ($pid == 0)
	{
		my $null = POSIX::open('/dev/null', POSIX::O_RDONLY());
		POSIX::dup2($null, 0) if defined $null;
		if (open my $fh, '>>', $log)
		{
			POSIX::dup2(fileno($fh), 1);
			POSIX::dup2(fileno($fh), 2);
		}
		$ENV{$_} = $o{env}{$_} for keys %{ $o{env} || {} };
		{ exec(@cmd); }
		POSIX::_exit(127);
	}
	my $self = bless { pid => $pid, log => $log, name => $name, owner => $$, status => undef },
	  $class;
	push @all_runners, $self;
	weaken($all_runners[-1]);
	Test::More::note("started $name (pid $pid): @cmd");
	return $self;
}

sub pid { return $_[0]->{pid}; }
sub log_file { return $_[0]->{log}; }
sub log_text { return AgogAgentTest::slurp($_[0]->{log}); }

# True while the process runs; sets the exit status when it has ended.
sub is_running
{
	my ($self) = @_;
	return 0 if defined $self->{status};
	local ($?, $!);
	my $r = waitpid($self->{pid}, WNOHANG);
	if ($r == $self->{pid})
	{
		$self->{status} = $?;
		return 0;
	}
	return $r == 0;
}

# Wait up to $timeout_s for the process to exit; its exit code (or
# 128 + signal), undef when it still runs.
sub wait_exit
{
	my ($self, $timeout_s) = @_;
	AgogNatsTest::wait_for(sub { !$self->is_running }, $timeout_s // 30);
	return undef unless defined $self->{status};
	my $st = $self->{status};
	return $st & 127 ? 128 + ($st & 127) : $st >> 8;
}

# Wait until the log matches $re (at most $timeout_s); true when it did.
sub wait_log
{
	my ($self, $re, $timeout_s) = @_;
	return AgogNatsTest::wait_for(sub { $self->log_text =~ $re }, $timeout_s // 30);
}

sub signal
{
	my ($self, $sig) = @_;
	kill $sig, $self->{pid} if $self->is_running;
}

# SIGTERM, wait up to $timeout_s (default 30), then SIGKILL; returns the
# exit code.
sub stop
{
	my ($self, $timeout_s) = @_;
	return $self->wait_exit(0) unless $self->is_running;
	kill 'TERM', $self->{pid};
	my $rc = $self->wait_exit($timeout_s // 30);
	return $rc if defined $rc;
	Test::More::diag("$self->{name} ignored SIGTERM; killing it");
	kill 'KILL', $self->{pid};
	return $self->wait_exit(10);
}

sub DESTROY
{
	my ($self) = @_;
	local ($?, $!, $@);
	return unless $self->{owner} && $self->{owner} == $$;
	eval { $self->_finish; };
}

# Two SIGTERMs (the second ends running commands at once), then SIGKILL.
sub _finish
{
	my ($self) = @_;
	return unless $self->is_running;
	kill 'TERM', $self->{pid};
	usleep(50_000);
	kill 'TERM', $self->{pid};
	return if defined $self->wait_exit(10);
	kill 'KILL', $self->{pid};
	$self->wait_exit(5);
}

END
{
	local ($?, $!, $@);
	for my $r (@all_runners)
	{
		next unless $r && $r->{owner} == $$;
		eval { $r->_finish; };
	}
}

1;
