/*
 * task.c: the life of one task in agog-agent.
 *
 *   claim_one    agog_claim_task(agent, worker, lease): the task and its notice
 *   start_job    a private directory (mkdtemp, 0700); the notice's inputs
 *                fetched with agog_fetch_report into <stage>.md / .json;
 *                COMMAND forked in its own process group, stdin the notice,
 *                stdout a file, stderr a pipe (its last 2 KB are kept)
 *   serve_jobs   (from every wait) reads stderr, reaps, and stops a command
 *                at its deadline, when the runner stops or when its lease
 *                was lost: SIGTERM, then SIGKILL
 *   heartbeat_job  agog_heartbeat_task while the command runs
 *   finish_job   exit 0: agog_publish_report + agog_complete_task in one
 *                transaction; otherwise a failed notice whose blockers end
 *                with the command's stderr; then one line per task
 *
 * The database decides every outcome: a completion for a task whose lease
 * was lost, or that the worker already timed out, is refused (55000), so a
 * task is never completed twice, also across a reconnect.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "agent.h"

#define NEVER 1e18
#define MAX_RESULT (1024 * 1024)

Job		   *jobs;
int			tasks_failed;
int			tasks_done;

static double
hb_interval(void)
{
	double		h = opt.lease / 3.0;

	return h < 1.0 ? 1.0 : h;
}

int
jobs_active(void)
{
	int			i,
				n = 0;

	for (i = 0; i < opt.jobs; i++)
		if (jobs[i].phase != JOB_FREE)
			n++;
	return n;
}

int
jobs_free(void)
{
	return opt.jobs - jobs_active();
}

static char *
path_in(const Job *j, const char *name)
{
	return xasprintf("%s/%s", j->dir, name);
}

/* The runner gives up on the task before (or without) running it. */
static void
fail_setup(Job *j, char *why)
{
	free(j->why);
	j->why = why;
	if (j->end == END_NONE)
		j->end = END_SETUP;
	j->phase = JOB_ENDED;
	j->t_ended = now_mono();
}

/* ---- claim ------------------------------------------------------------- */

/*
 * Claim one dispatched task into a free slot and start it.  Returns true
 * when a task was claimed.  *fatal gets an exit status when the runner
 * cannot go on (unknown agent, no privilege).
 */
bool
claim_one(int *fatal)
{
	Job		   *j = NULL;
	char		lease[32];
	const char *p[3];
	char	   *sql;
	QRes		q;
	double		now,
				left,
				margin;
	int			i;

	*fatal = 0;
	for (i = 0; i < opt.jobs; i++)
		if (jobs[i].phase == JOB_FREE)
		{
			j = &jobs[i];
			break;
		}
	if (!j)
		return false;

	snprintf(lease, sizeof(lease), "%d seconds", opt.lease);
	p[0] = opt.agent;
	p[1] = opt.worker_id;
	p[2] = lease;
	sql = xasprintf("SELECT c.task_id, c.workflow_id, c.stage, c.feature, c.attempt, c.notice::text, "
					"coalesce(c.notice->>'taskType', ''), coalesce(c.notice->>'deadline', ''), "
					"coalesce(c.notice->>'report_subject', ''), "
					"extract(epoch FROM c.deadline - clock_timestamp())::float8 "
					"FROM %s.agog_claim_task($1, $2, $3::interval) c", ext_schema);
	if (!db_exec(sql, 3, p, &q))
	{
		free(sql);
		if (q.status == Q_SQLERR)
		{
			if (strcmp(q.sqlstate, "42704") == 0)
			{
				fprintf(stderr, "agog-agent: unknown agent \"%s\" in database \"%s\": "
						"the agents are the rows of agog_nats.agents (%s)\n",
						opt.agent, db_dbname(), q.message);
				*fatal = EXIT_USAGE;
			}
			else if (strcmp(q.sqlstate, "42501") == 0)
			{
				fprintf(stderr, "agog-agent: not allowed to claim tasks: %s "
						"(GRANT agog_nats_writer TO the runner's role)\n", q.message);
				*fatal = EXIT_RUNTIME;
			}
			else
				log_warn("could not claim a task: %s", q.message);
		}
		q_clear(&q);
		return false;
	}
	free(sql);
	if (PQntuples(q.res) == 0)
	{
		q_clear(&q);
		return false;
	}

	memset(j, 0, sizeof(*j));
	j->err_fd = -1;
	j->task_id = atoll(PQgetvalue(q.res, 0, 0));
	j->workflow_id = atoll(PQgetvalue(q.res, 0, 1));
	j->stage = xstrdup(PQgetvalue(q.res, 0, 2));
	j->feature = xstrdup(PQgetvalue(q.res, 0, 3));
	j->attempt = atoi(PQgetvalue(q.res, 0, 4));
	j->notice = xstrdup(PQgetvalue(q.res, 0, 5));
	j->task_type = xstrdup(PQgetvalue(q.res, 0, 6));
	j->deadline_iso = xstrdup(PQgetvalue(q.res, 0, 7));
	j->report_subject = PQgetvalue(q.res, 0, 8)[0]
		? xstrdup(PQgetvalue(q.res, 0, 8))
		: xasprintf("agog.deliverables.%s.%s.%s", opt.agent, j->task_type, j->feature);
	left = PQgetisnull(q.res, 0, 9) ? 1e9 : atof(PQgetvalue(q.res, 0, 9));
	q_clear(&q);

	/*
	 * The command is stopped a little before the task's deadline (10 % of
	 * the time left, 1 to 5 s; SIGKILL half of that after SIGTERM), so that
	 * its failed notice, with its stderr, arrives while the task is still
	 * ours.
	 */
	now = now_mono();
	margin = left * 0.1;
	if (margin < 1.0)
		margin = 1.0;
	if (margin > 5.0)
		margin = 5.0;
	j->t_claimed = now;
	j->t_deadline = now + left;
	j->t_term_deadline = j->t_deadline - margin;
	j->kill_wait = margin / 2 < 2.0 ? margin / 2 : 2.0;
	j->t_term_stop = NEVER;
	j->t_term_lost = NEVER;
	j->next_heartbeat = now + hb_interval();
	j->phase = JOB_CLAIMED;
	log_debug("claimed task %lld: %s %s attempt %d, %.1f s to its deadline",
			  j->task_id, j->stage, j->feature, j->attempt, left);

	if (!valid_token(j->stage) || !valid_token(j->feature) || !valid_token(j->task_type))
		fail_setup(j, xstrdup("the task notice has an invalid stage, feature or taskType"));
	else
		start_job(j);
	return true;
}

