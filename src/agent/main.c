/*
 * main.c: agog-agent's options, signals and event loop.
 *
 *   agog-agent --agent NAME [--dsn DSN] [--jobs N] [--lease S] [--poll S]
 *              [--grace S] [--quiet|--verbose] [--once] -- COMMAND [ARGS...]
 *
 * See docs/agog-agent.md.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "agent.h"

Options		opt;
char	   *ext_schema;
volatile int stop_requests;
bool		want_claim;

static int	sig_pipe[2] = {-1, -1};

static const char usage_text[] =
"Usage: agog-agent --agent NAME [OPTIONS] -- COMMAND [ARGS...]\n"
"\n"
"Run COMMAND for every task the agog_nats workflow engine dispatches to agent NAME:\n"
"claim the task, put the reports it needs in files, run COMMAND with the task notice\n"
"(JSON) on stdin, publish its stdout as the report and complete the task, in one\n"
"transaction.  A non-zero exit, or a command still running at the task's deadline,\n"
"sends a failed notice with the end of its stderr, and the workflow retries the task.\n"
"\n"
"Options:\n"
"  -a, --agent NAME      the agent (a row of agog_nats.agents), required\n"
"  -d, --dsn DSN         libpq connection string or URI of the database that has\n"
"                        the extension (agog_nats.database); default: libpq's\n"
"                        defaults and PG* environment variables\n"
"  -j, --jobs N          run up to N commands at once (default 1)\n"
"      --lease SECONDS   lease of a claimed task, renewed by heartbeats every\n"
"                        third of it while the command runs (default 60)\n"
"      --poll SECONDS    look for tasks this often besides LISTEN (default 10)\n"
"      --grace SECONDS   on SIGTERM/SIGINT, let running commands finish this long\n"
"                        before stopping them and giving their tasks back (default 30)\n"
"      --once            run the tasks dispatched now, then exit (status 3 if one\n"
"                        did not complete)\n"
"      --worker-id ID    name recorded as the task's claimer (default agog-agent@HOST:PID)\n"
"      --tmpdir DIR      where the private task directories go (default $TMPDIR or /tmp)\n"
"      --keep-files      do not remove a task's directory after it (debugging)\n"
"  -q, --quiet           print only warnings and errors\n"
"  -v, --verbose         also print each step and the commands' stderr\n"
"  -h, --help            print this help and exit\n"
"  -V, --version         print the version and exit\n"
"\n"
"COMMAND gets the task notice on stdin and these environment variables:\n"
"  AGOG_TASK_ID AGOG_WORKFLOW_ID AGOG_AGENT AGOG_TASK_TYPE AGOG_FEATURE AGOG_STAGE\n"
"  AGOG_ATTEMPT AGOG_DEADLINE AGOG_SECONDS_LEFT AGOG_REPORT_SUBJECT AGOG_WORK_DIR\n"
"  AGOG_INPUT_DIR AGOG_INPUTS AGOG_NOTICE_FILE AGOG_RESULT_FILE AGOG_WORKER_ID\n"
"Input reports are $AGOG_INPUT_DIR/<stage>.md (their metadata in <stage>.json).\n"
"COMMAND may write a JSON object to $AGOG_RESULT_FILE with the completion notice's\n"
"summary, complexity, blockers, files_modified, status, metadata, and report_metadata.\n"
"\n"
"Exit status: 0 after SIGTERM/SIGINT or --once; 1 on a runtime error (no database at\n"
"start); 2 on a usage error (bad option or DSN, unknown agent, missing command,\n"
"extension not installed); 3 with --once when a task did not complete.\n"
"Manual: docs/agog-agent.md\n";

static void
usage_error(const char *fmt,...) __attribute__((format(printf, 1, 2), noreturn));

static void
usage_error(const char *fmt,...)
{
	va_list		ap;

	fputs("agog-agent: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputs("\nTry \"agog-agent --help\".\n", stderr);
	exit(EXIT_USAGE);
}

static double
parse_seconds(const char *name, const char *s, double min, double max)
{
	char	   *end;
	double		v;

	errno = 0;
	v = strtod(s, &end);
	if (errno || end == s || *end != '\0' || !(v >= min && v <= max))
		usage_error("%s must be a number of seconds from %g to %g, not \"%s\"", name, min, max, s);
	return v;
}

static void
parse_options(int argc, char **argv)
{
	static const struct option longopts[] = {
		{"agent", required_argument, NULL, 'a'},
		{"dsn", required_argument, NULL, 'd'},
		{"jobs", required_argument, NULL, 'j'},
		{"lease", required_argument, NULL, 'L'},
		{"poll", required_argument, NULL, 'P'},
		{"grace", required_argument, NULL, 'G'},
		{"once", no_argument, NULL, 'O'},
		{"worker-id", required_argument, NULL, 'W'},
		{"tmpdir", required_argument, NULL, 'T'},
		{"keep-files", no_argument, NULL, 'K'},
		{"quiet", no_argument, NULL, 'q'},
		{"verbose", no_argument, NULL, 'v'},
		{"help", no_argument, NULL, 'h'},
		{"version", no_argument, NULL, 'V'},
		{NULL, 0, NULL, 0}
	};
	int			c;
	char		host[256];
	PQconninfoOption *ci;
	char	   *cierr = NULL;

	opt.jobs = 1;
	opt.lease = 60;
	opt.poll = 10;
	opt.grace = 30;
	opt.dsn = "";

	opterr = 0;
	while ((c = getopt_long(argc, argv, "+a:d:j:qvhV", longopts, NULL)) != -1)
	{
		switch (c)
		{
			case 'a':
				opt.agent = optarg;
				break;
			case 'd':
				opt.dsn = optarg;
				break;
			case 'j':
				opt.jobs = (int) parse_seconds("--jobs", optarg, 1, 64);
				if (strspn(optarg, "0123456789") != strlen(optarg))
					usage_error("--jobs must be a whole number from 1 to 64, not \"%s\"", optarg);
				break;
			case 'L':
				opt.lease = (int) parse_seconds("--lease", optarg, 3, 86400);
				if (strspn(optarg, "0123456789") != strlen(optarg))
					usage_error("--lease must be a whole number of seconds from 3 to 86400, not \"%s\"", optarg);
				break;
			case 'P':
				opt.poll = parse_seconds("--poll", optarg, 0.1, 3600);
				break;
			case 'G':
				opt.grace = parse_seconds("--grace", optarg, 0, 86400);
				break;
			case 'O':
				opt.once = true;
				break;
			case 'W':
				opt.worker_id = optarg;
				break;
			case 'T':
				opt.tmpdir = optarg;
				break;
			case 'K':
				opt.keep_files = true;
				break;
			case 'q':
				verbosity = 0;
				break;
			case 'v':
				verbosity = 2;
				break;
			case 'h':
				fputs(usage_text, stdout);
				exit(EXIT_OK);
			case 'V':
				printf("agog-agent %s (libpq %d)\n", AGENT_VERSION, PQlibVersion());
				exit(EXIT_OK);
			default:
				if (optopt && strchr("adj", optopt))
					usage_error("option -%c needs a value", optopt);
				usage_error("unknown option \"%s\"", argv[optind - 1]);
		}
	}

	if (!opt.agent)
		usage_error("--agent NAME is required");
	if (!valid_token(opt.agent))
		usage_error("agent \"%s\" is not a valid name: 1 to 64 characters from A-Z a-z 0-9 _ -",
					opt.agent);
	log_agent = opt.agent;
	if (optind >= argc)
		usage_error("no COMMAND given: agog-agent --agent %s [OPTIONS] -- COMMAND [ARGS...]",
					opt.agent);
	opt.command = argv + optind;
	opt.command_path = resolve_command(opt.command[0]);
	if (!opt.command_path)
		usage_error("command not found or not executable: %s%s", opt.command[0],
					strchr(opt.command[0], '/') ? "" : " (searched PATH)");

	/* A DSN libpq cannot parse is a usage error, found before connecting. */
	if (opt.dsn[0])
	{
		ci = PQconninfoParse(opt.dsn, &cierr);
		if (!ci)
		{
			char	   *m = xstrdup(cierr ? cierr : "out of memory");

			one_line(m);
			usage_error("invalid --dsn: %s", m);
		}
		PQconninfoFree(ci);
	}

	if (!opt.worker_id)
	{
		if (gethostname(host, sizeof(host)) != 0)
			strcpy(host, "localhost");
		host[sizeof(host) - 1] = '\0';
		opt.worker_id = xasprintf("agog-agent@%s:%d", host, (int) getpid());
	}
	if (!opt.tmpdir)
	{
		const char *t = getenv("TMPDIR");

		opt.tmpdir = t && *t ? (char *) t : "/tmp";
	}
}

