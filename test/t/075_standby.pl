
# A streaming standby and its promotion.  On the standby no worker runs, a
# fetch works, and a transactional publish is refused as in any read-only
# transaction.  Reports committed on the primary while NATS is down reach
# the standby as pending; the standby is then cut off from the primary
# (primary_conninfo = ''), so it never learns that the primary's worker
# published them; the primary dies, the standby is promoted, and its worker
# sends the same reports again with the same message ids: JetStream stores
# each once (its duplicate window), and the promoted standby records them as
# published.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;

my $nats = AgogNatsTest::NatsServer->new(name => 'nats');
$nats->start;
my $primary = AgogNatsTest::new_node('primary', $nats, _init => { allows_streaming => 1 });
$primary->start;
$primary->safe_psql('postgres', 'CREATE EXTENSION agog_nats');

ok(AgogNatsTest::wait_for(sub { AgogNatsTest::worker_ready($primary) }, 20), 'the primary\'s worker is ready');
$primary->safe_psql('postgres',
	q{SELECT agog_publish_report('cynthia', 'research', 'first', 'before the standby')});

$primary->backup('base');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'base', has_streaming => 1);
$standby->start;
$primary->wait_for_catchup($standby);

# On the standby: no worker, fetch works, publishing in a transaction is
# refused like any write.
is($standby->safe_psql('postgres', 'SELECT pid IS NULL AND NOT connected FROM agog_worker_status()'),
	't', 'no worker runs on the standby');
ok(AgogNatsTest::fetches($standby, 'cynthia', 'research', 'first', 'before the standby'),
	'the standby fetches a report');
my ($ret, $out, $err) = $standby->psql('postgres',
	q{SELECT agog_publish_report('cynthia', 'research', 'on-standby', 'x')},
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/ERROR:\s+25006:/, 'agog_publish_report on the standby: 25006 (read-only transaction)');

# Reports committed while NATS is down reach the standby as pending.
$nats->stop;
$primary->safe_psql('postgres', q{
	SELECT agog_publish_report('cynthia', 'research', 'failover-' || g, 'failover ' || g)
	  FROM generate_series(1, 5) g;});
$primary->wait_for_catchup($standby);
my $pending_sql = q{SELECT string_agg(msg_id, ',' ORDER BY id) FROM agog_nats.outbox WHERE kind = 'report' AND state = 'pending'};
my $pending = $standby->safe_psql('postgres', $pending_sql);
is(scalar(my @ids = split /,/, $pending), 5, 'the standby has the five pending reports');

# Cut the standby off; the primary's worker publishes them.
$standby->append_conf('postgresql.conf', "primary_conninfo = ''\n");
$standby->reload;
ok(AgogNatsTest::wait_for(
		sub { $standby->safe_psql('postgres', 'SELECT count(*) FROM pg_stat_wal_receiver') eq '0' },
		20),
	'the standby no longer receives WAL');
$nats->start;
ok(AgogNatsTest::wait_for(sub { $primary->safe_psql('postgres', $pending_sql) eq '' }, 30),
	'the primary\'s worker publishes the five reports');
is($nats->stream_info('agog_features_research')->{state}{messages}, 6,
	'the research stream holds six reports');
# The primary goes on alone: 40 more reports, published, that the standby
# never sees (asynchronous replication loses them at the failover).  They
# take the outbox ids past the sequence values the standby knows of.
$primary->safe_psql('postgres', q{
	SELECT agog_publish_report('cynthia', 'research', 'lost-' || g, 'lost ' || g)
	  FROM generate_series(1, 40) g;});
ok(AgogNatsTest::wait_for(sub { $primary->safe_psql('postgres', $pending_sql) eq '' }, 30),
	'the primary publishes 40 reports the standby will never see');
is($nats->stream_info('agog_features_research')->{state}{messages}, 46,
	'the research stream holds 46 reports');
is($standby->safe_psql('postgres', $pending_sql), $pending,
	'the standby still sees them pending');

# The primary dies; the standby is promoted and sends them again.
$primary->stop('immediate');
$standby->promote;
ok(AgogNatsTest::wait_for(sub { AgogNatsTest::worker_ready($standby) }, 30),
	'after the promotion a worker starts on the new primary and connects');
ok(AgogNatsTest::wait_for(sub { $standby->safe_psql('postgres', $pending_sql) eq '' }, 30),
	'the new primary publishes the reports it had pending');
is($standby->safe_psql('postgres', q{
		SELECT string_agg(msg_id, ',' ORDER BY id) FROM agog_nats.outbox
		 WHERE feature LIKE 'failover-%' AND state = 'published'}),
	$pending, '... recorded as published, with their message ids');
is($nats->stream_info('agog_features_research')->{state}{messages}, 46,
	'JetStream stored each once: still 46 reports');
is($standby->safe_psql('postgres',
		q{SELECT content FROM agog_fetch_report('cynthia', 'research', 'failover-5')}),
	'failover 5', 'the new primary fetches the last of them');

# New reports on the new primary take outbox ids the lost ones had: their
# message ids must still differ, or JetStream would drop them as
# duplicates of the lost reports and the new primary would record them as
# published.
$standby->safe_psql('postgres', q{
	SELECT agog_publish_report('cynthia', 'research', 'promoted-' || g, 'after the promotion ' || g)
	  FROM generate_series(1, 5) g;});
ok(AgogNatsTest::wait_for(sub { $standby->safe_psql('postgres', $pending_sql) eq '' }, 30),
	'the new primary publishes five new reports');
is($standby->safe_psql('postgres', q{
		SELECT count(*) FILTER (WHERE duplicate) FROM agog_nats.outbox WHERE feature LIKE 'promoted-%'}),
	'0', 'none of them is taken for a duplicate');
is($nats->stream_info('agog_features_research')->{state}{messages}, 51, '51 reports in all');
is($standby->safe_psql('postgres',
		q{SELECT string_agg(content, ',' ORDER BY content) FROM generate_series(1, 5) g,
		         agog_fetch_report('cynthia', 'research', 'promoted-' || g)}),
	join(',', map { "after the promotion $_" } 1 .. 5),
	'each of them is fetched back');

unlike(AgogNatsTest::log_since($standby), qr/terminated by signal|server process .* was terminated/,
	'no crash on the standby');
$standby->stop;
$nats->stop;
done_testing();
