
# A small NATS / JetStream client in plain Perl, independent of nats.c, for
# the fault suite (test/t/1*.pl): one persistent connection straight to a
# nats-server (never through AgogProxy), pipelined requests, and the
# JetStream calls the tests need:
#
#   my $js = AgogJsClient->new($nats->port);
#   my $info = $js->stream_info('agog_features_research');   # $JS.API.STREAM.INFO
#   my @msgs = $js->stream_messages('agog_features_research');
#       # ({seq, subject, msg_id, body}, ...) by direct gets, seq order
#   $js->js_api('STREAM.UPDATE.agog_features_research', {...});
#
# A lost connection (the server was restarted) is opened again on the next
# call. Nothing here prints to STDOUT/STDERR.

package AgogJsClient;

use strict;
use warnings;

use Carp qw(croak);
use IO::Select;
use IO::Socket::INET;
use JSON::PP;
use Time::HiRes ();

my $JSON = JSON::PP->new->canonical;

# AgogJsClient->new($port, %opts); opts: host (127.0.0.1), timeout_s (5).
# Connects lazily.
sub new
{
	my ($class, $port, %opts) = @_;
	my $self = bless {
		host      => $opts{host} // '127.0.0.1',
		port      => $port,
		timeout_s => $opts{timeout_s} // 5,
		sock      => undef,
		buf       => '',
		inbox     => undef,
		next      => 0,
		replies   => {},
	}, $class;
	return $self;
}

sub close
{
	my ($self) = @_;
	if ($self->{sock})
	{
		CORE::close($self->{sock});
	}
	$self->{sock}    = undef;
	$self->{buf}     = '';
	$self->{replies} = {};
}

sub DESTROY { my ($self) = @_; local ($@, $!, $?); eval { $self->close }; }

sub _connect
{
	my ($self) = @_;
	return 1 if $self->{sock};
	my $s = IO::Socket::INET->new(
		PeerAddr => $self->{host},
		PeerPort => $self->{port},
		Proto    => 'tcp',
		Timeout  => $self->{timeout_s}) or croak "AgogJsClient: connect to $self->{port}: $!";
	binmode $s;
	$s->autoflush(1);
	$self->{sock}  = $s;
	$self->{buf}   = '';
	$self->{inbox} = '_INBOX.agogjs.' . $$ . '.' . int(rand(1e9));
	$self->_send('CONNECT {"verbose":false,"pedantic":false,"headers":true,'
		  . '"no_responders":true,"protocol":1,"lang":"perl","version":"0"}' . "\r\n"
		  . "SUB $self->{inbox}.* 1\r\nPING\r\n");
	my $pong = 0;
	$self->_pump(sub { $pong }, $self->{timeout_s}, sub { $pong = 1 });
	croak "AgogJsClient: no PONG from the server on port $self->{port}" unless $pong;
	return 1;
}

sub _send
{
	my ($self, $data) = @_;
	my $s = $self->{sock};
	my $off = 0;
	use bytes;
	while ($off < length $data)
	{
		my $n = syswrite($s, $data, length($data) - $off, $off);
		if (!defined $n)
		{
			next if $!{EINTR} || $!{EAGAIN};
			my $err = $!;
			$self->close;
			croak "AgogJsClient: write: $err";
		}
		$off += $n;
	}
}

# Read and parse until $done->() is true or $timeout_s passes; replies to our
# inbox go to $self->{replies}{token}. Returns $done->().
sub _pump
{
	my ($self, $done, $timeout_s, $on_pong) = @_;
	my $deadline = Time::HiRes::time() + $timeout_s;
	my $sel = IO::Select->new($self->{sock});
	while (1)
	{
		$self->_parse($on_pong);
		return 1 if $done->();
		my $left = $deadline - Time::HiRes::time();
		return 0 if $left <= 0;
		next unless $sel->can_read($left < 0.2 ? $left : 0.2);
		my $got = sysread($self->{sock}, $self->{buf}, 1 << 20, length $self->{buf});
		if (!$got)
		{
			next if !defined $got && ($!{EINTR} || $!{EAGAIN});
			$self->close;
			croak "AgogJsClient: connection to port $self->{port} closed";
		}
	}
}