/* ---- signals ----------------------------------------------------------- */

static void
on_signal(int sig)
{
	int			save = errno;
	char		c = (char) sig;

	if (sig == SIGTERM || sig == SIGINT)
		stop_requests++;
	if (write(sig_pipe[1], &c, 1) < 0)
	{
		/* the pipe is full: a wakeup is pending anyway */
	}
	errno = save;
}

static void
setup_signals(void)
{
	struct sigaction sa;

	if (pipe2(sig_pipe, O_CLOEXEC | O_NONBLOCK) != 0)
	{
		perror("agog-agent: pipe");
		exit(EXIT_RUNTIME);
	}
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = SA_RESTART;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGHUP, &sa, NULL);
	sigaction(SIGCHLD, &sa, NULL);
	sa.sa_handler = SIG_IGN;
	sigaction(SIGPIPE, &sa, NULL);
}

/*
 * agent_wait_since: agent_wait, where a stop asked for after seen_stops
 * requests is an event.  The main loop passes the requests it has acted on:
 * a signal that came while a statement waited (that wait took its byte off
 * the self-pipe) must still end the main loop's sleep at once.
 */
static bool
agent_wait_since(int db_fd, short db_events, double timeout, int seen_stops)
{
	double		end = now_mono() + (timeout > 0 ? timeout : 0);

	for (;;)
	{
		struct pollfd pfd[2 + 64];
		int			n = 0,
					db_i = -1,
					ms,
					i;
		double		now = now_mono(),
					wake = end,
					k = next_kill_time();
		bool		event;

		pfd[n].fd = sig_pipe[0];
		pfd[n].events = POLLIN;
		pfd[n++].revents = 0;
		if (db_fd >= 0)
		{
			db_i = n;
			pfd[n].fd = db_fd;
			pfd[n].events = db_events;
			pfd[n++].revents = 0;
		}
		for (i = 0; i < opt.jobs && n < (int) (sizeof(pfd) / sizeof(pfd[0])); i++)
			if (jobs[i].phase == JOB_RUNNING && jobs[i].err_fd >= 0)
			{
				pfd[n].fd = jobs[i].err_fd;
				pfd[n].events = POLLIN;
				pfd[n++].revents = 0;
			}
		if (k < wake)
			wake = k;
		/* a stop the caller has not seen: its byte may be gone from the pipe */
		if (stop_requests != seen_stops)
			wake = now;
		ms = wake <= now ? 0 : (int) ceil((wake - now) * 1000.0);
		if (ms > 60000)
			ms = 60000;
		if (poll(pfd, (nfds_t) n, ms) < 0 && errno != EINTR)
		{
			log_error("poll: %s", strerror(errno));
			usleep(100000);
		}
		if (pfd[0].revents)
		{
			char		drain[64];

			while (read(sig_pipe[0], drain, sizeof(drain)) > 0)
				;
		}
		event = serve_jobs();
		if (stop_requests != seen_stops)
			event = true;
		if (db_i >= 0 && pfd[db_i].revents)
			return true;
		if (event || now_mono() >= end)
			return false;
	}
}