/* ---- start --------------------------------------------------------------- */

/* "agog.deliverables.<agent>.<taskType>.<feature>" into its three tokens. */
static bool
parse_subject(const char *s, char **agent, char **type, char **feature)
{
	static const char pre[] = "agog.deliverables.";
	char	   *c,
			   *a,
			   *t,
			   *f;

	if (strncmp(s, pre, sizeof(pre) - 1) != 0)
		return false;
	c = xstrdup(s + sizeof(pre) - 1);
	a = c;
	t = strchr(a, '.');
	f = t ? strchr(t + 1, '.') : NULL;
	if (!t || !f)
	{
		free(c);
		return false;
	}
	*t++ = '\0';
	*f++ = '\0';
	if (!valid_token(a) || !valid_token(t) || !valid_token(f))
	{
		free(c);
		return false;
	}
	*agent = xstrdup(a);
	*type = xstrdup(t);
	*feature = xstrdup(f);
	free(c);
	return true;
}

static void
set_env_ll(const char *name, long long v)
{
	char		b[32];

	snprintf(b, sizeof(b), "%lld", v);
	setenv(name, b, 1);
}

/* Fork and exec COMMAND for the job (its inputs are in place). */
static void
spawn(Job *j)
{
	char	   *nfile = path_in(j, "notice.json");
	char	   *rfile = path_in(j, "report.md");
	char	   *resfile = path_in(j, "result.json");
	char	   *indir = path_in(j, "inputs");
	int			in = -1,
				out = -1,
				ep[2] = {-1, -1};
	pid_t		pid;

	unlink(resfile);
	in = open(nfile, O_RDONLY | O_CLOEXEC);
	out = open(rfile, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (in < 0 || out < 0 || pipe2(ep, O_CLOEXEC) != 0)
	{
		fail_setup(j, xasprintf("could not set up the command's files in %s: %s", j->dir, strerror(errno)));
		goto done;
	}
	fflush(stdout);
	fflush(stderr);
	pid = fork();
	if (pid < 0)
	{
		fail_setup(j, xasprintf("could not fork: %s", strerror(errno)));
		goto done;
	}
	if (pid == 0)
	{
		struct sigaction sa;
		sigset_t	none;
		double		left = j->t_term_deadline - now_mono();

		setpgid(0, 0);
		if (dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(ep[1], 2) < 0)
			_exit(127);
		close_range(3, ~0U, 0);
		memset(&sa, 0, sizeof(sa));
		sa.sa_handler = SIG_DFL;
		sigemptyset(&sa.sa_mask);
		sigaction(SIGTERM, &sa, NULL);
		sigaction(SIGINT, &sa, NULL);
		sigaction(SIGHUP, &sa, NULL);
		sigaction(SIGCHLD, &sa, NULL);
		sigaction(SIGPIPE, &sa, NULL);
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);

		set_env_ll("AGOG_TASK_ID", j->task_id);
		set_env_ll("AGOG_WORKFLOW_ID", j->workflow_id);
		setenv("AGOG_AGENT", opt.agent, 1);
		setenv("AGOG_TASK_TYPE", j->task_type, 1);
		setenv("AGOG_FEATURE", j->feature, 1);
		setenv("AGOG_STAGE", j->stage, 1);
		set_env_ll("AGOG_ATTEMPT", j->attempt);
		setenv("AGOG_DEADLINE", j->deadline_iso, 1);
		set_env_ll("AGOG_SECONDS_LEFT", left > 0 ? (long long) left : 0);
		setenv("AGOG_REPORT_SUBJECT", j->report_subject, 1);
		setenv("AGOG_WORK_DIR", j->dir, 1);
		setenv("AGOG_INPUT_DIR", indir, 1);
		setenv("AGOG_INPUTS", j->inputs ? j->inputs : "", 1);
		setenv("AGOG_NOTICE_FILE", nfile, 1);
		setenv("AGOG_RESULT_FILE", resfile, 1);
		setenv("AGOG_WORKER_ID", opt.worker_id, 1);
		execv(opt.command_path, opt.command);
		dprintf(2, "agog-agent: cannot run %s: %s\n", opt.command_path, strerror(errno));
		_exit(127);
	}
	setpgid(pid, pid);			/* also here: no race with a kill below */
	j->pid = pid;
	j->err_fd = ep[0];
	ep[0] = -1;
	fcntl(j->err_fd, F_SETFL, O_NONBLOCK);
	j->phase = JOB_RUNNING;
	j->t_started = now_mono();
	log_debug("task %lld: started %s (pid %d) in %s", j->task_id, opt.command_path, (int) pid, j->dir);

done:
	if (in >= 0)
		close(in);
	if (out >= 0)
		close(out);
	if (ep[0] >= 0)
		close(ep[0]);
	if (ep[1] >= 0)
		close(ep[1]);
	free(nfile);
	free(rfile);
	free(resfile);
	free(indir);
}

