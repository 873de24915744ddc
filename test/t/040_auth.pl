
# NATS authentication: user/password, token and NKey, with the secrets in
# files that only superusers can name (agog_nats.password_file, .token_file,
# .nkey_seed_file).
# The worker and backends connect with them; a wrong password is refused
# with SQLSTATE 28000; a file that cannot be read is a clear error; a
# changed secret file (SIGHUP) makes the worker reconnect.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;

my $dir = PostgreSQL::Test::Utils::tempdir();
sub secret_file
{
	my ($name, $text) = @_;
	my $path = "$dir/$name";
	open(my $fh, '>', $path) or die "cannot write $path: $!";
	print $fh "$text\n";
	close $fh;
	chmod 0600, $path;
	return $path;
}

# --- user and password ---------------------------------------------------
my $nats = AgogNatsTest::NatsServer->new(
	name => 'natsuser',
	extra_conf => "authorization {\n  user: agog\n  password: \"s3cret-pw\"\n}\n");
$nats->start;
my $good = secret_file('password', 's3cret-pw');
my $bad = secret_file('wrong', 'not-the-password');

my $node = AgogNatsTest::start_secured_node('auth', $nats, 'with user and password',
	[ 'cynthia', 'research', 'agog_features_research', 'auth', 'secured' ],
	'agog_nats.user' => 'agog',
	'agog_nats.password_file' => $good);

# Only superusers see where the secrets are.
$node->safe_psql('postgres', 'CREATE ROLE peeker LOGIN IN ROLE agog_nats_reader');
my ($ret, $out, $err) = $node->psql('postgres', 'SHOW agog_nats.password_file',
	extra_params => [ '-U', 'peeker' ]);
like($err, qr/must be superuser or have privileges of pg_read_all_settings/,
	'a non-superuser cannot read agog_nats.password_file');

# A wrong password (after a reload: connections are opened again when their
# settings change): refused with 28000, nothing crashes.
my $off = AgogNatsTest::refused_after_reload($node, 'agog_nats.password_file', $bad, 'the wrong password',
	q{SELECT agog_publish_report_now('cynthia', 'research', 'auth2', 'x')});
like(AgogNatsTest::log_since($node, $off), qr/agog_nats worker could not connect to NATS, retrying/,
	'and says so in the log');

# Back to the right password: the worker connects again.
AgogNatsTest::reconnects_with($node, "agog_nats.password_file = '$good'\n", 'the right password');

# A file that cannot be read is a clear error, not a crash.
$err = AgogNatsTest::error_after_reload($node, "agog_nats.password_file = '$dir/missing'\n",
	'agog_nats.password_file', qr/missing/, 'a missing file');
like($err, qr/ERROR:\s+58P01: could not open file ".*missing" named by agog_nats\.password_file/,
	'a missing password file: 58P01 naming the setting');
# A role that may not read the setting is not told the file's path either
# (the server log has it).
$node->safe_psql('postgres', 'CREATE ROLE scribe LOGIN IN ROLE agog_nats_writer');
$off = AgogNatsTest::log_offset($node);
($ret, $out, $err) = $node->psql('postgres',
	q{SELECT agog_publish_report_now('cynthia', 'research', 'auth-hidden', 'x')},
	extra_params => [ '-U', 'scribe', '-v', 'VERBOSITY=verbose' ]);
like($err, qr/ERROR:\s+58P01: could not open the file named by agog_nats\.password_file: No such file/,
	'to a role that cannot read the setting: 58P01 naming the setting');
unlike($err, qr/\Q$dir\E|missing/, 'and not the path');
like(AgogNatsTest::log_since($node, $off), qr/DETAIL:\s+The file is "\Q$dir\E\/missing"\./,
	'the server log names the file');
# Nor through a SECURITY DEFINER function a superuser owns (the workflow
# functions are such): the role that matters is the session's.
$node->safe_psql('postgres', q{
	CREATE FUNCTION publish_as_owner() RETURNS text LANGUAGE sql SECURITY DEFINER
	AS $$ SELECT agog_publish_report_now('cynthia', 'research', 'auth-definer', 'x') $$;
	GRANT EXECUTE ON FUNCTION publish_as_owner() TO scribe;
});
($ret, $out, $err) = $node->psql('postgres', 'SELECT publish_as_owner()',
	extra_params => [ '-U', 'scribe', '-v', 'VERBOSITY=verbose' ]);
