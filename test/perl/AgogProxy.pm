
# A small loopback TCP proxy for the fault suite (test/t/1*.pl), put between
# PostgreSQL (agog_nats.url) and a nats-server. It runs in a forked child
# process, so the test process stays free, and is steered from the test
# through a control port on 127.0.0.1:
#
#   my $proxy = AgogProxy->new(target_port => $nats->port);
#   $proxy->start;                    # listens on $proxy->port
#   my $node = AgogNatsTest::new_node('main', $proxy->url);
#   $proxy->mode('drop_s2c');         # server-to-client bytes are dropped
#   $proxy->reset;                    # RST every current connection
#   $proxy->mode('pass');
#
# Modes (they apply to current and new connections):
#   pass        forward both ways
#   delay MS    forward both ways, each chunk MS milliseconds late (order kept)
#   drop_s2c    silently drop server-to-client bytes, pass client-to-server
#   drop_c2s    silently drop client-to-server bytes, pass server-to-client
#   blackhole   accept connections (without opening one to the server) and
#               forward nothing either way: what arrives is dropped
# Actions:
#   reset       close every current connection, both ends, with an RST
#               (SO_LINGER 0); the mode does not change
#   stats       a line of counters (see stats())
#
# A dropped chunk may cut a NATS protocol frame, so after drop_* or blackhole
# a connection is usually unusable: `reset` then `pass` gives the client a
# clean reconnect, as a real network fault would.
#
# Bounded: the child polls its parent every 50 ms and exits when the test
# process is gone; stop() (called from DESTROY and END) kills it by pid and
# reaps it. The child never prints: it logs to
# tmp_check/log/<test>_<name>.log, and leaves with POSIX::_exit, so no END
# block of the test (node teardown, ...) ever runs in it.

package AgogProxy;

use strict;
use warnings;

use Carp qw(croak);
use Errno qw(EAGAIN EINTR EINPROGRESS EWOULDBLOCK);
use File::Basename qw(basename);
use IO::Select;
use IO::Socket::INET;
use POSIX ();
use Scalar::Util qw(weaken);
use Socket qw(SOL_SOCKET SO_LINGER IPPROTO_TCP TCP_NODELAY);
use Time::HiRes ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;

my @all_proxies;
my $seq = 0;

# AgogProxy->new(target_port => P, %opts); opts: target_host (127.0.0.1),
# port (default a free one), name (proxy1, ...), mode ('pass').
sub new
{
	my ($class, %opts) = @_;
	croak "AgogProxy->new: target_port is required" unless $opts{target_port};
	$seq++;
	my $name = $opts{name} // "proxy$seq";
	my $test = basename($0);
	$test =~ s/\.[^.]+$//;
	my $self = bless {
		name         => $name,
		target_host  => $opts{target_host} // '127.0.0.1',
		target_port  => $opts{target_port},
		port         => $opts{port} // PostgreSQL::Test::Cluster::get_free_port(),
		control_port => PostgreSQL::Test::Cluster::get_free_port(),
		mode         => $opts{mode} // 'pass',
		log_file     => "$PostgreSQL::Test::Utils::log_path/${test}_$name.log",
		pid          => undef,
		owner        => $$,
	}, $class;
	push @all_proxies, $self;
	weaken($all_proxies[-1]);
	return $self;
}

sub port         { return $_[0]->{port}; }
sub control_port { return $_[0]->{control_port}; }
sub pid          { return $_[0]->{pid}; }
sub url          { return "nats://127.0.0.1:$_[0]->{port}"; }
sub log_file     { return $_[0]->{log_file}; }

