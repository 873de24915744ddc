
# TLS to NATS with a client certificate: agog_nats.tls_ca_file,
# .tls_cert_file and .tls_key_file.  A server that requires client
# certificates (verify: true) accepts the worker and backends with them,
# and refuses a connection without one.  Certificates are made here with
# openssl for this test only.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;

my $dir = PostgreSQL::Test::Utils::tempdir();
sub openssl
{
	my @args = @_;
	my ($out, $err) = ('', '');
	my $ok = IPC::Run::run([ 'openssl', @args ], '>', \$out, '2>', \$err);
	die "openssl @args failed: $err" unless $ok;
}
open(my $ext, '>', "$dir/ext.cnf") or die;
print $ext "subjectAltName=IP:127.0.0.1,DNS:localhost\n";
close $ext;
openssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', "$dir/ca-key.pem",
	'-out', "$dir/ca.pem", '-days', '2', '-subj', '/CN=agog_nats test CA');
for my $who ('server', 'client')
{
	openssl('req', '-newkey', 'rsa:2048', '-nodes', '-keyout', "$dir/$who-key.pem",
		'-out', "$dir/$who.csr", '-subj', $who eq 'server' ? '/CN=127.0.0.1' : '/CN=agog_nats worker');
	openssl('x509', '-req', '-in', "$dir/$who.csr", '-CA', "$dir/ca.pem", '-CAkey', "$dir/ca-key.pem",
		'-CAcreateserial', '-out', "$dir/$who.pem", '-days', '2',
		($who eq 'server' ? ('-extfile', "$dir/ext.cnf") : ()));
	chmod 0600, "$dir/$who-key.pem";
}

my $nats = AgogNatsTest::NatsServer->new(
	name => 'natstls',
	extra_conf => "tls {\n  cert_file: \"$dir/server.pem\"\n  key_file: \"$dir/server-key.pem\"\n"
	  . "  ca_file: \"$dir/ca.pem\"\n  verify: true\n  timeout: 2\n}\n");
$nats->start;

my $node = AgogNatsTest::start_secured_node('tls', $nats, 'over TLS with a client certificate',
	[ 'cynthia', 'research', 'agog_features_research', 'tls', 'over TLS' ],
	'agog_nats.tls_ca_file' => "$dir/ca.pem",
	'agog_nats.tls_cert_file' => "$dir/client.pem",
	'agog_nats.tls_key_file' => "$dir/client-key.pem");
my $id = $node->safe_psql('postgres', q{SELECT agog_publish_report('roy', 'backend', 'tls', 'queued')});
ok(AgogNatsTest::wait_for(
		sub { $node->safe_psql('postgres', "SELECT state FROM agog_nats.outbox WHERE id = $id") eq 'published' },
		20),
	'the worker publishes the outbox over TLS');

# Without a client certificate the server refuses the connection.
$node->append_conf('postgresql.conf', "agog_nats.tls_cert_file = ''\nagog_nats.tls_key_file = ''\n");
$node->reload;
ok(AgogNatsTest::wait_for(
		sub { $node->safe_psql('postgres', q{SELECT current_setting('agog_nats.tls_cert_file') = ''}) eq 't' },
		10),
	'the reload drops the client certificate');
AgogNatsTest::refused($node, q{SELECT agog_publish_report_now('cynthia', 'research', 'tls2', 'x')},
	'08006', 'without a client certificate');

# A TLS file that cannot be loaded: nats.c's words name its path, which a
# role that may not read the settings is not told (the server log has it).
$node->safe_psql('postgres', 'CREATE ROLE scribe LOGIN IN ROLE agog_nats_writer');
$node->append_conf('postgresql.conf', "agog_nats.tls_cert_file = '$dir/absent.pem'\n");
$node->reload;
ok(AgogNatsTest::wait_for(
		sub { $node->safe_psql('postgres', q{SELECT current_setting('agog_nats.tls_cert_file') LIKE '%absent.pem'}) eq 't' },
		10),
	'the reload names a certificate file that does not exist');
my $off = AgogNatsTest::log_offset($node);
my $call = q{SELECT agog_publish_report_now('cynthia', 'research', 'tls3', 'x')};
my ($ret, $out, $err) = $node->psql('postgres', $call,
	extra_params => [ '-U', 'scribe', '-v', 'VERBOSITY=verbose' ]);
like($err, qr/could not load the files named by agog_nats\.tls_ca_file/,
	'to a role that cannot read the settings: the error names the settings');
unlike($err, qr/absent|\Q$dir\E/, 'and not the path');
like(AgogNatsTest::log_since($node, $off), qr/absent\.pem/, 'the server log names it');
($ret, $out, $err) = $node->psql('postgres', "SET client_min_messages = log; $call",
	extra_params => [ '-U', 'scribe', '-v', 'VERBOSITY=verbose' ]);
unlike($err, qr/absent|\Q$dir\E/, 'nor with client_min_messages = log (the log line stays in the server log)');
my $last_error;
ok(AgogNatsTest::wait_for(
		sub {
			$last_error = $node->safe_psql('postgres', 'SELECT coalesce(last_error, \'\') FROM agog_worker_status()');
			$last_error =~ /tls_ca_file/;
		},
		20),
	'the worker cannot connect either, and says so in its last_error')
  or diag($last_error);
unlike($last_error, qr/absent|\Q$dir\E/, '... without the path, which agog_nats_reader could read');
$off = AgogNatsTest::log_offset($node);
sleep 3;
unlike(AgogNatsTest::log_since($node, $off), qr/could not load the TLS files/,
	'the worker, trying again and again, does not log the same failure again');
($ret, $out, $err) = $node->psql('postgres', $call, extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/absent\.pem/, 'a superuser is told the path');

# With it again, the worker is back.
AgogNatsTest::reconnects_with($node,
	"agog_nats.tls_cert_file = '$dir/client.pem'\nagog_nats.tls_key_file = '$dir/client-key.pem'\n",
	'the client certificate');

unlike(AgogNatsTest::log_since($node), qr/terminated by signal|server process .* was terminated/,
	'no crash');
$node->stop;
$nats->stop;
done_testing();