like($err, qr/ERROR:\s+58P01: could not open the file named by agog_nats\.password_file/,
	'through a SECURITY DEFINER function: 58P01 naming the setting');
unlike($err, qr/\Q$dir\E|missing/, '... and not the path');
# Nor to a lesser role's SECURITY DEFINER function that a superuser calls:
# its code could catch the message.
$node->safe_psql('postgres', q{
	CREATE FUNCTION scribe_catches() RETURNS text LANGUAGE plpgsql SECURITY DEFINER AS $$
	BEGIN
		PERFORM agog_publish_report_now('cynthia', 'research', 'auth-caught', 'x');
		RETURN 'published';
	EXCEPTION WHEN OTHERS THEN
		RETURN SQLERRM;
	END $$;
	ALTER FUNCTION scribe_catches() OWNER TO scribe;
});
my $caught = $node->safe_psql('postgres', 'SELECT scribe_catches()');
like($caught, qr/could not open the file named by agog_nats\.password_file/,
	'a superuser calling a writer\'s SECURITY DEFINER function: the writer\'s code catches the error');
unlike($caught, qr/\Q$dir\E|missing/, '... without the path');

# A first line longer than a secret may be is refused, not cut short and
# sent as a wrong password; one of exactly the longest length is read whole
# and sent (nats-server's default 4 KB max_control_line refuses its CONNECT).
my $long = secret_file('long', 'x' x 5000);
$err = AgogNatsTest::error_after_reload($node, "agog_nats.password_file = '$long'\n",
	'agog_nats.password_file', qr/long/, 'a file with a 5,000-byte line');
like($err, qr/ERROR:\s+22023: first line of file ".*long" named by agog_nats\.password_file is longer than 4095 bytes/,
	'a 5,000-byte password line: 22023, not cut short');
my $longest = secret_file('longest', 'y' x 4095);
$err = AgogNatsTest::error_after_reload($node, "agog_nats.password_file = '$longest'\n",
	'agog_nats.password_file', qr/longest/, 'a file with a 4,095-byte line');
like($err, qr/ERROR:\s+\w{5}: .*The NATS client reported: .*maximum control line exceeded/s,
	'a 4,095-byte password line is read and sent (too long a CONNECT for the server)');
$node->append_conf('postgresql.conf', "agog_nats.password_file = '$good'\n");
$node->reload;

