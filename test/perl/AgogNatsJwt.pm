
# NATS decentralized (operator mode) authentication for agog_nats TAP tests
# (test/t/*.pl): makes, at test time and from nothing, an operator, a system
# account, an account with JetStream, and user .creds files (a user JWT plus
# its NKey seed) that a nats-server in operator mode accepts.
#
#   use AgogNatsJwt;
#   my $op = AgogNatsJwt->new(dir => $dir);     # operator and accounts
#   my $nats = AgogNatsTest::NatsServer->new(extra_conf => $op->server_conf);
#   my $creds = $op->user_creds('agog');         # "$dir/agog.creds"
#   my $other = $op->stranger_creds('mallory');  # "$dir/mallory.creds", of
#                                                # an account the server
#                                                # does not know
#
# Only core Perl and the openssl command (OpenSSL 3, for Ed25519) are used.
# The formats, as the NATS nkeys and jwt libraries define them:
#
#   public key  base32(prefix . pub32 . crc16)        O..., A..., U...
#   seed        base32(b1 . b2 . seed32 . crc16)      SO..., SA..., SU...
#               b1 = (18 << 3) | (prefix >> 5), b2 = (prefix & 31) << 3
#   prefix      operator 14 << 3, account 0, user 20 << 3
#   crc16       CRC-16/XMODEM (poly 0x1021, init 0), little-endian
#   base32      RFC 4648 alphabet, no padding
#   JWT         base64url(header) . base64url(claims) . base64url(Ed25519
#               signature of the first two parts by the issuer's seed),
#               no padding; header {"typ":"JWT","alg":"ed25519-nkey"}
#
# openssl works on DER files: PKCS#8 private keys and SubjectPublicKeyInfo
# public keys, whose last 32 bytes are the raw seed and public key. These
# temporary files are made in $dir and removed; any openssl failure dies.

package AgogNatsJwt;

use strict;
use warnings;

use Carp qw(croak);
use Digest::SHA qw(sha512256);
use Fcntl qw(O_WRONLY O_CREAT O_TRUNC);
use File::Path qw(make_path);
use File::Temp ();
use JSON::PP;
use MIME::Base64 qw(encode_base64url);
use POSIX ();

our $OPENSSL = $ENV{OPENSSL} || 'openssl';

my $JSON = JSON::PP->new->canonical;

# NKey type prefix bytes.
my %PREFIX = (
	operator => 14 << 3,    # 'O'
	account  => 0,          # 'A'
	user     => 20 << 3,    # 'U'
);
my $PREFIX_SEED = 18 << 3;  # 'S'

# DER framing of Ed25519 keys (RFC 8410) around the raw 32 bytes.
my $PKCS8_PREFIX = pack('H*', '302e020100300506032b657004220420');
my $SPKI_PREFIX  = pack('H*', '302a300506032b6570032100');

my @B32 = ('A' .. 'Z', '2' .. '7');

# AgogNatsJwt->new(dir => $dir): makes the operator, its system account and
# an account with JetStream enabled; temporary key files and the .creds files
# go in $dir (created if missing).
sub new
{
	my ($class, %opts) = @_;
	my $dir = $opts{dir} // croak 'AgogNatsJwt->new: dir is required';
	make_path($dir) unless -d $dir;
	croak "AgogNatsJwt: cannot create directory $dir" unless -d $dir;

	my $self = bless { dir => $dir, stranger => undef }, $class;

	$self->{operator} = $self->_keypair('operator');
	$self->{system}   = $self->_keypair('account');
	$self->{account}  = $self->_keypair('account');

	$self->{operator_jwt} = $self->_jwt(
		$self->{operator}, $self->{operator}{public}, 'agog_operator',
		{
			type           => 'operator',
			system_account => $self->{system}{public},
		});
	$self->{system_jwt} = $self->_jwt(
		$self->{operator}, $self->{system}{public}, 'SYS',
		_account_nats(0));
	$self->{account_jwt} = $self->_jwt(
		$self->{operator}, $self->{account}{public}, 'agog',
		_account_nats(1));
	return $self;
}

