
# DROP EXTENSION while the worker is busy with the extension's tables
# succeeds.  The worker's transactions take a share lock on the extension
# before any table, as DROP EXTENSION takes its exclusive lock first, so
# neither can hold a table the other waits for.  (CI once saw "deadlock
# detected" on DROP EXTENSION: the worker's orchestration step held tasks
# and waited for workflows, which the drop held.)  Each round keeps the
# worker orchestrating (another session starts workflows one by one, each
# its own commit) and drops the extension at a different moment.  The
# window is a fraction of a millisecond: against the build without the lock
# this test passed in three tries, so it guards the fix rather than proves
# it; the deadlock itself was seen in CI, in the upgrade suite.

use strict;
use warnings;

use IPC::Run ();
use Time::HiRes ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;

my $nats = AgogNatsTest::NatsServer->new(name => 'natsdrop');
$nats->start;
my $node = AgogNatsTest::new_node('drop', $nats, 'deadlock_timeout' => '50ms');
$node->start;

my $rounds = 15;
my ($dropped, @errors) = (0);
for my $i (1 .. $rounds)
{
	$node->safe_psql('postgres', qq{
		CREATE EXTENSION agog_nats;
		SELECT agog_define_pipeline('drop', '[{"stage": "a", "agent": "cynthia"}, {"stage": "b", "agent": "sylvia", "depends_on": ["a"]}]');
		SELECT agog_publish_report('roy', 'backend', 'drop-' || g, repeat('report ', 500)) FROM generate_series(1, 200) g;
	});
	my $script = join('', map { "SELECT agog_start_workflow('drop-$i-$_', 'drop');\n" } 1 .. 400);
	my ($in, $out, $err) = ($script, '', '');
	my $load = IPC::Run::start(
		[ 'psql', '-X', '-q', '-h', $node->host, '-p', $node->port, '-d', 'postgres' ],
		\$in, \$out, \$err);
	Time::HiRes::sleep(0.1 + 0.03 * ($i % 7));
	my ($ret, $dout, $derr) = $node->psql('postgres', 'DROP EXTENSION agog_nats');
	$load->finish;
	if ($ret == 0)
	{
		$dropped++;
	}
	else
	{
		push @errors, "round $i: $derr";
		$node->psql('postgres', 'DROP EXTENSION IF EXISTS agog_nats');
	}
}
is($dropped, $rounds, "DROP EXTENSION succeeded in every round ($dropped of $rounds) while the worker was busy")
  or diag(join("\n", @errors));
my $log = slurp_file($node->logfile);
unlike($log, qr/deadlock detected/, 'no deadlock in the server log');
like($log, qr/agog_nats worker started/, 'the worker ran');
$node->stop;
done_testing();
