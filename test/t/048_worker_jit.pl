
# The worker's statements are short and run again and again (a claim and a
# record a batch, thousands a minute under load).  JIT compilation is
# decided per execution from the plan's estimated cost and costs tens of
# milliseconds each time: a statement planned with a scan turned off
# carries the planner's penalty for it in its cost, and would be compiled
# on every run.  A claim written as a plain statement did that and took
# twice the worker's CPU (docs/benchmarks.md, eighteenth round).  The
# worker turns JIT off for its own session, whatever the server's settings.
# Here the server JIT-compiles every statement it can (every *_above_cost
# 0); the worker's statements must not be.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;

my $nats = AgogNatsTest::NatsServer->new(name => 'natsjit');
$nats->start;
my $node = AgogNatsTest::new_node('jit', $nats,
	shared_preload_libraries   => 'agog_nats, pg_stat_statements',
	'pg_stat_statements.track' => 'all',
	jit                        => 'on',
	jit_above_cost             => 0,
	jit_inline_above_cost      => 0,
	jit_optimize_above_cost    => 0);
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION agog_nats; CREATE EXTENSION pg_stat_statements');
ok(AgogNatsTest::wait_for(sub { AgogNatsTest::worker_ready($node) }, 30),
	'the worker is connected with its streams');

# The server does JIT-compile: a statement of a session of ours is.
$node->safe_psql('postgres', 'SELECT count(*) FROM pg_class WHERE relpages >= 0');
my $jit_ours = $node->safe_psql('postgres',
	"SELECT coalesce(sum(jit_functions), 0) FROM pg_stat_statements "
	  . "WHERE query LIKE 'SELECT count(*) FROM pg_class%'");
is($node->safe_psql('postgres', 'SELECT pg_jit_available()'), 't',
	'the server has its JIT provider (Debian\'s postgresql-15 ships llvmjit)');
{
	cmp_ok($jit_ours, '>', 0, "the server JIT-compiles a session's statement ($jit_ours functions)");

	$node->safe_psql('postgres', 'SELECT pg_stat_statements_reset()');
	$node->safe_psql('postgres',
		"SELECT count(agog_publish_report('roy', 'backend', 'jit-' || g, 'report ' || g)) "
		  . 'FROM generate_series(1, 30) g');
	ok(AgogNatsTest::wait_for(
			sub {
				$node->safe_psql('postgres',
					"SELECT count(*) FROM agog_nats.outbox WHERE feature LIKE 'jit-%' AND state = 'published'")
				  == 30;
			},
			20),
		'the 30 reports are published');

	# The worker's own statements: the claim, the record, and what they run.
	my $worker = $node->safe_psql('postgres', q{
		SELECT count(*) || ' statements, ' || coalesce(sum(calls), 0) || ' calls, '
		       || coalesce(sum(jit_functions), 0) || ' functions JIT-compiled'
		  FROM pg_stat_statements
		 WHERE query ~ 'claim_outbox|SET state = r\.state|UPDATE agog_nats\.outbox o'});
	note("the worker's statements: $worker");
	like($worker, qr/^[1-9]\d* statements, [1-9]\d* calls, 0 functions JIT-compiled$/,
		"the worker's claims and records are not JIT-compiled");
}

$node->stop;
$nats->stop;
done_testing();