bool
agent_wait(int db_fd, short db_events, double timeout)
{
	return agent_wait_since(db_fd, db_events, timeout, stop_requests);
}

/* ---- the session --------------------------------------------------------- */

/*
 * After (re)connecting: find the extension's schema and LISTEN.  Returns
 * 0, or EXIT_USAGE when the database cannot serve this agent (message
 * in *why), or -1 when the connection was lost.
 */
static int
setup_session(char **why)
{
	QRes		q;
	char	   *chan,
			   *sql;

	*why = NULL;

	/*
	 * First, before anything else runs: the database's search_path is its
	 * owner's to set, and this session's role may be more privileged than
	 * the owner: a function of the owner's that matches a call better than
	 * pg_catalog's (a quote_ident(name)) would run as this role.  Every
	 * statement of the agent names the extension's objects with their schema
	 * and wants everything else from pg_catalog, so nothing else belongs in
	 * the path.
	 */
	if (!db_exec("SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', false)",
				 0, NULL, &q))
	{
		int			rc = q.status == Q_CONNERR ? -1 : EXIT_USAGE;

		*why = xasprintf("could not set the session's search_path: %s", q.message);
		q_clear(&q);
		return rc;
	}
	q_clear(&q);
	if (!db_exec("SELECT quote_ident(n.nspname), e.extversion, "
				 "  to_regprocedure(quote_ident(n.nspname) || '.agog_claim_task(text,text,interval)') IS NOT NULL "
				 "FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace "
				 "WHERE e.extname = 'agog_nats'", 0, NULL, &q))
	{
		int			rc = q.status == Q_CONNERR ? -1 : EXIT_USAGE;

		*why = xasprintf("could not look up the agog_nats extension: %s", q.message);
		q_clear(&q);
		return rc;
	}
	if (PQntuples(q.res) == 0)
	{
		*why = xasprintf("the agog_nats extension is not installed in database \"%s\" "
						 "(connect to the database named by agog_nats.database, where "
						 "CREATE EXTENSION agog_nats was run)", db_dbname());
		q_clear(&q);
		return EXIT_USAGE;
	}
	if (strcmp(PQgetvalue(q.res, 0, 2), "t") != 0)
	{
		*why = xasprintf("agog_nats %s in database \"%s\" has no workflows (0.3.0 or later): "
						 "run ALTER EXTENSION agog_nats UPDATE",
						 PQgetvalue(q.res, 0, 1), db_dbname());
		q_clear(&q);
		return EXIT_USAGE;
	}
	free(ext_schema);
	ext_schema = xstrdup(PQgetvalue(q.res, 0, 0));
	q_clear(&q);

	/* NOTIFY channel names are identifiers: at most 63 bytes. */
	chan = xasprintf("agog_task_%s", opt.agent);
	if (strlen(chan) > 63)
	{
		log_warn("the channel \"%s\" is longer than 63 bytes: not listening, polling every %g s",
				 chan, opt.poll);
		free(chan);
		return 0;
	}
	sql = xasprintf("LISTEN \"%s\"", chan);		/* a token: no quote inside */
	if (!db_exec(sql, 0, NULL, &q))
	{
		int			rc = q.status == Q_CONNERR ? -1 : EXIT_RUNTIME;

		*why = xasprintf("LISTEN %s failed: %s", chan, q.message);
		q_clear(&q);
		free(sql);
		free(chan);
		return rc;
	}
	q_clear(&q);
	log_debug("listening on %s in database \"%s\" (extension schema %s)", chan, db_dbname(), ext_schema);
	free(sql);
	free(chan);
	return 0;
}

