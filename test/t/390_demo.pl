
# The README's first command, `bash test/demo.sh [FEATURE]`, run by the test
# suite: six agog-agent runners and the six example agents complete the
# seed's feature workflow (roy fails his first attempt, so it shows a retry),
# the views tell the story, and the demo stops everything it started.
#
# The suite runs as `postgres`: the demo then uses the extension, agog-agent
# and the example agents that `make install` installed (as root it would
# build and install them itself).

use strict;
use warnings;

use Cwd qw(getcwd);
use IPC::Run ();
use Time::HiRes ();
use PostgreSQL::Test::Utils;
use Test::More;

my $demo = getcwd() . '/test/demo.sh';
ok(-f $demo, 'test/demo.sh is there');

sub run_demo
{
	my (@args) = @_;
	my $out = '';
	my $t0  = Time::HiRes::time();
	my $h   = IPC::Run::start([ 'bash', $demo, @args ], '<', \undef, '>&', \$out,
		IPC::Run::timeout(300));
	my $ok = eval { $h->finish; 1 };
	$h->kill_kill unless $ok;
	my $rc = $ok ? $h->result(0) : -1;
	note($out);
	return ($rc, $out, Time::HiRes::time() - $t0);
}

# What the demo left behind: a process or a listening socket of its own, or
# its work directory ('' when nothing).
sub leftovers
{
	my ($out) = @_;
	my ($work) = $out =~ /^== work directory (\S+)$/m;
	my ($nats_port, $pg_port) = $out =~ /nats-server on 127\.0\.0\.1:(\d+), throwaway PostgreSQL on port (\d+)/;
	return 'no work directory or ports in the output' unless $work && $nats_port && $pg_port;
	return "$work is still there" if -e $work;
	my @procs = grep { /\Q$work\E/ } split /\n/, `ps -eo pid,args`;
	return "processes left: @procs" if @procs;
	my $ss = `ss -Htln 2>/dev/null`;
	return "something still listens on $nats_port" if $ss =~ /127\.0\.0\.1:$nats_port\b/;
	return '';
}

for my $feature (undef, 'invoice-generator')
{
	my $name = $feature // 'customer-search';
	my ($rc, $out, $secs) = run_demo(defined $feature ? ($feature) : ());
	is($rc, 0, "bash test/demo.sh " . ($feature // '') . ": exit status 0");
	cmp_ok($secs, '<', 60, sprintf('... in well under a minute (%.1f s)', $secs));
	like($out, qr/^== workflow \d+ \(\Q$name\E\): completed, 6 of 6 stages, 1 retry, 6 reports in JetStream, in [\d.]+ s$/m,
		"the workflow for $name completed with 6 of 6 stages and a retry");
	like($out, qr/agog-agent\[roy\] \Q$name\E attempt 1 \(task \d+\): exit 1 -> retried.*migration lock/,
		'roy\'s first attempt failed and was retried');
	like($out, qr/agog-agent\[roy\] \Q$name\E attempt 2 \(task \d+\): ok -> advanced/, '... his second completed');
	my @agents = $out =~ /agog-agent\[(\w+)\] \Q$name\E attempt \d \(task \d+\): ok -> advanced/g;
	is(join(',', sort @agents), 'billy,cynthia,jen,priya,roy,sylvia', 'each of the six agents completed its task');
	like($out, qr/== agog_nats\.workflow_progress\n.*\n.*\n.*\| feature\s+\| \Q$name\E\s+\| completed \| statistics\s+\|\s+6 \|\s+6 \|/,
		'workflow_progress: completed, stage reached statistics, 6 of 6');
	like($out, qr/^ backend\s+\| roy\s+\| completed \|\s+2 \|/m, 'task_timeline: backend took 2 attempts');
	my @tl = $out =~ /^ \w+\s+\| \w+\s+\| completed \|\s+\d \|.*\|\s+\d+ \|/mg;
	is(scalar(@tl), 6, 'task_timeline: six completed tasks, each with its report\'s size');
	like($out, qr/== agog_nats\.token_savings.*\n.*\n.*\n\s+\d+ \| \Q$name\E\s+\|\s+\d+ \|\s+\d+ \|\s+\d+ \|\s+\d+\.\d/,
		'token_savings has the workflow');
	my @streams = $out =~ /^ (agog_features_\w+)\s+\|\s+(\d+) \|.*\| ok$/mg;
	is(scalar(@streams), 12, 'agog_stream_status(): six streams, healthy');
	my %msgs = @streams;
	is(scalar(grep { $_ >= 1 } values %msgs), 6, '... each with the agent\'s report');
	like($out, qr/# Statistics: \Q${\ join(' ', split(m{[-_]}, $name))}\E/, 'the statistics report is fetched back');
	is(leftovers($out), '', 'the demo stopped its servers');
}

done_testing();