# Text for nats-server's configuration: the trusted operator (its JWT
# inline), the system account, and a MEMORY resolver preloaded with both
# accounts. No listen line and no jetstream block: the caller adds those.
sub server_conf
{
	my ($self) = @_;
	return <<"EOF";
# operator mode (AgogNatsJwt)
operator: "$self->{operator_jwt}"
system_account: $self->{system}{public}
resolver: MEMORY
resolver_preload: {
    $self->{system}{public}: "$self->{system_jwt}"
    $self->{account}{public}: "$self->{account_jwt}"
}
EOF
}

# Writes "$dir/$name.creds" (mode 0600) for a new user of the JetStream
# account; returns its path.
sub user_creds
{
	my ($self, $name) = @_;
	return $self->_user_creds($name, $self->{account});
}

# Writes "$dir/$name.creds" (mode 0600) for a new user of an account that
# the operator never signed (made once, on the first call); returns its path.
sub stranger_creds
{
	my ($self, $name) = @_;
	unless ($self->{stranger})
	{
		# The server looks the user's account up in its resolver, does not
		# find it, and refuses the user.
		$self->{stranger} = $self->_keypair('account');
	}
	return $self->_user_creds($name, $self->{stranger});
}

# A user of $account named $name: its JWT signed by the account, written
# with its seed as "$dir/$name.creds".
sub _user_creds
{
	my ($self, $name, $account) = @_;
	croak 'AgogNatsJwt: a user name of letters, digits, _ . - is required'
	  unless defined $name && $name =~ /^[A-Za-z0-9_.-]+$/;
	my $user = $self->_keypair('user');
	my $jwt  = $self->_jwt(
		$account, $user->{public}, $name,
		{
			type    => 'user',
			pub     => {},
			sub     => {},
			subs    => -1,
			data    => -1,
			payload => -1,
		});
	my $path = "$self->{dir}/$name.creds";
	write_file($path, <<"EOF", 0600);
-----BEGIN NATS USER JWT-----
$jwt
------END NATS USER JWT------

************************* IMPORTANT *************************
NKEY Seed printed below can be used to sign and prove identity.
NKEYs are sensitive and should be treated as secrets.

-----BEGIN USER NKEY SEED-----
$user->{seed}
------END USER NKEY SEED------

*************************************************************
EOF
	return $path;
}

# The "nats" claims of an account: no limits, and JetStream enabled
# (unlimited) when $jetstream is true.
sub _account_nats
{
	my ($jetstream) = @_;
	my %limits = (
		subs      => -1,
		data      => -1,
		payload   => -1,
		imports   => -1,
		exports   => -1,
		wildcards => JSON::PP::true,
		conn      => -1,
		leaf      => -1,
	);
	if ($jetstream)
	{
		$limits{$_} = -1 for qw(mem_storage disk_storage streams consumer);
	}
	return {
		type                => 'account',
		limits              => \%limits,
		default_permissions => { pub => {}, sub => {} },
	};
}

# A JWT for $subject (a public key) named $name, issued and signed by the
# key pair $issuer; $nats holds the "nats" claims (version 2 is added).
sub _jwt
{
	my ($self, $issuer, $subject, $name, $nats) = @_;
	my %claims = (
		jti  => '',
		iat  => time(),
		iss  => $issuer->{public},
		name => $name,
		sub  => $subject,
		nats => { %$nats, version => 2 },
	);
	# As the jwt library does: the id is the hash of the claims without it.
	$claims{jti} = base32_encode(sha512256($JSON->encode(\%claims)));
	my $header = encode_base64url($JSON->encode({ typ => 'JWT', alg => 'ed25519-nkey' }));
	my $body   = encode_base64url($JSON->encode(\%claims));
	my $sig    = $self->_sign($issuer->{raw_seed}, "$header.$body");
	return "$header.$body." . encode_base64url($sig);
}

