/*
 * agent.h: agog-agent, the agent runner of agog_nats.
 *
 * A command-line program on libpq (it talks to PostgreSQL only) that turns
 * any command into one of the workflow's agents: it waits for the tasks of
 * one agent (LISTEN agog_task_<agent>, and a slow poll), claims them, puts
 * the reports the task notice names into files, runs the command with the
 * notice on stdin, and publishes the command's stdout as the report and
 * completes the task in one transaction.  See docs/agog-agent.md.
 *
 * Single-threaded and event-driven: every wait (the database socket, the
 * commands' stderr pipes, signals through a self-pipe) goes through
 * agent_wait() with a timeout, so signals, heartbeats, deadlines and the
 * commands are served while a query runs or the connection is re-made.
 *
 * Files: main.c (options, signals, the loop), db.c (libpq with non-blocking
 * waits), task.c (a task's life: claim, inputs, command, completion),
 * util.c (logging, time, buffers, files).
 */
#ifndef AGOG_AGENT_H
#define AGOG_AGENT_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include <libpq-fe.h>

#define AGENT_VERSION "0.3.0"

/* Exit statuses. */
#define EXIT_OK			0
#define EXIT_RUNTIME	1		/* could not connect at start, lost privileges, ... */
#define EXIT_USAGE		2		/* bad option, missing command, unknown agent, ... */
#define EXIT_TASKFAIL	3		/* --once: a task did not complete */

#define STDERR_TAIL		2048	/* bytes of a command's stderr kept for its notice */
#define MAX_REPORT		(64L * 1024 * 1024)	/* largest stdout read as a report */

/* ---- util.c ------------------------------------------------------------ */

typedef struct Buf
{
	char	   *data;
	size_t		len;
	size_t		cap;
} Buf;

extern int	verbosity;			/* 0 quiet, 1 normal, 2 verbose */
extern const char *log_agent;	/* the agent name, in every line */

void		buf_append(Buf *b, const char *data, size_t len);
void		buf_printf(Buf *b, const char *fmt,...) __attribute__((format(printf, 2, 3)));
void		buf_free(Buf *b);

void		log_line(int level, const char *fmt,...) __attribute__((format(printf, 2, 3)));
void		log_warn(const char *fmt,...) __attribute__((format(printf, 1, 2)));
void		log_error(const char *fmt,...) __attribute__((format(printf, 1, 2)));
#define log_info(...)	log_line(1, __VA_ARGS__)
#define log_debug(...)	log_line(2, __VA_ARGS__)

double		now_mono(void);		/* seconds, CLOCK_MONOTONIC */
char	   *xstrdup(const char *s);
void	   *xmalloc(size_t n);
char	   *xasprintf(const char *fmt,...) __attribute__((format(printf, 1, 2)));

bool		valid_token(const char *s);
int			write_file(const char *path, const char *data, size_t len);
int			read_file(const char *path, size_t max, Buf *out, bool *too_big);
int			remove_tree(const char *path);
void		sanitize_text(char *s, size_t *len);
void		one_line(char *s);
char	   *resolve_command(const char *name);

/* ---- db.c -------------------------------------------------------------- */

typedef enum
{
	Q_OK,						/* the statement ran */
	Q_SQLERR,					/* it raised an error; the connection is fine */
	Q_CONNERR					/* the connection is gone (or timed out): closed */
} QStatus;

typedef struct QRes
{
	QStatus		status;
	PGresult   *res;			/* the last result (Q_OK) */
	char		sqlstate[6];
	char	   *message;		/* error message, with detail and hint */
} QRes;

bool		db_connected(void);
int			db_socket(void);
bool		db_connect(const char *dsn, double timeout, char **err);
void		db_close(void);
bool		db_exec(const char *sql, int nparams, const char *const *params, QRes *q);
void		q_clear(QRes *q);
bool		db_consume(void);	/* read what arrived; false when the connection broke */
PGnotify   *db_notifies(void);
const char *db_dbname(void);
const char *db_last_error(void);