/*
 * Prepare the claimed job's directory and inputs and start its command.
 * On a lost connection the job stays claimed and this runs again after
 * the reconnect; any other problem ends the job with a failed notice.
 */
void
start_job(Job *j)
{
	char	   *sql;
	const char *p[4];
	QRes		q,
				f;
	Buf			list = {0};
	int			i,
				n;

	if (!j->dir)
	{
		char	   *tmpl = xasprintf("%s/agog-agent.%s.XXXXXX", opt.tmpdir, opt.agent);
		char	   *sub,
				   *nfile;

		if (!mkdtemp(tmpl))
		{
			fail_setup(j, xasprintf("could not create a private directory in %s: %s",
									opt.tmpdir, strerror(errno)));
			free(tmpl);
			return;
		}
		j->dir = tmpl;
		sub = path_in(j, "inputs");
		nfile = path_in(j, "notice.json");
		if (mkdir(sub, 0700) != 0 || write_file(nfile, j->notice, strlen(j->notice)) != 0)
			fail_setup(j, xasprintf("could not write in %s: %s", j->dir, strerror(errno)));
		free(sub);
		free(nfile);
		if (j->phase == JOB_ENDED)
			return;
	}
	if (now_mono() >= j->t_term_deadline)
	{
		j->end = END_DEADLINE;
		fail_setup(j, xstrdup("the task's deadline had passed before the command could start"));
		return;
	}

	/* The reports of the stages upstream, as the notice lists them. */
	p[0] = j->notice;
	if (!db_exec("SELECT x->>'stage', x->>'subject' "
				 "FROM jsonb_array_elements(coalesce(($1::jsonb)->'inputs', '[]'::jsonb)) "
				 "WITH ORDINALITY a(x, i) ORDER BY i", 1, p, &q))
	{
		if (q.status == Q_SQLERR)
			fail_setup(j, xasprintf("could not read the notice's inputs: %s", q.message));
		q_clear(&q);
		return;
	}
	sql = xasprintf("SELECT f.content, jsonb_pretty(jsonb_build_object("
					"'stage', $4::text, 'agent', $1::text, 'taskType', $2::text, 'feature', $3::text, "
					"'subject', f.subject, 'message_id', f.message_id, 'sequence', f.sequence, "
					"'published_at', f.published_at, 'metadata', f.metadata)) "
					"FROM %s.agog_fetch_report($1, $2, $3) f", ext_schema);
	n = PQntuples(q.res);
	for (i = 0; i < n; i++)
	{
		const char *stage = PQgetvalue(q.res, i, 0);
		const char *subject = PQgetvalue(q.res, i, 1);
		char	   *a,
				   *t,
				   *ft,
				   *md,
				   *js,
				   *name;

		if (PQgetisnull(q.res, i, 1) || !valid_token(stage) ||
			!parse_subject(subject, &a, &t, &ft))
		{
			fail_setup(j, xasprintf("input %d of the notice (stage \"%s\"): \"%s\" is not a report "
									"subject agog.deliverables.<agent>.<taskType>.<feature>",
									i + 1, stage, subject));
			break;
		}
		p[0] = a;
		p[1] = t;
		p[2] = ft;
		p[3] = stage;
		if (!db_exec(sql, 4, p, &f))
		{
			if (f.status == Q_SQLERR)
				fail_setup(j, xasprintf("could not fetch the input report %s: %s", subject, f.message));
			q_clear(&f);
			free(a);
			free(t);
			free(ft);
			break;
		}
		free(a);
		free(t);
		free(ft);
		if (PQntuples(f.res) == 0)
		{
			fail_setup(j, xasprintf("the input report %s was not found (neither in JetStream nor in the outbox)",
									subject));
			q_clear(&f);
			break;
		}
		name = xasprintf("inputs/%s.md", stage);
		md = path_in(j, name);
		free(name);
		name = xasprintf("inputs/%s.json", stage);
		js = path_in(j, name);
		free(name);
		if (write_file(md, PQgetvalue(f.res, 0, 0), (size_t) PQgetlength(f.res, 0, 0)) != 0 ||
			write_file(js, PQgetvalue(f.res, 0, 1), (size_t) PQgetlength(f.res, 0, 1)) != 0)
			fail_setup(j, xasprintf("could not write the input report %s: %s", md, strerror(errno)));
		else
			buf_printf(&list, "%s%s", list.len ? " " : "", md);
		log_debug("task %lld: input %s -> %s (%d bytes)", j->task_id, subject, md,
				  PQgetlength(f.res, 0, 0));
		free(md);
		free(js);
		q_clear(&f);
		if (j->phase == JOB_ENDED)
			break;
	}
	free(sql);
	q_clear(&q);
	if (j->phase != JOB_CLAIMED || !db_connected())
	{
		buf_free(&list);
		return;					/* ended, or retried after the reconnect */
	}
	free(j->inputs);
	j->inputs = list.data ? list.data : xstrdup("");
	spawn(j);
}