# Credentials in agog_nats.url are refused: a setting's value shows in
# pg_settings and postgresql.conf, so secrets go in files.  The error does
# not repeat the URL.
my $url = $node->safe_psql('postgres', 'SHOW agog_nats.url');
(my $url_pw = $url) =~ s{^nats://}{nats://agog:s3cret-pw\@};
$err = AgogNatsTest::error_after_reload($node, "agog_nats.url = '$url_pw'\n",
	'agog_nats.url', qr/\@/, 'with a password in it');
like($err, qr/ERROR:\s+22023: agog_nats\.url must not hold credentials.*HINT:  .*agog_nats\.password_file/s,
	'a password in agog_nats.url: 22023, pointing to the file settings');
unlike($err, qr/s3cret-pw/, 'the error does not show the password');
AgogNatsTest::reconnects_with($node, "agog_nats.url = '$url'\n", 'the URL without credentials');

# --- token ---------------------------------------------------------------
my $nats2 = AgogNatsTest::NatsServer->new(
	name => 'natstoken',
	extra_conf => "authorization {\n  token: \"t0ken-abc\"\n}\n");
$nats2->start;
my $token = secret_file('token', 't0ken-abc');
my $node2 = AgogNatsTest::new_node('token', $nats2, 'agog_nats.token_file' => $token);
$node2->start;
$node2->safe_psql('postgres', 'CREATE EXTENSION agog_nats');
ok(AgogNatsTest::wait_for(
		sub { AgogNatsTest::worker_ready($node2) },
		20),
	'the worker connects with a token');
like($node2->safe_psql('postgres',
		q{SELECT agog_publish_report_now('roy', 'backend', 'auth', 'with a token')}),
	qr/^agog_features_backend\.\d+$/, 'a backend publishes with a token');

# --- NKey ------------------------------------------------------------------
# The NATS documentation's example user NKey: its public key, and the seed
# it was made from.  A second seed of the right shape (prefix and checksum)
# for another key stands for a wrong one.
my $nkey_pub   = 'UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4';
my $nkey_seed  = secret_file('nkey.seed', 'SUACSSL3UAHUDXKFSNVUZRF5UHPMWZ6BFDTJ7M6USDXIEDNPPQYYYCU3VY');
my $other_seed = secret_file('other.seed', 'SUAGIZLGM5UGS2TLNRWW433QOFZHG5DVOZ3XQ6L2PN6H27T7QCAYFA2FG4');
my $nats3 = AgogNatsTest::NatsServer->new(
	name => 'natsnkey',
	extra_conf => "authorization {\n  users = [ { nkey: $nkey_pub } ]\n}\n");
$nats3->start;
my $node3 = AgogNatsTest::start_secured_node('nkey', $nats3, 'with an NKey',
	[ 'jen', 'frontend', 'agog_features_frontend', 'nkey', 'signed in' ],
	'agog_nats.nkey' => $nkey_pub,
	'agog_nats.nkey_seed_file' => $nkey_seed);
$node3->safe_psql('postgres', 'CREATE ROLE peeker LOGIN IN ROLE agog_nats_reader');
AgogNatsTest::connects_every_time($node3, 2000, 'with an NKey');
($ret, $out, $err) = $node3->psql('postgres', 'SHOW agog_nats.nkey_seed_file',
	extra_params => [ '-U', 'peeker' ]);
like($err, qr/must be superuser or have privileges of pg_read_all_settings/,
	'a non-superuser cannot read agog_nats.nkey_seed_file');

# The seed is the file's first line that starts with "SU": a comment before
# it is passed over (as nats.c did); a file with no such line is 22023.
my $commented = secret_file('commented.seed',
	"# the agog_nats user's seed\nSUACSSL3UAHUDXKFSNVUZRF5UHPMWZ6BFDTJ7M6USDXIEDNPPQYYYCU3VY");
$err = AgogNatsTest::error_after_reload($node3, "agog_nats.nkey_seed_file = '$commented'\n",
	'agog_nats.nkey_seed_file', qr/commented/, 'a seed after a comment line');
is($err, '', 'a seed after a comment line signs');
my $seedless = secret_file('seedless.seed', '# no seed here');
$err = AgogNatsTest::error_after_reload($node3, "agog_nats.nkey_seed_file = '$seedless'\n",
	'agog_nats.nkey_seed_file', qr/seedless/, 'a file without a seed');
like($err, qr/ERROR:\s+22023: file ".*seedless\.seed" named by agog_nats\.nkey_seed_file holds no NKey user seed/,
	'a seed file without a seed: 22023 naming the setting');
AgogNatsTest::reconnects_with($node3, "agog_nats.nkey_seed_file = '$nkey_seed'\n", 'the seed file');

# The seed of another key: the server refuses the signature, 28000.
AgogNatsTest::refused_after_reload($node3, 'agog_nats.nkey_seed_file', $other_seed, 'the seed of another key',
	q{SELECT agog_publish_report_now('jen', 'frontend', 'nkey2', 'x')});

# One of the pair without the other is a clear error naming both settings.
$node3->append_conf('postgresql.conf', "agog_nats.nkey_seed_file = ''\n");
$node3->reload;
ok(AgogNatsTest::wait_for(
		sub { $node3->safe_psql('postgres', 'SHOW agog_nats.nkey_seed_file') eq '' }, 10),
	'the reload clears agog_nats.nkey_seed_file');
($ret, $out, $err) = $node3->psql('postgres',
	q{SELECT agog_publish_report_now('jen', 'frontend', 'nkey3', 'x')},
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/ERROR:\s+22023: agog_nats\.nkey and agog_nats\.nkey_seed_file must be set together/,
	'agog_nats.nkey without a seed file: 22023 naming both settings');

# Back to the right seed: connected again.
AgogNatsTest::reconnects_with($node3, "agog_nats.nkey_seed_file = '$nkey_seed'\n", 'the right seed');

for my $n ($node, $node2, $node3)
{
	unlike(AgogNatsTest::log_since($n), qr/terminated by signal|server process .* was terminated/,
		'no crash on ' . $n->name);
	$n->stop;
}
$nats->stop;
$nats2->stop;
$nats3->stop;
done_testing();