/* ---- main.c ------------------------------------------------------------ */

typedef struct Options
{
	char	   *agent;
	char	   *dsn;
	int			jobs;
	int			lease;			/* seconds */
	double		poll;			/* seconds */
	double		grace;			/* seconds */
	bool		once;
	bool		keep_files;
	char	   *worker_id;
	char	   *tmpdir;
	char	  **command;		/* argv of COMMAND, NULL-terminated */
	char	   *command_path;	/* resolved argv[0] */
} Options;

extern Options opt;
extern char *ext_schema;		/* quoted schema of the extension */
extern volatile int stop_requests;

/*
 * Wait up to timeout seconds for the database socket (db_fd, -1 for none)
 * to be ready for db_events, serving signals and the commands meanwhile.
 * Returns true when the socket is ready, false on timeout or when an event
 * needs the main loop (a command ended, a stop was asked for).
 */
bool		agent_wait(int db_fd, short db_events, double timeout);

/* ---- task.c ------------------------------------------------------------ */

typedef enum
{
	JOB_FREE = 0,
	JOB_CLAIMED,				/* claimed; the command has not started */
	JOB_RUNNING,				/* the command runs */
	JOB_ENDED					/* it ended (or never started): to report */
} JobPhase;

typedef enum
{
	END_NONE = 0,
	END_OK,						/* exit status 0 */
	END_EXIT,					/* non-zero exit status */
	END_SIGNAL,					/* killed by a signal we did not send */
	END_DEADLINE,				/* we killed it at its deadline */
	END_INTERRUPTED,			/* we stopped (SIGTERM) and the grace ran out */
	END_LOST,					/* the lease was lost: not ours to report */
	END_SETUP					/* the runner could not start it */
} JobEnd;

typedef struct Job
{
	JobPhase	phase;
	long long	task_id;
	long long	workflow_id;
	int			attempt;
	char	   *stage;
	char	   *feature;
	char	   *task_type;
	char	   *notice;			/* the tiny notice, JSON */
	char	   *deadline_iso;
	char	   *report_subject;

	double		t_claimed;
	double		t_deadline;		/* the task's deadline (monotonic clock) */
	double		t_term_deadline;	/* when to end the command for its deadline */
	double		t_term_stop;	/* ... because we stop (grace over) */
	double		t_term_lost;	/* ... because its lease was lost */
	double		t_kill;			/* SIGKILL after SIGTERM */
	double		kill_wait;		/* from SIGTERM to SIGKILL */
	double		next_heartbeat;
	double		t_started;
	double		t_ended;

	char	   *dir;			/* private temporary directory */
	char	   *inputs;			/* space-separated input files */
	pid_t		pid;
	int			err_fd;			/* read end of the command's stderr */
	char		tail[STDERR_TAIL * 2];
	size_t		tail_len;
	char		line[512];		/* partial stderr line, for --verbose */
	size_t		line_len;
	bool		term_sent;
	bool		kill_sent;
	JobEnd		kill_reason;	/* why we sent SIGTERM */
	bool		reaped;
	int			wait_status;

	JobEnd		end;
	char	   *why;			/* the runner's reason for a failure */
	bool		commit_sent;	/* a completion may have committed */
	long		report_bytes;
	bool		outcome_ok;
} Job;

extern Job *jobs;

int			jobs_active(void);
int			jobs_free(void);
bool		claim_one(int *fatal);
void		start_job(Job *j);
void		heartbeat_job(Job *j);
void		finish_job(Job *j);
bool		serve_jobs(void);
double		next_kill_time(void);
extern bool want_claim;
void		kill_job_now(Job *j, JobEnd reason);
void		abandon_job(Job *j, const char *why);
extern int	tasks_failed;
extern int	tasks_done;

#endif							/* AGOG_AGENT_H */
