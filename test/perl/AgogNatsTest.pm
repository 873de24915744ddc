
# Helpers for agog_nats TAP tests (test/t/*.pl), on top of PostgreSQL 15's
# PostgreSQL::Test::Cluster / PostgreSQL::Test::Utils. test/run.sh puts this
# directory on PERL5LIB; a test starts with:
#
#   use PostgreSQL::Test::Cluster;
#   use PostgreSQL::Test::Utils;
#   use Test::More;
#   use AgogNatsTest;
#
#   my $nats = AgogNatsTest::NatsServer->new;      # a private nats-server
#   $nats->start;
#   my $node = AgogNatsTest::new_node('main', $nats, 'agog_nats.timeout_ms' => 500);
#   $node->start;
#   ...
#   ok(AgogNatsTest::wait_for(sub { $nats->stream_info('REPORTS') }, 10), 'stream made');
#
# Every nats-server started here is stopped when its object goes away and at
# exit, by its pid (never by name). Its pid is also written to nats.pid in
# its directory so that test/run.sh can stop it if the test is killed.

package AgogNatsTest;

use strict;
use warnings;

use File::Basename qw(basename);
use IO::Socket::INET;
use Time::HiRes qw(usleep);
use IPC::Run;
use PostgreSQL::Test::Utils;
use PostgreSQL::Test::Cluster;

our $NATS_SERVER = $ENV{NATS_SERVER} || '/usr/sbin/nats-server';

# A free TCP port on 127.0.0.1. Uses PostgreSQL::Test::Cluster's allocator,
# which also reserves the port (lock file) so that nodes and other tests
# running at the same time do not get it.
sub free_port
{
	return PostgreSQL::Test::Cluster::get_free_port();
}