/* ---- serve (called from every wait) -------------------------------------- */

static void
tail_add(Job *j, const char *d, size_t n)
{
	if (n >= STDERR_TAIL)
	{
		memcpy(j->tail, d + n - STDERR_TAIL, STDERR_TAIL);
		j->tail_len = STDERR_TAIL;
		return;
	}
	if (j->tail_len + n > sizeof(j->tail))
	{
		size_t		keep = STDERR_TAIL - n;

		memmove(j->tail, j->tail + j->tail_len - keep, keep);
		j->tail_len = keep;
	}
	memcpy(j->tail + j->tail_len, d, n);
	j->tail_len += n;
}

static void
echo_line(Job *j, bool flush)
{
	if (j->line_len == 0 && !flush)
		return;
	if (j->line_len)
	{
		j->line[j->line_len] = '\0';
		log_debug("task %lld stderr: %s", j->task_id, j->line);
	}
	j->line_len = 0;
}

static void
read_stderr(Job *j)
{
	char		b[4096];

	while (j->err_fd >= 0)
	{
		ssize_t		n = read(j->err_fd, b, sizeof(b));

		if (n > 0)
		{
			tail_add(j, b, (size_t) n);
			if (verbosity > 1)
			{
				ssize_t		k;

				for (k = 0; k < n; k++)
				{
					if (b[k] == '\n' || j->line_len >= sizeof(j->line) - 1)
						echo_line(j, false);
					if (b[k] != '\n')
						j->line[j->line_len++] = b[k];
				}
			}
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			break;
		close(j->err_fd);		/* end of file, or an error */
		j->err_fd = -1;
	}
}

static void
signal_group(Job *j, int sig)
{
	kill(-j->pid, sig);
	kill(j->pid, sig);
}

double
next_kill_time(void)
{
	double		t = NEVER;
	int			i;

	for (i = 0; i < opt.jobs; i++)
	{
		Job		   *j = &jobs[i];
		double		x;

		if (j->phase != JOB_RUNNING || j->reaped)
			continue;
		if (!j->term_sent)
		{
			x = j->t_term_deadline;
			if (j->t_term_stop < x)
				x = j->t_term_stop;
			if (j->t_term_lost < x)
				x = j->t_term_lost;
		}
		else if (!j->kill_sent)
			x = j->t_kill;
		else
			x = now_mono() + 0.1;	/* wait for the SIGKILL to land */
		if (x < t)
			t = x;
	}
	return t;
}

/* Read stderr, reap, and send the signals that are due.  True when a command ended. */
bool
serve_jobs(void)
{
	bool		event = false;
	int			i;

	for (i = 0; i < opt.jobs; i++)
	{
		Job		   *j = &jobs[i];
		double		now;

		if (j->phase != JOB_RUNNING)
			continue;
		read_stderr(j);
		if (!j->reaped)
		{
			int			st;

			if (waitpid(j->pid, &st, WNOHANG) == j->pid)
			{
				j->reaped = true;
				j->wait_status = st;
			}
		}
		now = now_mono();
		if (j->reaped)
		{
			/*
			 * The command exited after it was told to stop: whatever of its
			 * group is left (a child that ignores SIGTERM) is killed now,
			 * not left running once the task is no longer ours.
			 */
			if (j->term_sent)
				kill(-j->pid, SIGKILL);
			read_stderr(j);
			if (j->err_fd >= 0)
				close(j->err_fd);	/* a child of the command may hold it open */
			j->err_fd = -1;
			echo_line(j, true);
			j->t_ended = now;
			if (j->kill_reason != END_NONE)
				j->end = j->kill_reason;
			else if (WIFEXITED(j->wait_status))
				j->end = WEXITSTATUS(j->wait_status) == 0 ? END_OK : END_EXIT;
			else
				j->end = END_SIGNAL;
			j->phase = JOB_ENDED;
			event = true;
			continue;
		}
		if (!j->term_sent &&
			(now >= j->t_term_deadline || now >= j->t_term_stop || now >= j->t_term_lost))
		{
			j->kill_reason = now >= j->t_term_lost ? END_LOST
				: now >= j->t_term_stop ? END_INTERRUPTED : END_DEADLINE;
			signal_group(j, SIGTERM);
			j->term_sent = true;
			j->t_kill = now + j->kill_wait;
			log_debug("task %lld: SIGTERM to pid %d (%s)", j->task_id, (int) j->pid,
					  j->kill_reason == END_LOST ? "lease lost"
					  : j->kill_reason == END_INTERRUPTED ? "stopping" : "deadline");
		}
		else if (j->term_sent && !j->kill_sent && now >= j->t_kill)
		{
			signal_group(j, SIGKILL);
			j->kill_sent = true;
			log_debug("task %lld: SIGKILL to pid %d", j->task_id, (int) j->pid);
		}
	}
	return event;
}

void
kill_job_now(Job *j, JobEnd reason)
{
	if (reason == END_LOST)
		j->t_term_lost = now_mono();
	else
		j->t_term_stop = now_mono();
}

/* ---- heartbeat ------------------------------------------------------------ */

void
heartbeat_job(Job *j)
{
	char		id[32],
				lease[32],
				attempt[16];
	const char *p[3] = {id, lease, attempt};

	/* its attempt: refused once another claim holds the task */
	char	   *sql = xasprintf("SELECT %s.agog_heartbeat_task($1::bigint, $2::interval, $3::integer)",
								ext_schema);
	QRes		q;

	snprintf(id, sizeof(id), "%lld", j->task_id);
	snprintf(lease, sizeof(lease), "%d seconds", opt.lease);
	snprintf(attempt, sizeof(attempt), "%d", j->attempt);
	if (db_exec(sql, 3, p, &q))
	{
		j->next_heartbeat = now_mono() + hb_interval();
		log_debug("task %lld: heartbeat, lease until %s", j->task_id, PQgetvalue(q.res, 0, 0));
	}
	else if (q.status == Q_CONNERR)
		j->next_heartbeat = 0;	/* first thing after the reconnect */
	else if (strcmp(q.sqlstate, "55000") == 0 || strcmp(q.sqlstate, "42704") == 0)
	{
		log_warn("task %lld is no longer ours (%s): %s", j->task_id, q.message,
				 j->phase == JOB_RUNNING ? "stopping its command" : "dropping it");
		j->next_heartbeat = NEVER;
		if (j->phase == JOB_RUNNING)
			kill_job_now(j, END_LOST);
		else
		{
			j->end = END_LOST;
			j->phase = JOB_ENDED;
			j->t_ended = now_mono();
		}
	}
	else
	{
		log_warn("task %lld: heartbeat failed: %s", j->task_id, q.message);
		j->next_heartbeat = now_mono() + 1.0;
	}
	q_clear(&q);
	free(sql);
}

/* ---- finish ---------------------------------------------------------------- */

static const char *
result_text(const Job *j, char *buf, size_t n)
{
	switch (j->end)
	{
		case END_OK:
			return "ok";
		case END_EXIT:
			snprintf(buf, n, "exit %d", WEXITSTATUS(j->wait_status));
			return buf;
		case END_SIGNAL:
			snprintf(buf, n, "signal %d", WIFSIGNALED(j->wait_status) ? WTERMSIG(j->wait_status) : 0);
			return buf;
		case END_DEADLINE:
			return "deadline";
		case END_INTERRUPTED:
			return "interrupted";
		case END_LOST:
			return "lease lost";
		case END_SETUP:
		case END_NONE:
			break;
	}
	return "error";
}

/* The last line of the command's stderr, for the task line. */
static char *
last_stderr_line(const Job *j)
{
	size_t		n = j->tail_len,
				s;
	char	   *r;

	while (n > 0 && (j->tail[n - 1] == '\n' || j->tail[n - 1] == ' ' || j->tail[n - 1] == '\r'))
		n--;
	if (n == 0)
		return NULL;
	s = n;
	while (s > 0 && j->tail[s - 1] != '\n')
		s--;
	if (n - s > 200)
		s = n - 200;
	r = xmalloc(n - s + 1);
	memcpy(r, j->tail + s, n - s);
	r[n - s] = '\0';
	n -= s;
	sanitize_text(r, &n);
	one_line(r);
	return r;
}

static void
release(Job *j, const char *outcome, const char *detail)
{
	char		rb[32];
	double		dur = j->t_started > 0 ? (j->t_ended > 0 ? j->t_ended : now_mono()) - j->t_started : 0;
	bool		ok = strcmp(outcome, "advanced") == 0;
	const char *res = result_text(j, rb, sizeof(rb));
	char	   *d = detail ? xstrdup(detail) : NULL;

	if (d)
		one_line(d);
	if (ok || verbosity > 0)
		log_line(ok ? 1 : 0, "%s attempt %d (task %lld): %s -> %s, %.2f s, report %ld bytes%s%s",
				 j->feature, j->attempt, j->task_id, res, outcome, dur, j->report_bytes,
				 d ? ": " : "", d ? d : "");
	else
		log_warn("%s attempt %d (task %lld): %s -> %s, %.2f s, report %ld bytes%s%s",
				 j->feature, j->attempt, j->task_id, res, outcome, dur, j->report_bytes,
				 d ? ": " : "", d ? d : "");
	free(d);

	if (j->pid > 0 && !j->reaped)
	{
		signal_group(j, SIGKILL);
		waitpid(j->pid, NULL, 0);
	}
	if (j->err_fd >= 0)
		close(j->err_fd);
	if (j->dir)
	{
		if (opt.keep_files)
			log_info("task %lld: kept %s", j->task_id, j->dir);
		else
			remove_tree(j->dir);
	}
	tasks_done++;
	if (!ok)
		tasks_failed++;
	free(j->stage);
	free(j->feature);
	free(j->task_type);
	free(j->notice);
	free(j->deadline_iso);
	free(j->report_subject);
	free(j->dir);
	free(j->inputs);
	free(j->why);
	memset(j, 0, sizeof(*j));
	j->err_fd = -1;
	j->phase = JOB_FREE;
	want_claim = true;
}

/*
 * The completion notice as SQL: $1 the command's result object (or {}),
 * $2 task id, $3 default status, $4 agent, $5 feature, $6 report subject,
 * $7 default summary, $8 default blockers, $9.. the runner's metadata.
 */
static char *
notice_sql(void)
{
	return xasprintf(
		"SELECT %s.agog_complete_task($2::bigint, jsonb_build_object("
		"'status', coalesce(r->'status', to_jsonb($3::text)), "
		"'agent', $4::text, 'task', $5::text, 'nats_channel', $6::text, "
		"'summary', coalesce(r->'summary', to_jsonb($7::text)), "
		"'complexity', coalesce(r->'complexity', to_jsonb('Unknown'::text)), "
		"'blockers', coalesce(r->'blockers', to_jsonb($8::text)), "
		"'ready_for_next_stage', coalesce(r->'ready_for_next_stage', "
		"    to_jsonb(coalesce(r->>'status', $3::text) = 'complete')), "
		"'completion_time', to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), "
		"'files_modified', coalesce(r->'files_modified', '0'::jsonb), "
		"'metadata', coalesce(r->'metadata', '{}'::jsonb) || jsonb_build_object("
		"    'task_id', $2::bigint, 'workflow_id', $9::bigint, 'stage', $10::text, "
		"    'attempt', $11::int, 'duration_ms', $12::bigint, 'runner', $13::text, "
		"    'report_bytes', $14::bigint, 'result', $15::text))) "
		"FROM (SELECT $1::jsonb AS r) x", ext_schema);
}

typedef struct NoticeParams
{
	char		task[32],
				wf[32],
				attempt[16],
				ms[32],
				bytes[32],
				res[32];
	const char *p[15];
} NoticeParams;

static void
notice_params(NoticeParams *np, const Job *j, const char *result, const char *status,
			  const char *summary, const char *blockers)
{
	double		dur = j->t_started > 0 ? j->t_ended - j->t_started : 0;
	char		rb[32];

	snprintf(np->task, sizeof(np->task), "%lld", j->task_id);
	snprintf(np->wf, sizeof(np->wf), "%lld", j->workflow_id);
	snprintf(np->attempt, sizeof(np->attempt), "%d", j->attempt);
	snprintf(np->ms, sizeof(np->ms), "%lld", (long long) (dur * 1000.0));
	snprintf(np->bytes, sizeof(np->bytes), "%ld", j->report_bytes);
	snprintf(np->res, sizeof(np->res), "%s", result_text(j, rb, sizeof(rb)));
	np->p[0] = result;
	np->p[1] = np->task;
	np->p[2] = status;
	np->p[3] = opt.agent;
	np->p[4] = j->feature;
	np->p[5] = j->report_subject;
	np->p[6] = summary;
	np->p[7] = blockers;
	np->p[8] = np->wf;
	np->p[9] = j->stage;
	np->p[10] = np->attempt;
	np->p[11] = np->ms;
	np->p[12] = opt.worker_id;
	np->p[13] = np->bytes;
	np->p[14] = np->res;
}

/* After a completion whose commit may have gone through: did it? */
static char *
confirm_commit(const Job *j)
{
	char		id[32],
				at[16];
	const char *p[3] = {id, at, opt.worker_id};
	QRes		q;
	char	   *r = NULL;

	snprintf(id, sizeof(id), "%lld", j->task_id);
	snprintf(at, sizeof(at), "%d", j->attempt);
	if (db_exec("SELECT outcome FROM agog_nats.notices WHERE task_id = $1::bigint "
				"AND attempt = $2::int AND notice->'metadata'->>'runner' = $3", 3, p, &q) &&
		PQntuples(q.res) == 1)
		r = xstrdup(PQgetvalue(q.res, 0, 0));
	q_clear(&q);
	return r;
}

/*
 * A notice refused because the task is no longer running (55000): when an
 * earlier send of it may have committed (its reply was cut off), its
 * outcome, confirmed from agog_nats.notices, with detail recorded; else
 * the task was lost (why).
 */
static void
release_refused(Job *j, bool may_have_committed, const char *recorded, const char *why)
{
	char	   *done = may_have_committed ? confirm_commit(j) : NULL;

	if (done)
	{
		release(j, done, recorded);
		free(done);
	}
	else
		release(j, "lost", why);
}

/* The first markdown heading of the report, as its default summary. */
static char *
first_heading(const char *s, size_t len)
{
	size_t		i = 0;

	while (i < len)
	{
		size_t		e = i;

		while (e < len && s[e] != '\n')
			e++;
		if (s[i] == '#')
		{
			size_t		b = i,
						n;
			char	   *r;

			while (b < e && s[b] == '#')
				b++;
			while (b < e && (s[b] == ' ' || s[b] == '\t'))
				b++;
			n = e - b;
			while (n > 0 && (s[b + n - 1] == ' ' || s[b + n - 1] == '\r'))
				n--;
			if (n > 200)
				n = 200;
			if (n > 0)
			{
				r = xmalloc(n + 1);
				memcpy(r, s + b, n);
				r[n] = '\0';
				sanitize_text(r, &n);
				return r;
			}
		}
		i = e + 1;
	}
	return NULL;
}

static void
rollback(void)
{
	QRes		q;

	if (db_connected())
	{
		db_exec("ROLLBACK", 0, NULL, &q);
		q_clear(&q);
	}
}

/*
 * Exit 0: publish the report and complete the task in one transaction.
 * Returns 0 when done (the job is released), 1 to try again after a
 * reconnect, 2 when the task must fail instead (j->why says why).
 */
static int
complete_ok(Job *j)
{
	Buf			report = {0},
				result = {0};
	bool		big = false;
	char	   *rpath = path_in(j, "report.md");
	char	   *respath = path_in(j, "result.json");
	char	   *status = NULL,
			   *summary = NULL,
			   *sql,
			   *outcome = NULL;
	const char *p[11];
	QRes		q;
	NoticeParams np;
	int			rc = 2;
	size_t		k;

	if (read_file(rpath, MAX_REPORT, &report, &big) != 0)
	{
		j->why = xasprintf("could not read the command's output %s: %s", rpath,
						   errno == EINVAL ? "not a regular file" : strerror(errno));
		goto out;
	}
	if (big)
	{
		j->why = xasprintf("the report (stdout) is larger than %ld bytes", MAX_REPORT);
		goto out;
	}
	if (report.len && memchr(report.data, '\0', report.len))
	{
		j->why = xstrdup("the report (stdout) contains a NUL byte: a report is text");
		goto out;
	}
	j->report_bytes = (long) report.len;

	if (read_file(respath, MAX_RESULT, &result, &big) != 0 && errno != ENOENT)
	{
		j->why = xasprintf("could not read $AGOG_RESULT_FILE: %s",
						   errno == EINVAL ? "not a regular file" : strerror(errno));
		goto out;
	}
	if (big)
	{
		j->why = xasprintf("$AGOG_RESULT_FILE is larger than %d bytes", MAX_RESULT);
		goto out;
	}
	for (k = 0; k < result.len && strchr(" \t\r\n", result.data[k]); k++)
		;
	if (k == result.len)
	{
		result.len = 0;
		buf_append(&result, "{}", 2);
	}
	else if (memchr(result.data, '\0', result.len))
	{
		j->why = xstrdup("$AGOG_RESULT_FILE contains a NUL byte");
		goto out;
	}

	/* The command's result object: valid, and its status. */
	p[0] = result.data;
	if (!db_exec("SELECT jsonb_typeof($1::jsonb), coalesce(($1::jsonb)->>'status', 'complete')", 1, p, &q))
	{
		if (q.status == Q_CONNERR)
			rc = 1;
		else
			j->why = xasprintf("$AGOG_RESULT_FILE is not valid JSON: %s", q.message);
		q_clear(&q);
		goto out;
	}
	if (strcmp(PQgetvalue(q.res, 0, 0), "object") != 0)
	{
		j->why = xasprintf("$AGOG_RESULT_FILE must hold a JSON object, not a%s %s",
						   PQgetvalue(q.res, 0, 0)[0] == 'a' ? "n" : "", PQgetvalue(q.res, 0, 0));
		q_clear(&q);
		goto out;
	}
	status = xstrdup(PQgetvalue(q.res, 0, 1));
	q_clear(&q);
	if (report.len == 0 && strcmp(status, "complete") == 0)
	{
		j->why = xstrdup("the command exited 0 but wrote no report on its standard output");
		goto out;
	}
	summary = first_heading(report.data ? report.data : "", report.len);
	if (!summary)
		summary = xasprintf("%s report for %s (%zu bytes)", j->task_type, j->feature, report.len);

	/* One transaction: the report (if any) and the completion notice. */
	if (!db_exec("BEGIN", 0, NULL, &q))
	{
		rc = q.status == Q_CONNERR ? 1 : 2;
		if (rc == 2)
			j->why = xasprintf("BEGIN failed: %s", q.message);
		q_clear(&q);
		goto out;
	}
	q_clear(&q);
	notice_params(&np, j, result.data, "complete", summary, "None");
	if (report.len > 0)
	{
		p[0] = opt.agent;
		p[1] = j->task_type;
		p[2] = j->feature;
		p[3] = report.data;
		p[4] = result.data;
		p[5] = np.wf;
		p[6] = np.task;
		p[7] = j->stage;
		p[8] = np.attempt;
		p[9] = np.ms;
		p[10] = opt.worker_id;
		sql = xasprintf("SELECT %s.agog_publish_report($1, $2, $3, $4, "
						"coalesce(r->'report_metadata', '{}'::jsonb) || jsonb_build_object("
						"'workflow_id', $6::bigint, 'task_id', $7::bigint, 'stage', $8::text, "
						"'attempt', $9::int, 'duration_ms', $10::bigint, 'runner', $11::text)) "
						"FROM (SELECT $5::jsonb AS r) x", ext_schema);
		if (!db_exec(sql, 11, p, &q))
		{
			free(sql);
			goto failed;
		}
		free(sql);
		q_clear(&q);
	}
	sql = notice_sql();
	if (!db_exec(sql, 15, np.p, &q))
	{
		free(sql);
		goto failed;
	}
	free(sql);
	outcome = xstrdup(PQgetvalue(q.res, 0, 0));
	q_clear(&q);
	j->commit_sent = true;
	if (!db_exec("COMMIT", 0, NULL, &q))
		goto failed;
	q_clear(&q);
	release(j, outcome, NULL);
	rc = 0;
	goto out;

failed:
	if (q.status == Q_CONNERR)
		rc = 1;					/* again after the reconnect; the database decides */
	else
	{
		rollback();
		if (strcmp(q.sqlstate, "55000") == 0)
		{
			release_refused(j, j->commit_sent, "completed before the connection was lost",
							q.message);
			rc = 0;
		}
		else
		{
			j->why = xasprintf("could not publish the report and complete the task: %s", q.message);
			rc = 2;
		}
	}
	q_clear(&q);

out:
	free(outcome);
	free(status);
	free(summary);
	free(rpath);
	free(respath);
	buf_free(&report);
	buf_free(&result);
	return rc;
}

static char *
failure_summary(const Job *j)
{
	switch (j->end)
	{
		case END_EXIT:
			return xasprintf("the command exited with status %d", WEXITSTATUS(j->wait_status));
		case END_SIGNAL:
			return xasprintf("the command was killed by signal %d (%s)",
							 WIFSIGNALED(j->wait_status) ? WTERMSIG(j->wait_status) : 0,
							 strsignal(WIFSIGNALED(j->wait_status) ? WTERMSIG(j->wait_status) : 0));
		case END_DEADLINE:
			if (j->why)
				return xstrdup(j->why);
			return xasprintf("the command ran past the task's deadline (%s) and was stopped "
							 "(SIGTERM%s)", j->deadline_iso, j->kill_sent ? ", then SIGKILL" : "");
		case END_INTERRUPTED:
			return xstrdup("agog-agent was stopped (SIGTERM) before the command finished: "
						   "the task is given back to be retried");
		default:
			return xstrdup(j->why ? j->why : "agog-agent could not run the command");
	}
}

/* Any other end: a failed notice, its blockers ending with stderr. */
static void
send_failed(Job *j)
{
	char	   *summary = j->end == END_OK && j->why ? xstrdup(j->why) : failure_summary(j);
	char	   *sql = notice_sql();
	Buf			blockers = {0};
	size_t		n = j->tail_len > STDERR_TAIL ? STDERR_TAIL : j->tail_len;
	size_t		sl = strlen(summary);
	char	   *tail = xmalloc(n + 1);
	char	   *line;
	NoticeParams np;
	QRes		q;

	sanitize_text(summary, &sl);
	memcpy(tail, j->tail + j->tail_len - n, n);
	tail[n] = '\0';
	sanitize_text(tail, &n);
	while (n > 0 && strchr(" \t\r\n", tail[n - 1]))
		tail[--n] = '\0';
	buf_printf(&blockers, "%s", summary);
	if (n > 0)
		buf_printf(&blockers, "; stderr: %s", tail);
	notice_params(&np, j, "{}", "failed", summary, blockers.data);
	if (db_exec(sql, 15, np.p, &q))
	{
		line = j->end == END_OK || j->end == END_SETUP ? xstrdup(j->why ? j->why : summary)
			: last_stderr_line(j);
		release(j, PQgetvalue(q.res, 0, 0), line);
		free(line);
	}
	else if (q.status == Q_SQLERR)
	{
		/* sent again after a reconnect, the first send may have committed */
		if (strcmp(q.sqlstate, "55000") == 0)
			release_refused(j, true, "recorded before the connection was lost", q.message);
		else
		{
			log_error("could not send the failed notice of task %lld: %s", j->task_id, q.message);
			release(j, "not reported", q.message);
		}
	}
	/* Q_CONNERR: the job stays ended and is reported after the reconnect. */
	q_clear(&q);
	free(sql);
	free(tail);
	free(summary);
	buf_free(&blockers);
}

void
finish_job(Job *j)
{
	if (j->end == END_LOST)
	{
		release(j, "lost", "the lease was lost; the workflow retries the task");
		return;
	}
	if (j->end == END_OK && !j->why)
	{
		if (complete_ok(j) != 2)
			return;				/* done, or again after the reconnect */
	}
	send_failed(j);
}

/* Stopping without a database: end the command and drop the task. */
void
abandon_job(Job *j, const char *why)
{
	if (j->phase == JOB_RUNNING && !j->reaped)
	{
		signal_group(j, SIGKILL);
		waitpid(j->pid, &j->wait_status, 0);
		j->reaped = true;
		j->end = END_INTERRUPTED;
		j->t_ended = now_mono();
	}
	release(j, "not reported", why);
}