# A new key pair of $type (operator, account, user): a hash with raw_seed,
# raw_public, seed (S...) and public (O..., A..., U...).
sub _keypair
{
	my ($self, $type) = @_;
	my $der = $self->_with_tempfiles(
		1,
		sub {
			my ($key) = @_;
			$self->_openssl('genpkey', '-algorithm', 'ed25519', '-outform', 'DER',
				'-out', $key);
			return _read_file($key);
		});
	croak "AgogNatsJwt: openssl genpkey made an unexpected Ed25519 key ("
	  . length($der) . " bytes)"
	  unless length($der) == 48 && substr($der, 0, 16) eq $PKCS8_PREFIX;
	my $raw_seed   = substr($der, 16, 32);
	my $raw_public = $self->_raw_public_from_seed($raw_seed);
	return {
		type       => $type,
		raw_seed   => $raw_seed,
		raw_public => $raw_public,
		seed       => encode_seed($type, $raw_seed),
		public     => encode_public($type, $raw_public),
	};
}

# The raw 32-byte Ed25519 public key of the raw 32-byte seed $raw_seed (by
# openssl).
sub _raw_public_from_seed
{
	my ($self, $raw_seed) = @_;
	my $der = $self->_with_tempfiles(
		2,
		sub {
			my ($key, $pub) = @_;
			write_file($key, $PKCS8_PREFIX . $raw_seed, 0600);
			$self->_openssl('pkey', '-inform', 'DER', '-in', $key, '-pubout',
				'-outform', 'DER', '-out', $pub);
			return _read_file($pub);
		});
	croak "AgogNatsJwt: openssl pkey made an unexpected Ed25519 public key ("
	  . length($der) . " bytes)"
	  unless length($der) == 44 && substr($der, 0, 12) eq $SPKI_PREFIX;
	return substr($der, 12, 32);
}

# The 64-byte Ed25519 signature of $data by the raw seed $raw_seed (by
# openssl pkeyutl -rawin).
sub _sign
{
	my ($self, $raw_seed, $data) = @_;
	my $sig = $self->_with_tempfiles(
		3,
		sub {
			my ($key, $in, $out) = @_;
			write_file($key, $PKCS8_PREFIX . $raw_seed, 0600);
			write_file($in, $data, 0600);
			$self->_openssl('pkeyutl', '-sign', '-rawin', '-inkey', $key,
				'-keyform', 'DER', '-in', $in, '-out', $out);
			return _read_file($out);
		});
	croak "AgogNatsJwt: openssl pkeyutl made a signature of " . length($sig)
	  . " bytes, not 64"
	  unless length($sig) == 64;
	return $sig;
}

# Encoded public key (O..., A..., U...) of $type for the raw key $raw.
sub encode_public
{
	my ($type, $raw) = @_;
	croak "AgogNatsJwt: unknown key type $type" unless exists $PREFIX{$type};
	my $bytes = chr($PREFIX{$type}) . $raw;
	return base32_encode($bytes . pack('v', crc16($bytes)));
}

# Encoded seed (SO..., SA..., SU...) of $type for the raw seed $raw.
sub encode_seed
{
	my ($type, $raw) = @_;
	croak "AgogNatsJwt: unknown key type $type" unless exists $PREFIX{$type};
	my $p     = $PREFIX{$type};
	my $bytes = chr($PREFIX_SEED | ($p >> 5)) . chr(($p & 31) << 3) . $raw;
	return base32_encode($bytes . pack('v', crc16($bytes)));
}

# CRC-16/XMODEM of $data: polynomial 0x1021, initial value 0, unreflected.
sub crc16
{
	my ($data) = @_;
	my $crc = 0;
	for my $byte (unpack('C*', $data))
	{
		$crc ^= $byte << 8;
		for (1 .. 8)
		{
			$crc = ($crc & 0x8000) ? (($crc << 1) ^ 0x1021) : ($crc << 1);
			$crc &= 0xffff;
		}
	}
	return $crc;
}