# True when 127.0.0.1:$port accepts a TCP connection within $timeout_s.
sub port_accepts
{
	my ($port, $timeout_s) = @_;
	my $s = IO::Socket::INET->new(
		PeerAddr => '127.0.0.1',
		PeerPort => $port,
		Proto    => 'tcp',
		Timeout  => $timeout_s // 1);
	return 0 unless $s;
	close $s;
	return 1;
}

# Poll $code every 100 ms until it returns true (returns true) or
# $timeout_s seconds (default 10) have passed (returns false).
sub wait_for
{
	my ($code, $timeout_s) = @_;
	$timeout_s //= 10;
	my $deadline = Time::HiRes::time() + $timeout_s;
	while (1)
	{
		return 1 if $code->();
		return 0 if Time::HiRes::time() >= $deadline;
		usleep(100_000);
	}
}

# Quote a postgresql.conf value: numbers as they are, anything else in
# single quotes. A scalar ref is written verbatim: \"on".
sub _conf_value
{
	my ($v) = @_;
	return $$v if ref $v eq 'SCALAR';
	return $v if $v =~ /^-?\d+(\.\d+)?$/;
	$v =~ s/'/''/g;
	return "'$v'";
}

# A PostgreSQL::Test::Cluster node (initialised, not started) that preloads
# agog_nats and points it at $nats (an AgogNatsTest::NatsServer, a URL
# string, or undef for no agog_nats.url). %extra_conf adds or overrides
# postgresql.conf settings (later lines win); the key '_init' may hold a
# hash ref of options for $node->init.
sub new_node
{
	my ($name, $nats, %extra_conf) = @_;
	my $init_opts = delete $extra_conf{_init} || {};
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init(%$init_opts);

	my $url = ref $nats ? $nats->url : $nats;
	my $conf = "\n# agog_nats (AgogNatsTest::new_node)\n"
	  . "shared_preload_libraries = 'agog_nats'\n";
	$conf .= "agog_nats.url = " . _conf_value($url) . "\n" if defined $url;
	$conf .= "agog_nats.database = 'postgres'\n"
	  . "agog_nats.timeout_ms = 2000\n";
	$conf .= "$_ = " . _conf_value($extra_conf{$_}) . "\n"
	  for sort keys %extra_conf;
	$node->append_conf('postgresql.conf', $conf);
	return $node;
}

# True when the worker of $node is connected with every agent stream (six
# or more) in place.
sub worker_ready
{
	my ($node) = @_;
	return $node->safe_psql('postgres',
		'SELECT connected AND streams_ok >= 6 AND streams_failed = 0 FROM agog_worker_status()') eq 't';
}

# A node that connects to $nats with the settings %conf (credentials, TLS):
# started, with the extension, and checked (Test::More assertions) to get its
# worker connected with the six streams, and a backend to publish a report
# and fetch it back.  $report is [agent, task type, the agent's stream,
# feature, text]; $how says how it connects, for the test names.  Returns
# the node.
sub start_secured_node
{
	my ($name, $nats, $how, $report, %conf) = @_;
	my ($agent, $task_type, $stream, $feature, $text) = @$report;
	my $node = new_node($name, $nats, %conf);
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION agog_nats');
	Test::More::ok(wait_for(
			sub { worker_ready($node) },
			20),
		"the worker connects $how and puts the six streams in place");
	Test::More::like($node->safe_psql('postgres',
			"SELECT agog_publish_report_now('$agent', '$task_type', '$feature', '$text')"),
		qr/^\Q$stream\E\.\d+$/, "a backend publishes $how");
	Test::More::is($node->safe_psql('postgres',
			"SELECT content FROM agog_fetch_report('$agent', '$task_type', '$feature')"),
		$text, '... and fetches');
	return $node;
}

# $count backends one after the other, each opening its own NATS connection
# (pgbench -C), must all connect: with NKey signatures (an NKey or a
# credentials file) nats.c 3.4.1 leaves a signature whose first byte is zero
# out of its CONNECT, one connect in 256, and the server refuses it
# (Test::More assertions).
sub connects_every_time
{
	my ($node, $count, $how) = @_;
	my $script = PostgreSQL::Test::Utils::tempdir() . '/connect.sql';
	open(my $fh, '>', $script) or die "cannot write $script: $!";
	print $fh "SELECT count(*) FROM agog_stream_status();\n";
	close($fh);
	my ($stdout, $stderr);
	my $ok = IPC::Run::run(
		[ 'pgbench', '-n', '-C', '-c', '1', '-t', $count, '-f', $script,
		  '-h', $node->host, '-p', $node->port, 'postgres' ],
		'>', \$stdout, '2>', \$stderr);
	Test::More::ok($ok, "$how: $count backends in a row connect (pgbench exit code 0)")
	  or Test::More::diag($stderr);
	Test::More::like($stdout, qr{actually processed: $count/$count\b},
		"$how: $count of $count connects");
}

# A backend's $call must fail to connect with SQLSTATE $sqlstate, and the
# worker must be disconnected too (Test::More assertions); $what names the
# cause for the test names.
sub refused
{
	my ($node, $call, $sqlstate, $what) = @_;
	my ($rc, $stdout, $stderr) = $node->psql('postgres', $call, extra_params => [ '-v', 'VERBOSITY=verbose' ]);
	Test::More::isnt($rc, 0, "$what: the call fails");
	Test::More::like($stderr, qr/ERROR:\s+\Q$sqlstate\E: could not connect to NATS/, "... with SQLSTATE $sqlstate");
	Test::More::ok(wait_for(
			sub { $node->safe_psql('postgres', 'SELECT NOT connected FROM agog_worker_status()') eq 't' },
			20),
		"$what: the worker is refused too");
}

# Point $setting at $file (a wrong secret) and reload: the worker reconnects
# and stays disconnected, and a backend's $call fails with 28000 (Test::More
# assertions).  Returns the log offset taken before the reload.
sub refused_after_reload
{
	my ($node, $setting, $file, $what, $call) = @_;
	$node->append_conf('postgresql.conf', "$setting = '$file'\n");
	my $from = log_offset($node);
	$node->reload;
	Test::More::ok(wait_for(
			sub { log_since($node, $from) =~ /agog_nats authentication settings changed, reconnecting to NATS/ },
			20),
		"a changed $setting makes the worker reconnect");
	refused($node, $call, '28000', "with $what");
	return $from;
}

# Append $conf (setting lines) to the node's configuration, reload, and
# check (a Test::More assertion) that the worker is connected again.
sub reconnects_with
{
	my ($node, $conf, $what) = @_;
	$node->append_conf('postgresql.conf', $conf);
	$node->reload;
	Test::More::ok(wait_for(
			sub { $node->safe_psql('postgres', 'SELECT connected FROM agog_worker_status()') eq 't' },
			30),
		"with $what again the worker reconnects");
}

# Append $conf (setting lines) to the node's configuration, reload, wait
# (a Test::More assertion) until SHOW $setting matches $like, and return
# the verbose error text of agog_publish_report_now from a new backend
# (empty when it succeeds).
sub error_after_reload
{
	my ($node, $conf, $setting, $like, $what) = @_;
	$node->append_conf('postgresql.conf', $conf);
	$node->reload;
	Test::More::ok(wait_for(sub { $node->safe_psql('postgres', "SHOW $setting") =~ $like }, 10),
		"the reload sets $setting ($what)");
	my ($ret, $out, $err) = $node->psql('postgres',
		q{SELECT agog_publish_report_now('cynthia', 'research', 'after-reload', 'x')},
		extra_params => [ '-v', 'VERBOSITY=verbose' ]);
	return $err;
}

# Take the outbox report of $feature on $node to its tenth attempt: wait
# (a Test::More assertion, $refused_s seconds) until its last_error matches
# the ILIKE pattern $error_like, set its attempts to 9 and make it due, and
# wait (an assertion, $tenth_s seconds) until the tenth attempt's outcome is
# recorded.  Returns "<state> <attempts> <next attempt over 20 s away>".
sub tenth_refusal
{
	my ($node, $feature, $error_like, $name, $refused_s, $tenth_s) = @_;
	my $row_sql = "SELECT state || ' ' || attempts || ' ' || coalesce(last_error, '') "
	  . "FROM agog_nats.outbox WHERE feature = '$feature'";
	my $where = "FROM agog_nats.outbox WHERE feature = '$feature'";
	Test::More::ok(wait_for(
			sub { $node->safe_psql('postgres', "SELECT last_error ILIKE '$error_like' $where") eq 't' },
			$refused_s),
		"$name: refused with $error_like")
	  or Test::More::diag($node->safe_psql('postgres', $row_sql));
	$node->safe_psql('postgres',
		"UPDATE agog_nats.outbox SET attempts = 9, last_error = NULL, next_attempt_at = now() "
		  . "WHERE feature = '$feature'");
	Test::More::ok(wait_for(
			sub {
				$node->safe_psql('postgres',
					"SELECT attempts >= 10 AND last_error IS NOT NULL $where") eq 't';
			},
			$tenth_s),
		"$name: the tenth attempt is recorded")
	  or Test::More::diag($node->safe_psql('postgres', $row_sql));
	return $node->safe_psql('postgres',
		"SELECT state || ' ' || attempts || ' ' || (next_attempt_at > now() + interval '20 s') $where");
}

# True once agog_fetch_report($agent, $task_type, $feature) on $node returns
# $content (a report committed in a transaction: the worker publishes it
# after the commit), within $timeout seconds (default 20).
sub fetches
{
	my ($node, $agent, $task_type, $feature, $content, $timeout) = @_;
	my $sql = "SELECT content FROM agog_fetch_report('$agent', '$task_type', '$feature')";
	return wait_for(sub { $node->safe_psql('postgres', $sql) eq $content }, $timeout // 20);
}


package AgogNatsTest::NatsServer;

use strict;
use warnings;

use Carp qw(croak);
use File::Basename qw(basename);
use File::Path qw(make_path remove_tree);
use HTTP::Tiny;
use IO::Select;
use IO::Socket::INET;
use JSON::PP;
use POSIX qw(:sys_wait_h);
use Scalar::Util qw(weaken);
use Time::HiRes qw(usleep);
use PostgreSQL::Test::Utils;
use Test::More ();

my @all_servers;    # weak references, for the END block
my $seq = 0;

# AgogNatsTest::NatsServer->new(%opts); opts:
#   port          client port (default: a free one)
#   monitor_port  HTTP monitoring port (default: a free one)
#   store_dir     JetStream store (default: a new dir under the test's tempdir)
#   max_payload   default 10485760
#   extra_conf    text appended to nats.conf (e.g. an authorization block)
#   name          used in the log file name (default nats1, nats2, ...)
sub new
{
	my ($class, %opts) = @_;
	$seq++;
	my $dir  = PostgreSQL::Test::Utils::tempdir('nats');
	my $name = $opts{name} // "nats$seq";
	my $test = basename($0);
	$test =~ s/\.[^.]+$//;
	my $self = bless {
		name         => $name,
		dir          => $dir,
		port         => $opts{port} // AgogNatsTest::free_port(),
		monitor_port => $opts{monitor_port} // AgogNatsTest::free_port(),
		store_dir    => $opts{store_dir} // "$dir/js",
		max_payload  => $opts{max_payload} // 10485760,
		extra_conf   => $opts{extra_conf} // '',
		jetstream    => $opts{jetstream} // 1,
		conf_file    => "$dir/nats.conf",
		pid_file     => "$dir/nats.pid",
		log_file => "$PostgreSQL::Test::Utils::log_path/${test}_$name.log",
		pid      => undef,
		frozen   => 0,
		owner    => $$,
	}, $class;
	push @all_servers, $self;
	weaken($all_servers[-1]);
	return $self;
}

sub port         { return $_[0]->{port}; }
sub monitor_port { return $_[0]->{monitor_port}; }
sub pid          { return $_[0]->{pid}; }
sub store_dir    { return $_[0]->{store_dir}; }
sub log_file     { return $_[0]->{log_file}; }
sub conf_file    { return $_[0]->{conf_file}; }
sub url          { return "nats://127.0.0.1:$_[0]->{port}"; }

# True while the server process runs (a frozen one counts as running).
sub is_running
{
	my ($self) = @_;
	return 0 unless defined $self->{pid};
	local ($?, $!);
	my $r = waitpid($self->{pid}, WNOHANG);
	if ($r == $self->{pid} || $r == -1)
	{
		$self->_forget;
		return 0;
	}
	return 1;
}

sub _write_conf
{
	my ($self) = @_;
	open my $fh, '>', $self->{conf_file}
	  or croak "cannot write $self->{conf_file}: $!";
	# jetstream => 0: a core NATS server, on which nothing answers $JS.API
	my $js = $self->{jetstream} ? "jetstream {\n    store_dir: \"$self->{store_dir}\"\n}" : '';
	print $fh <<"EOF";
# written by AgogNatsTest::NatsServer
listen: 127.0.0.1:$self->{port}
http: 127.0.0.1:$self->{monitor_port}
max_payload: $self->{max_payload}
$js
$self->{extra_conf}
EOF
	close $fh;
}

# Start the server; returns once the client port accepts connections (at
# most 10 s), dies otherwise.
sub start
{
	my ($self) = @_;
	croak "nats-server $self->{name} already running" if $self->is_running;
	make_path($self->{store_dir});
	$self->_write_conf;

	my $pid = fork();
	croak "fork: $!" unless defined $pid;
	if ($pid == 0)
	{
		# STDOUT/STDERR are tied by PostgreSQL::Test::Utils: redirect at fd level.
		my $null = POSIX::open('/dev/null', POSIX::O_RDONLY());
		POSIX::dup2($null, 0) if defined $null;
		if (open my $log, '>>', $self->{log_file})
		{
			POSIX::dup2(fileno($log), 1);
			POSIX::dup2(fileno($log), 2);
		}
		{ exec($AgogNatsTest::NATS_SERVER, '-c', $self->{conf_file}); }
		my $msg = "exec $AgogNatsTest::NATS_SERVER: $!\n";
		POSIX::write(2, $msg, length $msg);
		POSIX::_exit(127);    # no END blocks in the child
	}
	$self->{pid}    = $pid;
	$self->{frozen} = 0;
	if (open my $fh, '>', $self->{pid_file})
	{
		print $fh "$pid\n";
		close $fh;
	}

	my $up = AgogNatsTest::wait_for(
		sub {
			return 1 if AgogNatsTest::port_accepts($self->{port}, 1);
			die "nats-server $self->{name} exited at start:\n" . $self->_log_tail
			  unless $self->is_running;
			return 0;
		},
		10);
	unless ($up)
	{
		my $tail = $self->_log_tail;
		$self->kill9;
		croak "nats-server $self->{name} did not listen on port $self->{port} within 10 s:\n$tail";
	}
	Test::More::note("nats-server $self->{name} pid $pid on " . $self->url
		  . " (monitor $self->{monitor_port})");
	return 1;
}

sub _log_tail
{
	my ($self) = @_;
	open my $fh, '<', $self->{log_file} or return '';
	my @l = <$fh>;
	close $fh;
	splice(@l, 0, @l - 30) if @l > 30;
	return join('', @l);
}

sub _forget
{
	my ($self) = @_;
	$self->{pid}    = undef;
	$self->{frozen} = 0;
	unlink $self->{pid_file};
}

# Wait up to $timeout_s for the process to exit; true when it did.
sub _reap
{
	my ($self, $timeout_s) = @_;
	local ($?, $!);
	my $pid = $self->{pid};
	my $ok  = AgogNatsTest::wait_for(
		sub {
			my $r = waitpid($pid, WNOHANG);
			return $r == $pid || $r == -1;
		},
		$timeout_s);
	$self->_forget if $ok;
	return $ok;
}

# Graceful stop: SIGTERM (and SIGCONT if frozen), wait up to 10 s, then SIGKILL.
sub stop
{
	my ($self) = @_;
	return 1 unless $self->is_running;
	kill 'TERM', $self->{pid};
	kill 'CONT', $self->{pid};
	return 1 if $self->_reap(10);
	Test::More::diag("nats-server $self->{name} ignored SIGTERM; killing it");
	return $self->kill9;
}

# Crash: SIGKILL and wait.
sub kill9
{
	my ($self) = @_;
	return 1 unless $self->is_running;
	kill 'KILL', $self->{pid};
	return 1 if $self->_reap(10);
	croak "nats-server $self->{name} (pid $self->{pid}) did not die";
}

# Stop the process (SIGSTOP): connections stay open but nothing answers.
sub freeze
{
	my ($self) = @_;
	croak "nats-server $self->{name} not running" unless $self->is_running;
	kill 'STOP', $self->{pid};
	$self->{frozen} = 1;

	# SIGSTOP takes effect asynchronously: wait (bounded) until every
	# thread of the server shows as stopped, so a test that connects right
	# after freezing cannot be answered by a thread still running.
	my $deadline = Time::HiRes::time() + 5;
	while (Time::HiRes::time() < $deadline)
	{
		my $running = 0;
		for my $stat (glob("/proc/$self->{pid}/task/*/stat"))
		{
			open(my $fh, '<', $stat) or next;
			my $line = <$fh> // '';
			close $fh;
			$running++ if $line =~ /\)\s+([A-Za-z])\s/ && $1 ne 'T' && $1 ne 't';
		}
		return 1 if $running == 0;
		Time::HiRes::sleep(0.01);
	}
	croak "nats-server $self->{name} did not stop within 5 s of SIGSTOP";
}

# Resume a frozen server (SIGCONT).
sub thaw
{
	my ($self) = @_;
	croak "nats-server $self->{name} not running" unless $self->is_running;
	kill 'CONT', $self->{pid};
	$self->{frozen} = 0;
	return 1;
}

# Stop (if running) and start again: same ports, same store.
sub restart
{
	my ($self) = @_;
	$self->stop;
	return $self->start;
}

# Delete the JetStream store (the server must be stopped): the next start
# has no streams.
sub wipe_store
{
	my ($self) = @_;
	croak "wipe_store: nats-server $self->{name} is running" if $self->is_running;
	remove_tree($self->{store_dir});
	return 1;
}

# GET http://127.0.0.1:<monitor_port><path>, decoded JSON; dies on failure.
sub monitor_get
{
	my ($self, $path) = @_;
	my $url = "http://127.0.0.1:$self->{monitor_port}$path";
	my $res = HTTP::Tiny->new(timeout => 5)->get($url);
	croak "GET $url: $res->{status} $res->{reason}"
	  . ($res->{status} == 599 ? " ($res->{content})" : '')
	  unless $res->{success};
	return JSON::PP->new->decode($res->{content});
}

# The /jsz document with accounts, streams and their configs, or with
# $query (e.g. "consumers=true&accounts=true") instead.
sub jsz
{
	my ($self, $query) = @_;
	$query //= 'accounts=true&streams=true&config=true';
	return $self->monitor_get("/jsz?$query");
}

# The stream named $name as /jsz shows it ({name, config, state, ...},
# state has messages, bytes, first_seq, last_seq, ...), or undef.
sub stream_info
{
	my ($self, $name) = @_;
	my $jsz = $self->jsz;
	for my $acc (@{ $jsz->{account_details} || [] })
	{
		for my $s (@{ $acc->{stream_detail} || [] })
		{
			return $s if defined $s->{name} && $s->{name} eq $name;
		}
	}
	return undef;
}

# A minimal NATS client, independent of nats.c: send $payload to $subject
# with a reply inbox and return the first reply's payload, or undef after
# $timeout_s (default 5). With headers enabled, a "no responders" status
# reply is returned as the string "NO_RESPONDERS". Good for JetStream API
# calls ($JS.API.STREAM.CREATE.X ...) and publishes (the reply is the ack).
sub request
{
	my ($self, $subject, $payload, $timeout_s) = @_;
	$payload   //= '';
	$timeout_s //= 5;
	my $s = IO::Socket::INET->new(
		PeerAddr => '127.0.0.1',
		PeerPort => $self->{port},
		Proto    => 'tcp',
		Timeout  => $timeout_s) or return undef;
	binmode $s;
	my $inbox = "_INBOX.agogtest." . int(rand(1e9));
	my $connect = '{"verbose":false,"pedantic":false,"headers":true,'
	  . '"no_responders":true,"protocol":1,"lang":"perl","version":"0"}';
	{
		use bytes;
		print $s "CONNECT $connect\r\nSUB $inbox 1\r\n"
		  . "PUB $subject $inbox " . length($payload) . "\r\n$payload\r\n";
	}
	$s->flush;

	my $buf      = '';
	my $deadline = Time::HiRes::time() + $timeout_s;
	my $sel      = IO::Select->new($s);
	while (Time::HiRes::time() < $deadline)
	{
		# Parse complete protocol lines in $buf.
		while ($buf =~ /\A([^\r\n]*)\r\n/)
		{
			my $line = $1;
			# MSG <subject> <sid> [reply] <size>; the reply field may be empty
			if ($line =~ /^MSG\s+\S+\s+1\s+(?:\S+\s+)?(\d+)\s*$/)
			{
				my $n = $1;
				last if length($buf) < length($line) + 2 + $n + 2;
				my $body = substr($buf, length($line) + 2, $n);
				close $s;
				return $body;
			}
			if ($line =~ /^HMSG\s+\S+\s+1\s+(?:\S+\s+)?(\d+)\s+(\d+)\s*$/)
			{
				my ($h, $n) = ($1, $2);
				last if length($buf) < length($line) + 2 + $n + 2;
				my $all = substr($buf, length($line) + 2, $n);
				close $s;
				my $hdr = substr($all, 0, $h);
				return 'NO_RESPONDERS' if $hdr =~ /^NATS\/1\.0 503/;
				return substr($all, $h);
			}
			print $s "PONG\r\n" if $line =~ /^PING/;
			if ($line =~ /^-ERR/)
			{
				close $s;
				croak "nats request $subject: $line";
			}
			substr($buf, 0, length($line) + 2) = '';
		}
		next unless $sel->can_read(0.1);
		my $got = sysread($s, $buf, 65536, length($buf));
		last unless $got;
	}
	close $s;
	return undef;
}

# A JetStream API call: request to $JS.API.<$api> with $req (a hash ref,
# encoded as JSON, or a string), decoded JSON reply or undef on timeout.
sub js_api
{
	my ($self, $api, $req, $timeout_s) = @_;
	my $payload = ref $req ? JSON::PP->new->canonical->encode($req) : ($req // '');
	my $r = $self->request("\$JS.API.$api", $payload, $timeout_s);
	return undef unless defined $r && $r ne 'NO_RESPONDERS';
	return JSON::PP->new->decode($r);
}

sub DESTROY
{
	my ($self) = @_;
	local ($?, $!, $@);
	return unless $self->{owner} && $self->{owner} == $$;
	eval { $self->stop if defined $self->{pid}; };
}

END
{
	local ($?, $!, $@);
	for my $srv (@all_servers)
	{
		next unless $srv && $srv->{owner} == $$;
		eval { $srv->stop if defined $srv->{pid}; };
	}
}

1;

# ---------------------------------------------------------------------------
# Helpers added for 010_worker_lifecycle, 020_faults and 030_dump_restore.
# ---------------------------------------------------------------------------

package AgogNatsTest;

use strict;
use warnings;

# The six built-in agents of the seed: task type => agent.
our %BUILTIN_AGENTS = (
	research   => 'cynthia',
	critique   => 'sylvia',
	backend    => 'roy',
	frontend   => 'jen',
	qa         => 'billy',
	statistics => 'priya');

# Names of the six built-in agent streams, sorted.
sub builtin_streams
{
	return map { "agog_features_$_" } sort keys %BUILTIN_AGENTS;
}

# agog_worker_status() of $node (database $db, default postgres) as a hash
# ref; NULLs are undef, booleans 1/0, streams_checked_at as epoch seconds.
sub worker_status
{
	my ($node, $db) = @_;
	my $out = $node->safe_psql($db // 'postgres',
		  q{SELECT coalesce(pid::text, '\N'), connected::int, coalesce(server, '\N'), }
		. q{reconnects, disconnects, streams_ok, streams_failed, }
		. q{coalesce(extract(epoch FROM streams_checked_at)::text, '\N'), }
		. q{coalesce(replace(last_error, '|', '/'), '\N') FROM agog_worker_status()});
	my @v = split /\|/, $out, -1;
	my @k = qw(pid connected server reconnects disconnects streams_ok
	  streams_failed streams_checked_at last_error);
	my %h;
	@h{@k} = map { defined $_ && $_ eq '\N' ? undef : $_ } @v;
	return \%h;
}

# Size of the node's server log now: an offset for log_since().
sub log_offset
{
	my ($node) = @_;
	return -s $node->logfile // 0;
}

# The node's server log from byte $offset on.
sub log_since
{
	my ($node, $offset) = @_;
	return PostgreSQL::Test::Utils::slurp_file($node->logfile, $offset // 0);
}

# Differences between a stream as /jsz shows it ($info, from
# NatsServer::stream_info) and the configuration the worker must give the
# built-in stream of task type $task_type; %want may override
# duplicate_window (ns, default 2 min) and num_replicas (default 1).
# Returns a list of "field: got X, want Y" strings, empty when it matches.
sub stream_config_problems
{
	my ($info, $task_type, %want) = @_;
	return ("stream agog_features_$task_type is missing") unless $info;
	my $agent = $BUILTIN_AGENTS{$task_type} // $want{agent};
	my $c     = $info->{config} || {};
	my @p;
	my $subjects = join(',', @{ $c->{subjects} || [] });
	push @p, "subjects: got [$subjects], want [agog.deliverables.$agent.>]"
	  unless $subjects eq "agog.deliverables.$agent.>";
	my %exp = (
		name             => "agog_features_$task_type",
		storage          => 'file',
		retention        => 'limits',
		discard          => 'old',
		max_msgs         => 10000,
		max_bytes        => 1073741824,
		max_age          => 604800000000000,
		duplicate_window => $want{duplicate_window} // 120000000000,
		num_replicas     => $want{num_replicas} // 1);
	for my $k (sort keys %exp)
	{
		my $got = $c->{$k} // '(none)';
		push @p, "$k: got $got, want $exp{$k}" unless "$got" eq "$exp{$k}";
	}
	push @p, "allow_direct: got " . ($c->{allow_direct} ? 'true' : 'false') . ", want true"
	  unless $c->{allow_direct};
	return @p;
}

# Problems with all six built-in streams on $nats (one /jsz request);
# empty when all six exist with the expected configuration.
sub builtin_stream_problems
{
	my ($nats, %want) = @_;
	my %seen;
	my $jsz = eval { $nats->jsz };
	return ("monitor request failed: $@") unless $jsz;
	for my $acc (@{ $jsz->{account_details} || [] })
	{
		for my $s (@{ $acc->{stream_detail} || [] })
		{
			$seen{ $s->{name} } = $s if defined $s->{name};
		}
	}
	return map { stream_config_problems($seen{"agog_features_$_"}, $_, %want) }
	  sort keys %BUILTIN_AGENTS;
}


package AgogNatsTest::NatsServer;

use strict;
use warnings;

# Open a client connection (CONNECT with headers and no_responders), or undef.
sub _client
{
	my ($self, $timeout_s) = @_;
	my $s = IO::Socket::INET->new(
		PeerAddr => '127.0.0.1',
		PeerPort => $self->{port},
		Proto    => 'tcp',
		Timeout  => $timeout_s) or return undef;
	binmode $s;
	print $s 'CONNECT {"verbose":false,"pedantic":false,"headers":true,'
	  . '"no_responders":true,"protocol":1,"lang":"perl","version":"0"}' . "\r\n";
	return $s;
}

# Read from $s until $want (a code ref given the buffer, returning a result
# or undef to keep reading) answers, or $timeout_s passes (undef). Answers
# the server's PINGs; dies on -ERR.
sub _read_until
{
	my ($s, $want, $timeout_s) = @_;
	my $buf      = '';
	my $deadline = Time::HiRes::time() + $timeout_s;
	my $sel      = IO::Select->new($s);
	while (Time::HiRes::time() < $deadline)
	{
		while ($buf =~ /\A([^\r\n]*)\r\n/)
		{
			my $line = $1;
			if ($line =~ /^-ERR/)
			{
				croak "nats: $line";
			}
			if ($line =~ /^PING/)
			{
				print $s "PONG\r\n";
				substr($buf, 0, length($line) + 2) = '';
				next;
			}
			my ($r, $consumed) = $want->($line, $buf);
			return $r if defined $r;
			last if defined $consumed && $consumed < 0;    # need more bytes
			substr($buf, 0, $consumed // length($line) + 2) = '';
		}
		next unless $sel->can_read(0.05);
		my $got = sysread($s, $buf, 65536, length($buf));
		last unless $got;
	}
	return undef;
}

# Plain PUB of $payload to $subject, no reply subject, with no JetStream
# acknowledgement asked for; a PING after it makes sure the server has
# processed the PUB before this returns true (false on timeout).
sub publish
{
	my ($self, $subject, $payload, $timeout_s) = @_;
	$timeout_s //= 5;
	my $s = $self->_client($timeout_s) or return 0;
	{
		use bytes;
		print $s "PUB $subject " . length($payload) . "\r\n$payload\r\nPING\r\n";
	}
	$s->flush;
	my $ok = _read_until($s, sub { return $_[0] =~ /^PONG/ ? 1 : undef }, $timeout_s);
	close $s;
	return $ok ? 1 : 0;
}

# Like request(), but returns the whole reply: a hash ref with subject,
# status (e.g. 404, undef when the reply has no status line), description,
# headers (a hash ref, last value per name) and body; undef on timeout.
sub request_msg
{
	my ($self, $subject, $payload, $timeout_s) = @_;
	$payload   //= '';
	$timeout_s //= 5;
	my $s = $self->_client($timeout_s) or return undef;
	my $inbox = "_INBOX.agogtest." . int(rand(1e9));
	{
		use bytes;
		print $s "SUB $inbox 1\r\nPUB $subject $inbox " . length($payload)
		  . "\r\n$payload\r\n";
	}
	$s->flush;
	my $reply = _read_until(
		$s,
		sub {
			my ($line, $buf) = @_;
			if ($line =~ /^MSG\s+(\S+)\s+1\s+(?:\S+\s+)?(\d+)\s*$/)
			{
				my ($subj, $n) = ($1, $2);
				return (undef, -1) if length($buf) < length($line) + 2 + $n + 2;
				return {
					subject => $subj,
					headers => {},
					body    => substr($buf, length($line) + 2, $n)
				};
			}
			if ($line =~ /^HMSG\s+(\S+)\s+1\s+(?:\S+\s+)?(\d+)\s+(\d+)\s*$/)
			{
				my ($subj, $h, $n) = ($1, $2, $3);
				return (undef, -1) if length($buf) < length($line) + 2 + $n + 2;
				my $all = substr($buf, length($line) + 2, $n);
				my @hl  = split /\r\n/, substr($all, 0, $h);
				my $first = shift(@hl) // '';
				my %r = (subject => $subj, headers => {}, body => substr($all, $h));
				if ($first =~ /^NATS\/1\.0\s+(\d+)\s*(.*)$/)
				{
					$r{status}      = $1;
					$r{description} = $2;
				}
				for (@hl)
				{
					$r{headers}{$1} = $2 if /^([^:]+):\s*(.*)$/;
				}
				return \%r;
			}
			return undef;
		},
		$timeout_s);
	close $s;
	return $reply;
}

1;