sub _parse
{
	my ($self, $on_pong) = @_;
	use bytes;
	while ($self->{buf} =~ /\A([^\r\n]*)\r\n/)
	{
		my $line = $1;
		my $ll   = length($line) + 2;
		if ($line =~ /^H?MSG\s/)
		{
			my ($subj, $hlen, $tlen);
			if ($line =~ /^HMSG\s+(\S+)\s+\S+\s+(?:\S+\s+)?(\d+)\s+(\d+)\s*$/)
			{
				($subj, $hlen, $tlen) = ($1, $2, $3);
			}
			elsif ($line =~ /^MSG\s+(\S+)\s+\S+\s+(?:\S+\s+)?(\d+)\s*$/)
			{
				($subj, $hlen, $tlen) = ($1, 0, $2);
			}
			else
			{
				croak "AgogJsClient: cannot parse \"$line\"";
			}
			return if length($self->{buf}) < $ll + $tlen + 2;
			my $all = substr($self->{buf}, $ll, $tlen);
			substr($self->{buf}, 0, $ll + $tlen + 2) = '';
			my %r = (subject => $subj, headers => {}, status => undef, body => substr($all, $hlen));
			if ($hlen)
			{
				my @hl = split /\r\n/, substr($all, 0, $hlen);
				my $first = shift(@hl) // '';
				if ($first =~ /^NATS\/1\.0\s+(\d+)\s*(.*)$/)
				{
					$r{status}      = $1;
					$r{description} = $2;
				}
				for (@hl)
				{
					$r{headers}{$1} = $2 if /^([^:]+):\s*(.*)$/;
				}
			}
			my $prefix = "$self->{inbox}.";
			if (substr($subj, 0, length $prefix) eq $prefix)
			{
				$self->{replies}{ substr($subj, length $prefix) } = \%r;
			}
			next;
		}
		substr($self->{buf}, 0, $ll) = '';
		if ($line =~ /^PING/)
		{
			$self->_send("PONG\r\n");
		}
		elsif ($line =~ /^PONG/)
		{
			$on_pong->() if $on_pong;
		}
		elsif ($line =~ /^-ERR\s*(.*)/)
		{
			my $e = $1;
			$self->close;
			croak "AgogJsClient: server error $e";
		}
		# INFO, +OK: ignored
	}
}

# Send many requests at once: @$reqs of [subject, payload]. Returns the
# replies in the same order (hash refs: subject, status, description,
# headers, body; undef when none came within timeout_s).
sub requests
{
	my ($self, $reqs, $timeout_s) = @_;
	$timeout_s //= $self->{timeout_s};
	$self->_connect;
	my @tokens;
	my $out = '';
	use bytes;
	for my $r (@$reqs)
	{
		my ($subject, $payload) = @$r;
		$payload //= '';
		my $t = ++$self->{next};
		push @tokens, $t;
		$out .= "PUB $subject $self->{inbox}.$t " . length($payload) . "\r\n$payload\r\n";
	}
	$self->_send($out);
	$self->_pump(sub { !grep { !exists $self->{replies}{$_} } @tokens }, $timeout_s);
	return map { delete $self->{replies}{$_} } @tokens;
}

# One request; the reply (see requests) or undef on timeout.
sub request
{
	my ($self, $subject, $payload, $timeout_s) = @_;
	my ($r) = $self->requests([ [ $subject, $payload ] ], $timeout_s);
	return $r;
}

# A JetStream API call: $JS.API.<$api> with $req (hash ref or string).
# Returns the decoded JSON reply; undef on timeout or no responders.
sub js_api
{
	my ($self, $api, $req, $timeout_s) = @_;
	my $payload = ref $req ? $JSON->encode($req) : ($req // '');
	my $r = $self->request("\$JS.API.$api", $payload, $timeout_s);
	return undef if !$r || (defined $r->{status} && $r->{status} eq '503');
	return $JSON->decode($r->{body});
}

# $JS.API.STREAM.INFO.<stream> (config, state), or undef when the stream
# does not exist; dies on another error or a timeout.
sub stream_info
{
	my ($self, $stream) = @_;
	my $r = $self->js_api("STREAM.INFO.$stream", '');
	croak "AgogJsClient: STREAM.INFO.$stream: no answer" unless $r;
	if ($r->{error})
	{
		return undef if ($r->{error}{err_code} // 0) == 10059;    # stream not found
		croak "AgogJsClient: STREAM.INFO.$stream: $r->{error}{description}";
	}
	return $r;
}

# Every message of $stream, by direct gets of each sequence from first_seq
# to last_seq (pipelined 500 at a time): a list of hash refs {seq, subject,
# msg_id (undef without a Nats-Msg-Id header), body, headers}. Dies when a
# sequence gets no answer or an unexpected error. Returns () for a stream
# that does not exist.
sub stream_messages
{
	my ($self, $stream) = @_;
	my $info = $self->stream_info($stream) or return ();
	my ($first, $last) = ($info->{state}{first_seq}, $info->{state}{last_seq});
	my @msgs;
	return () unless $info->{state}{messages};
	for (my $from = $first; $from <= $last; $from += 500)
	{
		my $to = $from + 499 > $last ? $last : $from + 499;
		my @seqs = ($from .. $to);
		my @replies = $self->requests(
			[ map { [ "\$JS.API.DIRECT.GET.$stream", qq({"seq":$_}) ] } @seqs ], 30);
		for my $i (0 .. $#seqs)
		{
			my $r = $replies[$i];
			croak "AgogJsClient: direct get $stream seq $seqs[$i]: no answer" unless $r;
			next if defined $r->{status} && $r->{status} eq '404';    # deleted
			croak "AgogJsClient: direct get $stream seq $seqs[$i]: status $r->{status} $r->{description}"
			  if defined $r->{status};
			push @msgs, {
				seq     => $r->{headers}{'Nats-Sequence'} // $seqs[$i],
				subject => $r->{headers}{'Nats-Subject'},
				msg_id  => $r->{headers}{'Nats-Msg-Id'},
				body    => $r->{body},
				headers => $r->{headers},
			};
		}
	}
	return @msgs;
}

1;