# RFC 4648 base32 of $data, without padding.
sub base32_encode
{
	my ($data) = @_;
	my $bits = unpack('B*', $data);
	$bits .= '0' x ((5 - length($bits) % 5) % 5);
	return join('', map { $B32[oct("0b$_")] } $bits =~ /(.{5})/g);
}

# Calls $code with the names of $n new, empty files (mode 0600) in $dir and
# returns its result; the files are removed afterwards, also when it dies.
sub _with_tempfiles
{
	my ($self, $n, $code) = @_;
	my @files;
	my $result = eval {
		push @files, $self->_tempfile for 1 .. $n;
		$code->(@files);
	};
	my $err = $@;
	unlink @files;
	die $err unless defined $result;
	return $result;
}

# The name of a new, empty file (mode 0600) in $dir, for the caller to use
# and remove.
sub _tempfile
{
	my ($self) = @_;
	my ($fh, $name) = File::Temp::tempfile('nkeyXXXXXX', DIR => $self->{dir}, UNLINK => 0);
	close $fh;
	return $name;
}

# Runs openssl with @args (no shell, stdin from /dev/null, output to a
# temporary file in $dir); dies with the command and its output unless it
# exits with 0.
sub _openssl
{
	my ($self, @args) = @_;
	my ($out_fh, $out_file) =
	  File::Temp::tempfile('opensslXXXXXX', DIR => $self->{dir}, UNLINK => 0);
	my $pid = fork();
	unless (defined $pid)
	{
		unlink $out_file;
		croak "AgogNatsJwt: fork for openssl: $!";
	}
	if ($pid == 0)
	{
		# STDOUT/STDERR may be tied by PostgreSQL::Test::Utils: use the fds.
		my $null = POSIX::open('/dev/null', POSIX::O_RDONLY());
		POSIX::dup2($null, 0) if defined $null;
		POSIX::dup2(fileno($out_fh), 1);
		POSIX::dup2(fileno($out_fh), 2);
		{ no warnings 'exec'; exec($OPENSSL, @args); }
		my $msg = "cannot run $OPENSSL: $!\n";
		POSIX::write(2, $msg, length $msg);
		POSIX::_exit(127);    # no END blocks in the child
	}
	close $out_fh;
	my $r = waitpid($pid, 0);
	my $status = $?;
	my $output = -s $out_file ? _read_file($out_file) : '';
	unlink $out_file;
	if ($r != $pid || $status != 0)
	{
		my $how = ($r != $pid) ? "waitpid: $!"
		  : ($status & 127) ? 'killed by signal ' . ($status & 127)
		  : 'exit code ' . ($status >> 8);
		$output =~ s/\s+$//;
		croak "AgogNatsJwt: openssl failed ($how): $OPENSSL "
		  . join(' ', @args) . ($output ne '' ? "\n$output" : '');
	}
	return 1;
}

# The whole content of $path, in binary.
sub _read_file
{
	my ($path) = @_;
	open my $fh, '<:raw', $path or croak "AgogNatsJwt: cannot read $path: $!";
	local $/;
	my $data = <$fh>;
	close $fh;
	return $data // '';
}

# Writes $data to $path (created or truncated) with mode $mode; the
# tests call it too, for files of their own (AgogNatsJwt::write_file).
sub write_file
{
	my ($path, $data, $mode) = @_;
	sysopen(my $fh, $path, O_WRONLY | O_CREAT | O_TRUNC, $mode)
	  or croak "AgogNatsJwt: cannot write $path: $!";
	binmode $fh;
	print $fh $data or croak "AgogNatsJwt: cannot write $path: $!";
	close $fh or croak "AgogNatsJwt: cannot write $path: $!";
	chmod($mode, $path) or croak "AgogNatsJwt: cannot chmod $path: $!";
	return 1;
}

1;