/*
 * Take every notification libpq holds, read from the socket or queued with
 * the answer to a statement.  Returns whether there was one.  Only while
 * connected.
 */
static bool
take_notifies(void)
{
	PGnotify   *nf;
	bool		any = false;

	while ((nf = db_notifies()) != NULL)
	{
		log_debug("notified: task %s", nf->extra);
		any = true;
		PQfreemem(nf);
	}
	return any;
}

static double
min_d(double a, double b)
{
	return a < b ? a : b;
}

int
main(int argc, char **argv)
{
	char	   *err = NULL;
	int			rc,
				handled_stops = 0,
				exit_code = EXIT_OK,
				i;
	bool		stopping = false,
				no_more = false,
				was_connected = true,
				warned_down = false;
	double		stop_deadline = 0,
				next_poll,
				reconnect_at = 0,
				backoff = 0.25,
				lost_at = 0;

	setvbuf(stdout, NULL, _IOLBF, 0);
	parse_options(argc, argv);
	jobs = calloc((size_t) opt.jobs, sizeof(Job));
	if (!jobs)
	{
		fputs("agog-agent: out of memory\n", stderr);
		return EXIT_RUNTIME;
	}
	for (i = 0; i < opt.jobs; i++)
		jobs[i].err_fd = -1;
	setup_signals();

	if (!db_connect(opt.dsn, 10.0, &err))
	{
		fprintf(stderr, "agog-agent: could not connect to the database%s%s: %s\n",
				opt.dsn[0] ? " " : "", opt.dsn[0] ? "given by --dsn" : " (libpq defaults)", err);
		return EXIT_RUNTIME;
	}
	rc = setup_session(&err);
	if (rc != 0)
	{
		fprintf(stderr, "agog-agent: %s\n", err ? err : "the connection was lost");
		return rc < 0 ? EXIT_RUNTIME : rc;
	}
	log_info("agent %s ready: database \"%s\", up to %d job%s, lease %d s, command %s",
			 opt.agent, db_dbname(), opt.jobs, opt.jobs == 1 ? "" : "s", opt.lease,
			 opt.command_path);

	want_claim = true;
	next_poll = now_mono() + opt.poll;

	for (;;)
	{
		double		now = now_mono(),
					timeout;

		/* SIGTERM / SIGINT: stop claiming; a second one ends commands now. */
		if (stop_requests != handled_stops)
		{
			if (!stopping)
			{
				stopping = true;
				stop_deadline = now + opt.grace;
				if (jobs_active() > 0)
					log_info("stopping: no new tasks; waiting up to %g s for %d running task%s",
							 opt.grace, jobs_active(), jobs_active() == 1 ? "" : "s");
				else
					log_info("stopping");
			}
			if (stop_requests - handled_stops > 1 || (handled_stops > 0 && stop_requests > handled_stops))
			{
				stop_deadline = now;
				if (jobs_active() > 0)
					log_info("second signal: stopping the running commands now");
			}
			handled_stops = stop_requests;
			for (i = 0; i < opt.jobs; i++)
				if (jobs[i].phase != JOB_FREE && jobs[i].t_term_stop > stop_deadline)
					jobs[i].t_term_stop = stop_deadline;
		}

		/* Reconnect with backoff. */
		if (!db_connected())
		{
			if (was_connected)
			{
				was_connected = false;
				warned_down = false;
				lost_at = now;
				reconnect_at = now;
				backoff = 0.25;
				log_warn("lost the database connection: %s; reconnecting", db_last_error());
			}
			if (now >= reconnect_at)
			{
				if (db_connect(opt.dsn, 10.0, &err) && (rc = setup_session(&err)) == 0)
				{
					log_info("reconnected to the database after %.1f s", now_mono() - lost_at);
					was_connected = true;
					want_claim = true;
					for (i = 0; i < opt.jobs; i++)
						if (jobs[i].phase == JOB_CLAIMED || jobs[i].phase == JOB_RUNNING)
							jobs[i].next_heartbeat = 0;		/* is the lease still ours? */
				}
				else
				{
					if (!warned_down || verbosity > 1)
						log_warn("could not reconnect: %s; retrying in %.2g s", err ? err : "connection lost", backoff);
					warned_down = true;
					free(err);
					err = NULL;
					db_close();
					reconnect_at = now_mono() + backoff;
					backoff = min_d(backoff * 2, 10.0);
				}
			}
			/* Stopping and no database: do not wait forever to report. */
			if (!db_connected() && stopping && now > stop_deadline + 30.0 && jobs_active() > 0)
			{
				for (i = 0; i < opt.jobs; i++)
					if (jobs[i].phase != JOB_FREE)
						abandon_job(&jobs[i], "the database is unreachable; the workflow retries it when its lease runs out");
				exit_code = EXIT_RUNTIME;
				break;
			}
		}

		if (db_connected())
		{
			if (take_notifies())
				want_claim = true;
			for (i = 0; i < opt.jobs && db_connected(); i++)
				if (jobs[i].phase == JOB_ENDED)
					finish_job(&jobs[i]);
			for (i = 0; i < opt.jobs && db_connected(); i++)
				if ((jobs[i].phase == JOB_CLAIMED || jobs[i].phase == JOB_RUNNING) &&
					now_mono() >= jobs[i].next_heartbeat)
					heartbeat_job(&jobs[i]);
			for (i = 0; i < opt.jobs && db_connected(); i++)
				if (jobs[i].phase == JOB_CLAIMED)
				{
					if (stopping)
					{
						jobs[i].end = END_INTERRUPTED;
						jobs[i].phase = JOB_ENDED;
						jobs[i].t_ended = now_mono();
						finish_job(&jobs[i]);
					}
					else
						start_job(&jobs[i]);
				}
			/* (a signal during a claim's wait is acted on at the top first) */
			while (!stopping && stop_requests == handled_stops && !no_more &&
				   want_claim && jobs_free() > 0 && db_connected())
			{
				int			fatal = 0;

				if (!claim_one(&fatal))
				{
					if (fatal)
					{
						/* Cannot claim any more: finish what runs, then exit. */
						exit_code = fatal;
						if (jobs_active() == 0)
							goto out;
						stopping = true;
						stop_deadline = now_mono() + opt.grace;
						log_info("stopping: waiting up to %g s for %d running task%s",
								 opt.grace, jobs_active(), jobs_active() == 1 ? "" : "s");
						for (i = 0; i < opt.jobs; i++)
							if (jobs[i].phase != JOB_FREE && jobs[i].t_term_stop > stop_deadline)
								jobs[i].t_term_stop = stop_deadline;
						break;
					}
					if (db_connected())
					{
						want_claim = false;
						/* --once: tasks dispatched while commands run are run too */
						if (opt.once && jobs_active() == 0)
							no_more = true;
					}
					break;
				}
			}
		}

		if ((stopping || (opt.once && no_more)) && jobs_active() == 0)
			break;

		now = now_mono();
		if (now >= next_poll)
		{
			want_claim = true;
			next_poll = now + opt.poll;
			if (db_connected())
				continue;
		}
		timeout = next_poll - now;
		if (!db_connected())
			timeout = min_d(timeout, reconnect_at - now);
		for (i = 0; i < opt.jobs; i++)
		{
			if (jobs[i].phase == JOB_CLAIMED || jobs[i].phase == JOB_RUNNING)
				timeout = min_d(timeout, jobs[i].next_heartbeat - now);
			/* work to do now; without a database, not before the reconnect */
			if ((jobs[i].phase == JOB_ENDED || jobs[i].phase == JOB_CLAIMED) && db_connected())
				timeout = 0;
		}
		if (timeout < 0)
			timeout = 0;
		/*
		 * A notification that came in with the answer to one of the
		 * statements above is in libpq's queue, not on the socket: take it
		 * now, or it would wait for the next heartbeat or poll.
		 */
		if (db_connected() && take_notifies())
		{
			want_claim = true;
			timeout = 0;
		}
		if (db_connected())
		{
			if (agent_wait_since(db_socket(), POLLIN, timeout, handled_stops) && !db_consume())
				continue;		/* lost: handled at the top */
		}
		else
			agent_wait_since(-1, 0, timeout, handled_stops);
	}

out:
	db_close();
	if (exit_code == EXIT_OK && opt.once && tasks_failed > 0)
		exit_code = EXIT_TASKFAIL;
	log_info("stopped after %d task%s (%d not completed)", tasks_done, tasks_done == 1 ? "" : "s",
			 tasks_failed);
	return exit_code;
}