# Fork the proxy. Both listening sockets are bound before the fork, so the
# proxy accepts as soon as this returns.
sub start
{
	my ($self) = @_;
	croak "proxy $self->{name} already running" if $self->{pid};
	my %l = (LocalAddr => '127.0.0.1', Proto => 'tcp', Listen => 128, ReuseAddr => 1);
	my $lis = IO::Socket::INET->new(%l, LocalPort => $self->{port})
	  or croak "proxy $self->{name}: listen on $self->{port}: $!";
	my $ctl = IO::Socket::INET->new(%l, LocalPort => $self->{control_port})
	  or croak "proxy $self->{name}: listen on $self->{control_port}: $!";
	my $parent = $$;
	my $pid = fork();
	croak "fork: $!" unless defined $pid;
	if ($pid == 0)
	{
		my $rc = 0;
		eval {
			$SIG{$_} = 'DEFAULT' for qw(TERM INT HUP QUIT ALRM);
			$SIG{PIPE} = 'IGNORE';
			$SIG{__DIE__} = 'DEFAULT';
			$SIG{__WARN__} = sub { };
			_child_main($self, $lis, $ctl, $parent);
			1;
		} or do {
			my $e = $@;
			if (open my $fh, '>>', $self->{log_file})
			{
				print $fh "proxy died: $e\n";
				close $fh;
			}
			$rc = 1;
		};
		POSIX::_exit($rc);
	}
	close $lis;
	close $ctl;
	$self->{pid} = $pid;
	Test::More::note("proxy $self->{name} pid $pid on port $self->{port} -> "
		  . "$self->{target_host}:$self->{target_port} (control $self->{control_port})");
	return 1;
}

# Send one control command; returns the proxy's answer (without "ok ").
sub _control
{
	my ($self, $cmd) = @_;
	croak "proxy $self->{name} is not running" unless $self->{pid};
	my $s = IO::Socket::INET->new(
		PeerAddr => '127.0.0.1',
		PeerPort => $self->{control_port},
		Proto    => 'tcp',
		Timeout  => 5) or croak "proxy $self->{name}: control connect: $!";
	print $s "$cmd\n";
	$s->flush;
	my $sel = IO::Select->new($s);
	my $line = '';
	my $deadline = Time::HiRes::time() + 5;
	while ($line !~ /\n/ && Time::HiRes::time() < $deadline)
	{
		next unless $sel->can_read(0.1);
		my $n = sysread($s, $line, 4096, length $line);
		last unless $n;
	}
	close $s;
	chomp $line;
	croak "proxy $self->{name}: \"$cmd\" failed: " . ($line eq '' ? 'no answer' : $line)
	  unless $line =~ s/^ok\s?//;
	return $line;
}

# Set the mode: pass, delay => MS, drop_s2c, drop_c2s, blackhole.
sub mode
{
	my ($self, $mode, $arg) = @_;
	croak "unknown proxy mode $mode"
	  unless $mode =~ /^(pass|delay|drop_s2c|drop_c2s|blackhole)$/;
	croak "delay needs milliseconds" if $mode eq 'delay' && !defined $arg;
	$self->_control(defined $arg ? "$mode $arg" : $mode);
	$self->{mode} = $mode;
	Test::More::note("proxy $self->{name}: mode $mode" . (defined $arg ? " $arg" : ''));
	return 1;
}

# RST every current connection; returns how many pairs were reset.
sub reset
{
	my ($self) = @_;
	my $n = $self->_control('reset');
	Test::More::note("proxy $self->{name}: reset $n connection(s)");
	return $n;
}

# Counters: {mode, conns (open), accepted, c2s, s2c (bytes forwarded),
# dropped_c2s, dropped_s2c (bytes dropped), resets}.
sub stats
{
	my ($self) = @_;
	my %h = map { split /=/, $_, 2 } split ' ', $self->_control('stats');
	return \%h;
}

# Kill the child by pid and reap it.
sub stop
{
	my ($self) = @_;
	my $pid = $self->{pid};
	return 1 unless $pid && $self->{owner} == $$;
	local ($?, $!);
	kill 'KILL', $pid;
	for (1 .. 100)
	{
		my $r = waitpid($pid, POSIX::WNOHANG());
		last if $r == $pid || $r == -1;
		Time::HiRes::usleep(20_000);
	}
	$self->{pid} = undef;
	return 1;
}

