/*
 * db.c: the runner's one libpq connection, used in non-blocking mode.
 *
 * Connecting (PQconnectStartParams/PQconnectPoll) and every statement
 * (PQsendQueryParams, PQflush, PQconsumeInput) wait through agent_wait(),
 * with a bound, so that signals, heartbeats and the commands are served
 * meanwhile.  A statement that fails because the connection broke (or that
 * gets no answer within QUERY_TIMEOUT) closes the connection and returns
 * Q_CONNERR; the main loop then reconnects with backoff.
 */
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent.h"

#define QUERY_TIMEOUT 60.0		/* seconds for any one statement */

static PGconn *conn;
static char *last_error;		/* why the connection was last lost */

const char *
db_last_error(void)
{
	return last_error ? last_error : "the connection was closed";
}

bool
db_connected(void)
{
	return conn != NULL && PQstatus(conn) == CONNECTION_OK;
}

int
db_socket(void)
{
	return conn ? PQsocket(conn) : -1;
}

const char *
db_dbname(void)
{
	return conn ? PQdb(conn) : "";
}

void
db_close(void)
{
	if (conn)
		PQfinish(conn);
	conn = NULL;
}

/* libpq's message without its trailing newline, on one line. */
static char *
clean_message(const char *m)
{
	char	   *s = xstrdup(m && *m ? m : "unknown error");
	size_t		n = strlen(s);

	while (n > 0 && (s[n - 1] == '\n' || s[n - 1] == ' '))
		s[--n] = '\0';
	one_line(s);
	return s;
}

/*
 * Connect to dsn (a connection string or URI; empty: libpq's defaults and
 * PG* variables) within timeout seconds.  On failure *err has libpq's
 * message (to free).
 */
bool
db_connect(const char *dsn, double timeout, char **err)
{
	char	   *appname = xasprintf("agog-agent %s", log_agent);
	const char *keys[] = {
		"application_name", "client_encoding", "keepalives", "keepalives_idle",
		"keepalives_interval", "keepalives_count", "dbname", NULL
	};
	const char *vals[] = {appname, "UTF8", "1", "10", "5", "3", dsn, NULL};
	PostgresPollingStatusType st = PGRES_POLLING_WRITING;
	double		deadline = now_mono() + timeout;

	*err = NULL;
	db_close();
	conn = PQconnectStartParams(keys, vals, 1);
	free(appname);
	if (conn == NULL)
	{
		*err = xstrdup("out of memory");
		return false;
	}
	if (PQstatus(conn) == CONNECTION_BAD)
	{
		*err = clean_message(PQerrorMessage(conn));
		db_close();
		return false;
	}
	for (;;)
	{
		double		left;

		if (st == PGRES_POLLING_OK)
			break;
		if (st == PGRES_POLLING_FAILED)
		{
			*err = clean_message(PQerrorMessage(conn));
			db_close();
			return false;
		}
		left = deadline - now_mono();
		if (left <= 0)
		{
			*err = xasprintf("timeout: no answer from the server within %.0f s", timeout);
			db_close();
			return false;
		}
		if (agent_wait(PQsocket(conn), st == PGRES_POLLING_READING ? POLLIN : POLLOUT, left))
			st = PQconnectPoll(conn);
	}
	if (PQsetnonblocking(conn, 1) != 0)
	{
		*err = clean_message(PQerrorMessage(conn));
		db_close();
		return false;
	}
	return true;
}

void
q_clear(QRes *q)
{
	if (q->res)
		PQclear(q->res);
	free(q->message);
	memset(q, 0, sizeof(*q));
}

static bool
conn_lost(QRes *q, const char *why)
{
	q->status = Q_CONNERR;
	if (!q->message)
		q->message = clean_message(why);
	free(last_error);
	last_error = xstrdup(q->message);
	if (q->res)
		PQclear(q->res);
	q->res = NULL;
	db_close();
	return false;
}

