
# The worker's claim and record are planned once (generic plans) and stay
# index-driven whatever the outbox's statistics said when they were made.
# auto_explain logs every plan the worker runs: the claim must walk
# outbox_pending, the record must probe outbox_pkey once per row of the
# batch, and neither may scan the outbox sequentially, on an outbox that was
# empty and freshly analyzed when the plans were made (where a planner free
# to choose takes a sequential scan) and after it grew to thousands of rows.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AgogNatsTest;

my $nats = AgogNatsTest::NatsServer->new(name => 'nats');
$nats->start;
my $node = AgogNatsTest::new_node('plans', $nats,
	'shared_preload_libraries'               => 'agog_nats,auto_explain',
	'auto_explain.log_min_duration'          => '0',
	'auto_explain.log_nested_statements'     => 'on',
	'auto_explain.log_format'                => 'text');
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION agog_nats');
ok(AgogNatsTest::wait_for(
		sub { my $st = AgogNatsTest::worker_status($node); $st->{connected} && ($st->{streams_ok} // 0) == 6 },
		30),
	'worker connected with six streams');
my $worker = AgogNatsTest::worker_status($node)->{pid};

sub drained
{
	return $node->safe_psql('postgres',
		"SELECT count(*) FILTER (WHERE state = 'published') = $_[0] "
		  . "AND count(*) FILTER (WHERE state <> 'published') = 0 FROM agog_nats.outbox") eq 't';
}

# Small and freshly analyzed: the plans are made now.
$node->safe_psql('postgres', 'ANALYZE agog_nats.outbox');
my $off = AgogNatsTest::log_offset($node);
$node->safe_psql('postgres',
	"SELECT agog_publish_report('roy', 'backend', 'plan-' || i, 'small outbox ' || i) "
	  . "FROM generate_series(1, 3) i");
ok(AgogNatsTest::wait_for(sub { drained(3) }, 30), 'three reports published');

# Then thousands of rows, claimed and recorded with the plans made above.
$node->safe_psql('postgres',
	"SELECT count(agog_publish_report('roy', 'backend', 'plan-' || (i % 50), "
	  . "repeat('grown outbox ', 20) || i)) FROM generate_series(1, 3000) i");
ok(AgogNatsTest::wait_for(sub { drained(3003) }, 90), '3,000 more reports published');

# The worker's plans, from its own log lines.
my @plans;
my $cur;
for my $line (split /\n/, AgogNatsTest::log_since($node, $off))
{
	if ($line =~ /^\S+ \S+ \S+ \[(\d+)\] LOG:\s+duration: .* plan:/)
	{
		push @plans, $cur if $cur;
		$cur = $1 == $worker ? { text => '' } : undef;
		next;
	}
	if ($line =~ /^\S+ \S+ \S+ \[\d+\] /)
	{
		push @plans, $cur if $cur;
		$cur = undef;
		next;
	}
	$cur->{text} .= "$line\n" if $cur;
}
push @plans, $cur if $cur;

my @claims  = grep { $_->{text} =~ /Query Text: UPDATE agog_nats\.outbox o\s+SET attempts/ } @plans;
my @records = grep { $_->{text} =~ /Query Text: UPDATE agog_nats\.outbox o\s+SET state = r\.state/ } @plans;
note(sprintf('%d plans of the worker logged: %d claims, %d records',
		scalar(@plans), scalar(@claims), scalar(@records)));
cmp_ok(scalar(@claims),  '>=', 12, 'the claims that took the 3,003 reports were logged');
cmp_ok(scalar(@records), '>=', 12, 'the records of their batches were logged');

my @bad = grep { $_->{text} =~ /Seq Scan on outbox/ || $_->{text} !~ /Index Scan using outbox_pending on outbox c/ }
  @claims;
is(scalar(@bad), 0, 'every claim walks outbox_pending in id order, none scans the outbox')
  or diag($bad[0]{text});
@bad = grep {
	$_->{text} =~ /Seq Scan on outbox|Hash Join|Merge Join|Bitmap/
	  || $_->{text} !~ /Nested Loop/
	  || $_->{text} !~ /Index Scan using outbox_pkey on outbox o/
} @records;
is(scalar(@bad), 0, 'every record probes outbox_pkey per row in a nested loop over the batch')
  or diag($bad[0]{text});

$node->stop;
$nats->stop;
done_testing();