sub DESTROY
{
	my ($self) = @_;
	local ($?, $!, $@);
	eval { $self->stop };
}

END
{
	local ($?, $!, $@);
	for my $p (@all_proxies)
	{
		next unless $p && $p->{owner} == $$;
		eval { $p->stop };
	}
}

# ---------------------------------------------------------------------------
# The child
# ---------------------------------------------------------------------------

sub _nonblock
{
	my ($s) = @_;
	$s->blocking(0);
	setsockopt($s, IPPROTO_TCP, TCP_NODELAY, 1);
}

sub _rst_close
{
	my ($s) = @_;
	return unless $s;
	setsockopt($s, SOL_SOCKET, SO_LINGER, pack('ii', 1, 0));
	close $s;
}

sub _child_main
{
	my ($self, $lis, $ctl, $parent) = @_;
	my $log;
	open $log, '>>', $self->{log_file} or undef $log;
	if ($log)
	{
		my $old = select $log;
		$| = 1;
		select $old;
	}
	my $t0 = Time::HiRes::time();
	my $say = sub {
		return unless $log;
		printf $log "%8.3f %s\n", Time::HiRes::time() - $t0, join('', @_);
	};

	my $mode  = $self->{mode};
	my $delay = 0;
	my %st = (accepted => 0, c2s => 0, s2c => 0, dropped_c2s => 0, dropped_s2c => 0,
		resets => 0);
	my @pairs;    # {c, u, cq => [[due, data]...], uq, cout, uout, id}
	my $next_id = 0;
	$lis->blocking(0);
	$ctl->blocking(0);
	$say->("proxy $self->{name} listening on $self->{port} -> $self->{target_host}:$self->{target_port}, mode $mode");

	my $close_pair = sub {
		my ($p, $why, $rst) = @_;
		for my $k (qw(c u))
		{
			next unless $p->{$k};
			if ($rst) { _rst_close($p->{$k}); }
			else      { close $p->{$k}; }
			$p->{$k} = undef;
		}
		$p->{dead} = 1;
		$say->("conn $p->{id}: closed ($why)");
	};

	my $open_upstream = sub {
		my $u = IO::Socket::INET->new(
			PeerAddr => $self->{target_host},
			PeerPort => $self->{target_port},
			Proto    => 'tcp',
			Timeout  => 2);
		_nonblock($u) if $u;
		return $u;
	};

	my $handle_control = sub {
		my ($c) = @_;
		$c->blocking(1);
		my $line = '';
		my $sel = IO::Select->new($c);
		my $deadline = Time::HiRes::time() + 2;
		while ($line !~ /\n/ && Time::HiRes::time() < $deadline)
		{
			next unless $sel->can_read(0.1);
			my $n = sysread($c, $line, 1024, length $line);
			last unless $n;
		}
		chomp $line;
		my $reply;
		if ($line =~ /^(pass|drop_s2c|drop_c2s|blackhole)$/)
		{
			$mode = $1;
			$delay = 0;
			$reply = "ok $mode";
		}
		elsif ($line =~ /^delay\s+(\d+)$/)
		{
			$mode  = 'delay';
			$delay = $1 / 1000.0;
			$reply = "ok delay $1";
		}
		elsif ($line eq 'reset')
		{
			my $n = 0;
			for my $p (@pairs)
			{
				next if $p->{dead};
				$close_pair->($p, 'reset', 1);
				$n++;
			}
			$st{resets} += $n;
			$reply = "ok $n";
		}
		elsif ($line eq 'stats')
		{
			my $open = grep { !$_->{dead} } @pairs;
			$reply = "ok mode=$mode conns=$open "
			  . join(' ', map { "$_=$st{$_}" } sort keys %st);
		}
		else
		{
			$reply = "error unknown command \"$line\"";
		}
		$say->("control: $line -> $reply");
		print $c "$reply\n";
		close $c;
	};

	while (1)
	{
		POSIX::_exit(0) if getppid() != $parent;
		@pairs = grep { !$_->{dead} } @pairs;

		my $now = Time::HiRes::time();
		my $rsel = IO::Select->new($lis, $ctl);
		my $wsel = IO::Select->new();
		my $timeout = 0.05;
		for my $p (@pairs)
		{
			# read only while little is queued: back pressure
			$rsel->add($p->{c}) if $p->{c} && length($p->{uout}) < (1 << 20) && @{ $p->{cq} } < 4096;
			$rsel->add($p->{u}) if $p->{u} && length($p->{cout}) < (1 << 20) && @{ $p->{uq} } < 4096;
			$wsel->add($p->{u}) if $p->{u} && length $p->{uout};
			$wsel->add($p->{c}) if $p->{c} && length $p->{cout};
			for my $q ($p->{cq}, $p->{uq})
			{
				next unless @$q;
				my $wait = $q->[0][0] - $now;
				$timeout = $wait if $wait < $timeout;
			}
		}
		$timeout = 0 if $timeout < 0;
		my ($r, $w) = IO::Select->select($rsel, $wsel, undef, $timeout);
		$now = Time::HiRes::time();

		for my $s (@{ $r || [] })
		{
			if ($s == $lis)
			{
				while (my $c = $lis->accept)
				{
					_nonblock($c);
					my $p = { id => ++$next_id, c => $c, u => undef, cq => [], uq => [],
						cout => '', uout => '' };
					$st{accepted}++;
					if ($mode ne 'blackhole')
					{
						$p->{u} = $open_upstream->();
						if (!$p->{u})
						{
							$say->("conn $p->{id}: upstream connect failed: $!; RST to the client");
							_rst_close($c);
							next;
						}
					}
					push @pairs, $p;
					$say->("conn $p->{id}: accepted (mode $mode)");
				}
				next;
			}
			if ($s == $ctl)
			{
				while (my $c = $ctl->accept) { $handle_control->($c); }
				next;
			}
			my ($p) = grep { !$_->{dead} && (($_->{c} && $_->{c} == $s) || ($_->{u} && $_->{u} == $s)) } @pairs;
			next unless $p;
			my $from_client = $p->{c} && $p->{c} == $s;
			my $data = '';
			my $n = sysread($s, $data, 65536);
			if (!defined $n)
			{
				next if $! == EAGAIN || $! == EWOULDBLOCK || $! == EINTR;
				$close_pair->($p, ($from_client ? 'client' : 'server') . " read error: $!", 1);
				next;
			}
			if ($n == 0)
			{
				$close_pair->($p, ($from_client ? 'client' : 'server') . ' closed', 0);
				next;
			}
			my $dir = $from_client ? 'c2s' : 's2c';
			if ($mode eq 'blackhole' || $mode eq "drop_$dir" || ($from_client ? !$p->{u} : 0))
			{
				$st{"dropped_$dir"} += $n;
				next;
			}
			push @{ $from_client ? $p->{cq} : $p->{uq} }, [ $now + $delay, $data ];
		}

		# Move due chunks to the output buffers and write what can be written.
		for my $p (@pairs)
		{
			next if $p->{dead};
			while (@{ $p->{cq} } && $p->{cq}[0][0] <= $now)
			{
				$p->{uout} .= (shift @{ $p->{cq} })->[1];
			}
			while (@{ $p->{uq} } && $p->{uq}[0][0] <= $now)
			{
				$p->{cout} .= (shift @{ $p->{uq} })->[1];
			}
			for my $pair ([ 'u', 'uout', 'c2s' ], [ 'c', 'cout', 's2c' ])
			{
				my ($k, $buf, $dir) = @$pair;
				next unless $p->{$k} && length $p->{$buf};
				my $n = syswrite($p->{$k}, $p->{$buf});
				if (!defined $n)
				{
					next if $! == EAGAIN || $! == EWOULDBLOCK || $! == EINTR;
					$close_pair->($p, "write error ($dir): $!", 1);
					last;
				}
				$st{$dir} += $n;
				substr($p->{$buf}, 0, $n) = '';
			}
		}
	}
}

1;