/*
 * Run one statement with text parameters.  Returns true for Q_OK; else q
 * says whether it was an SQL error (the connection stays usable, outside
 * any failed transaction the caller must roll back) or the connection is
 * gone (closed here).
 */
bool
db_exec(const char *sql, int nparams, const char *const *params, QRes *q)
{
	double		deadline = now_mono() + QUERY_TIMEOUT;
	PGresult   *err = NULL;
	PGresult   *last = NULL;
	PGresult   *r;

	memset(q, 0, sizeof(*q));
	if (!db_connected())
		return conn_lost(q, "not connected to the database");
	if (!PQsendQueryParams(conn, sql, nparams, NULL, params, NULL, NULL, 0))
		return conn_lost(q, PQerrorMessage(conn));

	/* Send it all (a report may be megabytes). */
	for (;;)
	{
		int			f = PQflush(conn);

		if (f == 0)
			break;
		if (f < 0)
			return conn_lost(q, PQerrorMessage(conn));
		if (now_mono() >= deadline)
			return conn_lost(q, "timeout: the server took more than 60 s to take the statement");
		if (agent_wait(PQsocket(conn), POLLIN | POLLOUT, deadline - now_mono()) &&
			!PQconsumeInput(conn))
			return conn_lost(q, PQerrorMessage(conn));
	}

	/* Collect every result; keep the first error, else the last result. */
	for (;;)
	{
		while (PQisBusy(conn))
		{
			if (now_mono() >= deadline)
			{
				if (err)
					PQclear(err);
				if (last)
					PQclear(last);
				return conn_lost(q, "timeout: no answer from the server within 60 s");
			}
			if (agent_wait(PQsocket(conn), POLLIN, deadline - now_mono()) &&
				!PQconsumeInput(conn))
			{
				if (err)
					PQclear(err);
				if (last)
					PQclear(last);
				return conn_lost(q, PQerrorMessage(conn));
			}
		}
		r = PQgetResult(conn);
		if (r == NULL)
			break;
		if (PQresultStatus(r) == PGRES_FATAL_ERROR && err == NULL)
			err = r;
		else
		{
			if (last)
				PQclear(last);
			last = r;
		}
	}
	if (err)
	{
		const char *state = PQresultErrorField(err, PG_DIAG_SQLSTATE);
		const char *primary = PQresultErrorField(err, PG_DIAG_MESSAGE_PRIMARY);
		const char *detail = PQresultErrorField(err, PG_DIAG_MESSAGE_DETAIL);
		const char *hint = PQresultErrorField(err, PG_DIAG_MESSAGE_HINT);
		Buf			m = {0};

		snprintf(q->sqlstate, sizeof(q->sqlstate), "%s", state ? state : "");
		buf_printf(&m, "%s", primary ? primary : PQresultErrorMessage(err));
		if (detail)
			buf_printf(&m, " (%s)", detail);
		if (hint)
			buf_printf(&m, " Hint: %s", hint);
		q->message = clean_message(m.data);
		buf_free(&m);
		PQclear(err);
		if (last)
			PQclear(last);
		/*
		 * The connection broke, or the server is ending this session
		 * (admin_shutdown, crash_shutdown, cannot_connect_now).
		 */
		if (PQstatus(conn) != CONNECTION_OK || state == NULL ||
			strcmp(q->sqlstate, "57P01") == 0 || strcmp(q->sqlstate, "57P02") == 0 ||
			strcmp(q->sqlstate, "57P03") == 0)
			return conn_lost(q, q->message);
		q->status = Q_SQLERR;
		return false;
	}
	q->res = last;
	q->status = Q_OK;
	return true;
}

/* Read what the server sent (notifications); false when the connection broke. */
bool
db_consume(void)
{
	if (!db_connected())
		return false;
	if (!PQconsumeInput(conn))
	{
		free(last_error);
		last_error = clean_message(PQerrorMessage(conn));
		db_close();
		return false;
	}
	return true;
}

PGnotify *
db_notifies(void)
{
	return conn ? PQnotifies(conn) : NULL;
}
