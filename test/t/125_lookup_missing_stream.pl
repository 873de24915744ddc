
# A report whose earlier send has no known outcome is looked up by its
# message id before it is sent again, once it is older than half the
# duplicate window.  The look-up walks the subject with direct gets, and
# JetStream never answers a direct get of a stream that does not exist: the
# worker waited agog_nats.timeout_ms for each such report at every claim,
# and never sent it again, so it stayed pending for good (never dead, never
# retried by agog_retry_dead) while each claim of it held up the reports
# behind it.  A stream that does not exist holds no copy: the look-up now
# asks whether the stream exists after one unanswered slice, and the report
# is sent again, refused, and dead after ten refusals, as a report to a
# missing stream is without a look-up.
#
# The stream goes missing as it does in use: an agent is deleted with a
# report still pending, and its stream deleted from JetStream.

use strict;
use warnings;

use Time::HiRes ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;
use AgogExactlyOnce;

my $nats = AgogNatsTest::NatsServer->new(name => 'natsghost');
$nats->start;
my $node = AgogExactlyOnce::setup_node('ghost', $nats->url,
	'agog_nats.duplicate_window' => '2s',
	'agog_nats.timeout_ms'       => '3s');

$node->safe_psql('postgres',
	"INSERT INTO agog_nats.agents (agent, task_type) VALUES ('ghost', 'ghost')");
ok(AgogExactlyOnce::wait_until(sub { defined $nats->stream_info('agog_features_ghost') }, 15),
	'the agent ghost has its stream');
my $del = $nats->request('$JS.API.STREAM.DELETE.agog_features_ghost', '');
like($del // '', qr/"success":\s*true/, 'the stream is deleted from JetStream');

# The report and the agent's deletion commit together.
my $id = $node->safe_psql('postgres', q{
	BEGIN;
	SELECT agog_publish_report('ghost', 'ghost', 'lost', 'to a stream that is gone');
	DELETE FROM agog_nats.agents WHERE agent = 'ghost';
	COMMIT;
});
like($id, qr/^\d+$/, 'a report of the agent is committed as the agent is deleted');

sub row
{
	my ($rid) = @_;
	my ($state, $attempts, $err) = split /\|/, $node->safe_psql('postgres',
		"SELECT state || '|' || attempts || '|' || coalesce(last_error, '') "
		  . "FROM agog_nats.outbox WHERE id = $rid");
	return { state => $state, attempts => $attempts, error => $err };
}

# The first sends are refused (no stream takes the subject); the report is
# due again after a backoff and past half the 2 s window by the second.
ok(AgogExactlyOnce::wait_until(sub { row($id)->{attempts} >= 2 }, 15),
	'the report was sent, refused, and claimed again')
  or diag(explain(row($id)));
ok(AgogExactlyOnce::wait_until(
		sub { row($id)->{attempts} >= 3 || row($id)->{error} =~ /earlier send/ }, 15),
	'... and then claimed past half the duplicate window (with a look-up)')
  or diag(explain(row($id)));
note('after its look-ups: ' . join(', ', map { "$_=" . row($id)->{$_} } qw(state attempts error)));

# Ten refusals make a report dead: take it to its ninth attempt, due now.
$node->safe_psql('postgres',
	"UPDATE agog_nats.outbox SET attempts = 9, next_attempt_at = now() WHERE id = $id AND state = 'pending'");
# A report of another agent, committed right after, waits for that claim.
my $t0 = Time::HiRes::time();
my $other = $node->safe_psql('postgres',
	"SELECT agog_publish_report('cynthia', 'research', 'behind', 'behind the ghost')");
ok(AgogExactlyOnce::wait_until(sub { row($other)->{state} eq 'published' }, 15),
	'the report behind it is published');
note(sprintf('the report behind it was published %.2f s after its commit (timeout_ms 3 s)',
		Time::HiRes::time() - $t0));
ok(AgogExactlyOnce::wait_until(sub { row($id)->{state} eq 'dead' }, 10),
	'the tenth attempt looks the report up, finds no stream, sends it and makes it dead')
  or diag(explain(row($id)));
like(row($id)->{error}, qr/no responders|not found|stream/i,
	'its last error is the refusal, not an unanswered look-up')
  or diag(explain(row($id)));

# dead, it can be queued again by hand, and goes dead again (the stream is gone)
is($node->safe_psql('postgres', "SELECT agog_retry_dead(ARRAY[$id]::bigint[])"), '1',
	'agog_retry_dead queues it again');
is($node->safe_psql('postgres', 'SELECT count(*) FROM agog_nats.outbox WHERE state = \'pending\' AND id = ' . $id), '1',
	'... as pending');

$node->stop;
$nats->stop;
done_testing();
