
# NATS user credentials for a server in operator (JWT) mode: a .creds file
# (a user JWT and its NKey seed) named by agog_nats.credentials_file, a
# setting only superusers can read.  The operator, the account (with
# JetStream) and the users are made at test time (AgogNatsJwt).  Without
# credentials the server refuses; with a user its operator signed the worker
# and backends connect; a user of an account it does not know is refused
# with 28000; a missing file is 58P01 naming the setting; the file together
# with agog_nats.nkey is 22023; a reload onto the right file reconnects.
# 2,000 backends in a row connect with it (nats.c 3.4.1 signing by itself
# lost one connect in 256); CRLF line ends are read as LF ones.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;
use AgogNatsJwt;

my $dir = PostgreSQL::Test::Utils::tempdir();
my $op = AgogNatsJwt->new(dir => $dir);
my $good = $op->user_creds('agog');

# Write $text as "$dir/$name.creds" (mode 0600, as credentials are).
sub write_creds
{
	my ($name, $text) = @_;
	AgogNatsJwt::write_file("$dir/$name.creds", $text, 0600);
}
my $stranger = $op->stranger_creds('mallory');

my $nats = AgogNatsTest::NatsServer->new(
	name => 'natsjwt',
	extra_conf => $op->server_conf);
$nats->start;

# The server admits signed users only: without credentials a call fails.
my $bare = AgogNatsTest::new_node('bare', $nats);
$bare->start;
$bare->safe_psql('postgres', 'CREATE EXTENSION agog_nats');
AgogNatsTest::refused($bare, q{SELECT agog_publish_report_now('roy', 'backend', 'bare', 'x')},
	'28000', 'without credentials');
$bare->stop;

my $node = AgogNatsTest::start_secured_node('creds', $nats, 'with a credentials file',
	[ 'cynthia', 'research', 'agog_features_research', 'creds', 'signed by the operator' ],
	'agog_nats.credentials_file' => $good);

# Every connect signs the server's nonce; none may fail (nats.c 3.4.1 drops
# one signature in 256 from its CONNECT).
AgogNatsTest::connects_every_time($node, 2000, 'with a credentials file');

# Only superusers see where the credentials are.
$node->safe_psql('postgres', 'CREATE ROLE peeker LOGIN IN ROLE agog_nats_reader');
my ($ret, $out, $err) = $node->psql('postgres', 'SHOW agog_nats.credentials_file',
	extra_params => [ '-U', 'peeker' ]);
like($err, qr/must be superuser or have privileges of pg_read_all_settings/,
	'a non-superuser cannot read agog_nats.credentials_file');

# A user of an account the server does not know: 28000, the worker too.
my $off = AgogNatsTest::refused_after_reload($node, 'agog_nats.credentials_file', $stranger,
	'the credentials of an account the server does not know',
	q{SELECT agog_publish_report_now('cynthia', 'research', 'creds2', 'x')});
like(AgogNatsTest::log_since($node, $off), qr/agog_nats worker could not connect to NATS, retrying/,
	'and says so in the log');

# Back to the right credentials: the worker connects again.
AgogNatsTest::reconnects_with($node, "agog_nats.credentials_file = '$good'\n",
	'the right credentials');
like($node->safe_psql('postgres',
		q{SELECT agog_publish_report_now('cynthia', 'research', 'creds3', 'back')}),
	qr/^agog_features_research\.\d+$/, 'a backend publishes again');

# A file that cannot be read is a clear error naming the setting.
$err = AgogNatsTest::error_after_reload($node, "agog_nats.credentials_file = '$dir/missing.creds'\n",
	'agog_nats.credentials_file', qr/missing/, 'a missing file');
like($err, qr/ERROR:\s+58P01: could not open file ".*missing\.creds" named by agog_nats\.credentials_file/,
	'a missing credentials file: 58P01 naming the setting');

# A file that is not a credentials file: 22023 before any connect.
write_creds('garbage', "this is not a NATS credentials file\n");
$err = AgogNatsTest::error_after_reload($node, "agog_nats.credentials_file = '$dir/garbage.creds'\n",
	'agog_nats.credentials_file', qr/garbage/, 'a malformed file');
like($err, qr/ERROR:\s+22023: file ".*garbage\.creds" named by agog_nats\.credentials_file holds no NATS user credentials/,
	'a file that is not a credentials file: 22023 naming the setting');
like($err, qr/this one has neither/, '... and saying what it lacks');

# The JWT and the seed without their marker lines (each value is read from
# the line after a marker): also 22023.
(my $unmarked = slurp_file($good)) =~ s/^-.*\n//mg;
write_creds('bare', $unmarked);
$err = AgogNatsTest::error_after_reload($node, "agog_nats.credentials_file = '$dir/bare.creds'\n",
	'agog_nats.credentials_file', qr/bare/, 'a file without marker lines');
like($err, qr/ERROR:\s+22023: file ".*bare\.creds" named by agog_nats\.credentials_file holds no NATS user credentials/,
	'JWT and seed without their marker lines: 22023');

# The seed's section first and the JWT's second (the first section is read
# as the JWT): 22023; blank lines after a marker are fine.
my @sections = slurp_file($good) =~ /(-+BEGIN[^\n]*\n[^\n]+\n-+END[^\n]*\n)/g;
is(scalar(@sections), 2, 'the credentials file has two sections');
write_creds('swapped', $sections[1] . "\n" . $sections[0]);
$err = AgogNatsTest::error_after_reload($node, "agog_nats.credentials_file = '$dir/swapped.creds'\n",
	'agog_nats.credentials_file', qr/swapped/, 'a file with the seed first');
like($err, qr/ERROR:\s+22023: file ".*swapped\.creds" named by agog_nats\.credentials_file holds no NATS user credentials/,
	'the seed before the JWT: 22023');
(my $airy = slurp_file($good)) =~ s/^(-+BEGIN[^\n]*\n)/$1\n\n/mg;
write_creds('airy', $airy);
$node->append_conf('postgresql.conf', "agog_nats.credentials_file = '$dir/airy.creds'\n");
$node->reload;
ok(AgogNatsTest::wait_for(
		sub { $node->safe_psql('postgres', 'SHOW agog_nats.credentials_file') =~ /airy/ }, 10),
	'the reload names the file with blank lines after its markers');
AgogNatsTest::reconnects_with($node, '', 'blank lines after the markers');
like($node->safe_psql('postgres',
		q{SELECT agog_publish_report_now('cynthia', 'research', 'creds6', 'airy')}),
	qr/^agog_features_research\.\d+$/, 'a file with blank lines after its markers works');

# Windows line ends: read as LF line ends (the extension reads the file, not
# nats.c 3.4, which read LF only).
(my $crlf = slurp_file($good)) =~ s/\n/\r\n/g;
write_creds('crlf', $crlf);
$err = AgogNatsTest::error_after_reload($node, "agog_nats.credentials_file = '$dir/crlf.creds'\n",
	'agog_nats.credentials_file', qr/crlf/, 'a file with CRLF line ends');
is($err, '', 'a file with CRLF line ends works');

# A JWT wrapped over two lines: 22023 before any connect.
(my $wrapped = slurp_file($good)) =~ s/^(eyJ[^\n]{20})([^\n]+)$/$1\n$2/m;
write_creds('wrapped', $wrapped);
$err = AgogNatsTest::error_after_reload($node, "agog_nats.credentials_file = '$dir/wrapped.creds'\n",
	'agog_nats.credentials_file', qr/wrapped/, 'a file with a wrapped JWT');
like($err, qr/ERROR:\s+22023: file ".*wrapped\.creds" named by agog_nats\.credentials_file holds no NATS user credentials/,
	'a JWT wrapped over two lines: 22023');

# A file far larger than credentials are: 22023 before reading it as one.
write_creds('huge', slurp_file($good) . ('#' x (70 * 1024)) . "\n");
$err = AgogNatsTest::error_after_reload($node, "agog_nats.credentials_file = '$dir/huge.creds'\n",
	'agog_nats.credentials_file', qr/huge/, 'a file of 70 kB');
like($err, qr/ERROR:\s+22023: file ".*huge\.creds" named by agog_nats\.credentials_file is larger than 64 kB/,
	'a file of 70 kB: 22023');

# A credentials file holds its own seed: with agog_nats.nkey as well, 22023.
$err = AgogNatsTest::error_after_reload($node,
	"agog_nats.credentials_file = '$good'\n"
	  . "agog_nats.nkey = 'UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4'\n",
	'agog_nats.nkey', qr/^U/, 'with the credentials file');
like($err, qr/ERROR:\s+22023: agog_nats\.credentials_file and agog_nats\.nkey cannot both be set/,
	'credentials file and NKey together: 22023 naming both settings');

# Only the credentials file again: connected, and the reports are all there.
AgogNatsTest::reconnects_with($node, "agog_nats.nkey = ''\n", 'the credentials file alone');
is($node->safe_psql('postgres',
		q{SELECT content FROM agog_fetch_report('cynthia', 'research', 'creds3')}),
	'back', 'the report published after the reconnect is fetched');

# The user's seed appears in no log line, nor in the last error above.
my ($seed) = slurp_file($good) =~ /^(SU[A-Z2-7]+)\s*$/m;
ok(defined $seed && length($seed) > 50, 'the credentials file holds a user seed');
ok(index(AgogNatsTest::log_since($node), $seed) < 0, 'the seed is in no server log line');
ok(index($err, $seed) < 0, 'nor in the error that names the credentials file and the NKey');

unlike(AgogNatsTest::log_since($node), qr/terminated by signal|server process .* was terminated/,
	'no crash');
$node->stop;
$nats->stop;
done_testing();
