/*-------------------------------------------------------------------------
 *
 * agog_stream.c
 *		Agent streams: provisioning by the worker, and agog_stream_status().
 *
 * agog_nats.agents is the desired state: one stream per agent,
 * agog_features_<task_type>, capturing agog.deliverables.<agent>.>.  The
 * worker creates or updates streams to match, and never deletes one; it
 * lowers a live stream's limits (which drops the reports beyond them) only
 * for an agent whose limits a user's UPDATE changed.
 *
 * Copyright (c) 2026, agog_nats developers
 *
 * src/agog_stream.c
 *
 *-------------------------------------------------------------------------
 */
#include "agog_nats.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

PG_FUNCTION_INFO_V1(agog_stream_status);

/*
 * Stream names the drain looks up before sending what it claimed (worker
 * only, in a context of their own):
 *	in_place: found or put in place by the last reconcile, rebuilt by each;
 *	absent: asked for by a claim and not put in place by the reconcile that
 *	followed, as of an agents generation, forgotten when it moves.
 */
static MemoryContext names_cxt = NULL;
static List *in_place = NIL;
static List *absent = NIL;
static uint64 absent_generation = 0;

/*
 * Streams whose larger live limits the last reconcile kept, with the limits
 * (warn_kept's keys): the warning is given once, not at every reconcile.
 */
static List *kept_before = NIL;
static List *kept_now = NIL;

/*
 * Streams JetStream refused to create (an API error, such as too little
 * storage) at their last attempt: a "no responders" on one of them is a
 * stream that does not exist.  On any other stream, with replicated
 * streams, it may be a stream without a leader (a reconcile in an outage
 * gets no answer, not a refusal).  Never freed: as many as the agents.
 */
static List *refused = NIL;

/* Streams of the workflow engine, kept like the agent streams. */
static const struct
{
	const char *name;
	const char *subject;
	const char *description;
}			system_streams[] =
{
	{"agog_tasks", AGOG_TASKS_SUBJECT_PREFIX ".>", "agog_nats: tiny task notices to agents"},
	{"agog_notices", "agog.notices.>", "agog_nats: completion notices from agents"},
};

/*
 * name_add
 *		names with a copy of name appended, in names_cxt.  Runs in the worker.
 */
static List *
name_add(List *names, const char *name)
{
	MemoryContext old;

	if (names_cxt == NULL)
		names_cxt = AllocSetContextCreate(TopMemoryContext, "agog_nats stream names",
										  ALLOCSET_SMALL_SIZES);
	old = MemoryContextSwitchTo(names_cxt);
	names = lappend(names, pstrdup(name));
	MemoryContextSwitchTo(old);
	return names;
}

/* names without name (a list made by name_add). */
static List *
name_drop(List *names, const char *name)
{
	ListCell   *lc;

	foreach(lc, names)
	{
		if (strcmp((const char *) lfirst(lc), name) == 0)
		{
			pfree(lfirst(lc));
			names = foreach_delete_current(names, lc);
		}
	}
	return names;
}

/* Whether name is one of names (a list made by name_add). */
static bool
name_listed(const List *names, const char *name)
{
	ListCell   *lc;

	foreach(lc, names)
	{
		if (strcmp((const char *) lfirst(lc), name) == 0)
			return true;
	}
	return false;
}

/*
 * limit_text
 *		A stream limit for a message: the number with its unit, or "no
 *		limit" for JetStream's 0 or -1.  palloc'd.  Runs in the worker.
 */
static char *
limit_text(int64 value, const char *unit)
{
	if (value <= 0)
		return pstrdup("no limit");
	return psprintf(INT64_FORMAT " %s", value, unit);
}

/*
 * warn_kept
 *		Say once that the worker kept a live stream's larger limits: a
 *		WARNING when the stream, the table's limits or the live ones are new
 *		since the last reconcile, nothing when they are the same.  kept_now
 *		collects this reconcile's keys.  stamp_column says whether the agents
 *		table has limits_changed_at yet (not between a new library and ALTER
 *		EXTENSION UPDATE).  Runs in the worker.
 */
static void
warn_kept(const AgogStreamSpec *spec, const char *agent, bool stamp_column,
		  const AgogEnsureResult *r)
{
	char		key[NAMEDATALEN * 2 + 128];

	snprintf(key, sizeof(key), "%s " INT64_FORMAT " " INT64_FORMAT " " INT64_FORMAT
			 " " INT64_FORMAT " " INT64_FORMAT " " INT64_FORMAT, spec->name,
			 spec->max_msgs, spec->max_bytes, spec->max_age_ms,
			 r->live_max_msgs, r->live_max_bytes, r->live_max_age_ms);
	kept_now = name_add(kept_now, key);
	if (name_listed(kept_before, key))
		return;
	ereport(WARNING,
			(errcode(ERRCODE_WARNING),
			 errmsg("agog_nats kept the larger limits of JetStream stream \"%s\"", spec->name),
			 errdetail("The stream keeps %s, %s and %s; agog_nats.agents asks for %s, %s and %s.  "
					   "Lowering a limit drops the reports beyond it, and the worker does so only for limits an UPDATE of agog_nats.agents changed, never for inserted ones (CREATE EXTENSION's or a restore's).",
					   limit_text(r->live_max_msgs, "messages"),
					   limit_text(r->live_max_bytes, "bytes"),
					   limit_text(r->live_max_age_ms / 1000, "s"),
					   limit_text(spec->max_msgs, "messages"),
					   limit_text(spec->max_bytes, "bytes"),
					   limit_text(spec->max_age_ms / 1000, "s")),
			 agent == NULL ? 0 :
			 stamp_column ?
			 errhint("To lower the stream's limits to the table's, run UPDATE agog_nats.agents SET limits_changed_at = now() WHERE agent = '%s'.",
					 agent) :
			 errhint("To lower the stream's limits to the table's, run ALTER EXTENSION agog_nats UPDATE, then UPDATE agog_nats.agents SET limits_changed_at = now() WHERE agent = '%s'.",
					 agent)));
}

/*
 * keep_warned
 *		A stream that could not be put in place keeps its kept-limits keys,
 *		so that its warning is not given again once it can.  Runs in the
 *		worker.
 */
static void
keep_warned(const char *stream)
{
	size_t		len = strlen(stream);
	ListCell   *lc;

	foreach(lc, kept_before)
	{
		const char *key = (const char *) lfirst(lc);

		if (strncmp(key, stream, len) == 0 && key[len] == ' ')
			kept_now = name_add(kept_now, key);
	}
}

/*
 * ensure_one
 *		Put one stream in place and count the outcome; the first failure goes
 *		to *first_err.  agent is NULL for the workflow streams.  Runs in the
 *		worker, outside any transaction.
 */
static bool
ensure_one(AgogConn *conn, const AgogStreamSpec *spec, const char *agent,
		   bool stamp_column, int *failed, AgogError *first_err)
{
	AgogEnsureResult r;
	AgogError	err;

	if (!agog_conn_ensure_stream(conn, spec, &r, &err))
	{
		if (*failed == 0)
		{
			*first_err = err;
			snprintf(first_err->text, sizeof(first_err->text),
					 "stream \"%s\": %s", spec->name, err.text);
		}
		(*failed)++;
		keep_warned(spec->name);
		if (r.create_refused && !name_listed(refused, spec->name))
			refused = name_add(refused, spec->name);
		return false;
	}
	in_place = name_add(in_place, spec->name);
	refused = name_drop(refused, spec->name);
	if (r.created && agent)
		ereport(LOG,
				(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
				 errmsg("agog_nats created JetStream stream \"%s\" for agent \"%s\"",
						spec->name, agent)));
	else if (r.created)
		ereport(LOG,
				(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
				 errmsg("agog_nats created JetStream stream \"%s\"", spec->name)));
	else if (r.updated && r.kept)
		ereport(LOG,
				(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
				 errmsg("agog_nats updated JetStream stream \"%s\" to match agog_nats.agents but for its larger limits",
						spec->name)));
	else if (r.updated)
		ereport(LOG,
				(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
				 errmsg("agog_nats updated JetStream stream \"%s\" to match agog_nats.agents",
						spec->name)));
	if (r.kept)
		warn_kept(spec, agent, stamp_column, &r);
	return true;
}

/*
 * clear_stamps
 *		The limits of these agents are now the live ones: clear their
 *		limits_changed_at (unless an UPDATE since stamped it again), so that
 *		the stamp lowers a stream once.  agents and stamps are parallel
 *		lists.  A row another session has locked is skipped (tried again at
 *		a later reconcile), and a failure (a trigger of the user's, the
 *		extension dropped meanwhile) is a WARNING: neither may stop the
 *		worker.  The change is not noted, so it wakes nobody; the worker's
 *		own agents cache is read again.  Runs in the worker, outside any
 *		transaction.
 */
static void
clear_stamps(List *agents, List *stamps, MemoryContext caller)
{
	ResourceOwner owner;

	if (agents == NIL)
		return;
	agog_xact_begin(caller);
	owner = CurrentResourceOwner;
	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(caller);
	PG_TRY();
	{
		ListCell   *la;
		ListCell   *ls;

		forboth(la, agents, ls, stamps)
		{
			Oid			types[2] = {TEXTOID, TEXTOID};
			Datum		values[2];
			int			ret;

			values[0] = CStringGetTextDatum((const char *) lfirst(la));
			values[1] = CStringGetTextDatum((const char *) lfirst(ls));
			ret = SPI_execute_with_args("UPDATE agog_nats.agents SET limits_changed_at = NULL "
										" WHERE ctid = ANY (ARRAY("
										"   SELECT a.ctid FROM agog_nats.agents a "
										"    WHERE a.agent = $1 "
										"      AND to_jsonb(a) ->> 'limits_changed_at' = $2 "
										"      FOR NO KEY UPDATE SKIP LOCKED))",
										2, types, values, NULL, false, 0);
			if (ret != SPI_OK_UPDATE)
				elog(ERROR, "clearing limits_changed_at failed: %s",
					 SPI_result_code_string(ret));
		}
		ReleaseCurrentSubTransaction();
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(caller);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		ereport(WARNING,
				(errcode(edata->sqlerrcode),
				 errmsg("agog_nats could not clear limits_changed_at of applied agents"),
				 errdetail_internal("The error was: %s.", edata->message),
				 errhint("The worker tries again at its next check of the streams.")));
		FreeErrorData(edata);
	}
	PG_END_TRY();
	CurrentResourceOwner = owner;
	agog_agents_change_unnoted();
	agog_xact_commit(caller);
	agog_agents_invalidate();
}

/*
 * agog_reconcile_streams
 *		Make JetStream match agog_nats.agents.  Runs in the worker, outside
 *		any transaction: it reads the agents in a short transaction of its
 *		own, then talks to NATS with no snapshot held.  Returns true when
 *		every stream is in place; *first_err describes the first failure.
 */
bool
agog_reconcile_streams(AgogConn *conn, int *ok, int *failed,
					   AgogError *first_err)
{
	MemoryContext caller = CurrentMemoryContext;
	const AgogAgent *rows;
	int			count;
	List	   *applied_agents = NIL;
	List	   *applied_stamps = NIL;

	/* the rows stay in the agents cache after the transaction */
	agog_xact_begin(caller);
	rows = agog_agents(&count);
	agog_xact_commit(caller);

	list_free_deep(in_place);
	in_place = NIL;

	*ok = *failed = 0;
	memset(first_err, 0, sizeof(*first_err));
	for (int i = 0; i < count; i++)
	{
		AgogStreamSpec spec;

		spec.name = rows[i].stream;
		spec.subject = agog_stream_subjects(rows[i].agent);
		spec.description = rows[i].description;
		spec.max_msgs = rows[i].max_msgs;
		spec.max_bytes = rows[i].max_bytes;
		spec.max_age_ms = rows[i].max_age_ms;
		spec.max_msg_size = rows[i].max_msg_size;
		spec.replicas = agog_stream_replicas;
		spec.duplicate_window_ms = agog_duplicate_window_ms;
		spec.may_lower = rows[i].limits_stamp != NULL;
		if (ensure_one(conn, &spec, rows[i].agent, rows[i].stamp_column,
					   failed, first_err))
		{
			(*ok)++;
			if (spec.may_lower)
			{
				applied_agents = lappend(applied_agents, pstrdup(rows[i].agent));
				applied_stamps = lappend(applied_stamps, pstrdup(rows[i].limits_stamp));
			}
		}
	}

	/*
	 * The workflow streams: tiny task notices (agog.tasks.<agent>.<feature>)
	 * and completion notices from agents that speak only NATS
	 * (agog.notices.<agent>.<feature>).  They count as failed when they
	 * fail, not in *ok, which counts agent streams.
	 */
	for (int i = 0; i < lengthof(system_streams); i++)
	{
		AgogStreamSpec spec;

		spec.name = system_streams[i].name;
		spec.subject = system_streams[i].subject;
		spec.description = system_streams[i].description;
		spec.max_msgs = 10000;
		spec.max_bytes = INT64CONST(1073741824);
		spec.max_age_ms = INT64CONST(7) * 24 * 3600 * 1000;
		spec.max_msg_size = -1;
		spec.replicas = agog_stream_replicas;
		spec.duplicate_window_ms = agog_duplicate_window_ms;
		spec.may_lower = false;
		(void) ensure_one(conn, &spec, NULL, true, failed, first_err);
	}

	/* a kept stream not kept this time is warned of again if it comes back */
	list_free_deep(kept_before);
	kept_before = kept_now;
	kept_now = NIL;

	clear_stamps(applied_agents, applied_stamps, caller);
	list_free_deep(applied_agents);
	list_free_deep(applied_stamps);
	return *failed == 0;
}

/*
 * agog_stream_in_place
 *		Whether the worker's last reconcile found or put the stream in place.
 *		Runs in the worker; false before its first reconcile.
 */
bool
agog_stream_in_place(const char *name)
{
	return name_listed(in_place, name);
}

/*
 * agog_stream_create_refused
 *		Whether JetStream refused to create the stream at the last attempt.
 *		Runs in the worker.
 */
bool
agog_stream_create_refused(const char *name)
{
	return name_listed(refused, name);
}

/*
 * agog_stream_absent
 *		Whether a claim asked for the stream, as of this agents generation,
 *		and the reconcile that followed did not put it in place.  Runs in the
 *		worker.
 */
bool
agog_stream_absent(const char *name, uint64 generation)
{
	if (generation != absent_generation)
	{
		list_free_deep(absent);
		absent = NIL;
		absent_generation = generation;
	}
	return name_listed(absent, name);
}

/*
 * agog_stream_note_absent
 *		Remember, for this agents generation, that a reconcile asked for by a
 *		claim did not put the stream in place.  Runs in the worker.
 */
void
agog_stream_note_absent(const char *name, uint64 generation)
{
	if (!agog_stream_absent(name, generation))
		absent = name_add(absent, name);
}

/* Share of a limit in use, in percent; NULL when there is no limit. */
static void
put_pct(Datum *values, bool *nulls, int col, double used, int64 limit)
{
	if (limit <= 0)
		nulls[col] = true;
	else
		values[col] = Float8GetDatum(100.0 * used / (double) limit);
}

/*
 * ms_interval
 *		An interval Datum for a duration in milliseconds.
 */
static Datum
ms_interval(int64 ms)
{
	Interval   *iv = palloc0(sizeof(Interval));

	/* whole days as days, so 7 days reads as the agents table has it */
	iv->day = (int32) (ms / (SECS_PER_DAY * 1000));
	iv->time = (ms % (SECS_PER_DAY * 1000)) * 1000;
	return IntervalPGetDatum(iv);
}

/*
 * Reading a $JS.API.STREAM.LIST reply.
 *
 * The reply is a few KB of JSON of which a dozen scalars per stream are
 * shown.  jsonb_in (which de-escapes and sorts every key of every object)
 * took a third of agog_stream_status(), nats.c's js_Streams more than the
 * request itself; this scanner checks the JSON syntax and keeps only the
 * scalars at the paths below.  It runs in a backend, after the reply was
 * copied out of nats.c; a malformed reply makes it return false.
 */
#define LIST_MAX_DEPTH	32
#define LIST_TEXT_LEN	256

/* Where in the reply a value sits: only these sections hold kept scalars. */
typedef enum ListSection
{
	SEC_NONE,					/* anything not shown */
	SEC_TOP,					/* the reply object */
	SEC_ERROR,					/* .error */
	SEC_STREAMS,				/* .streams (the array) */
	SEC_STREAM,					/* .streams[] */
	SEC_CONFIG,					/* .streams[].config */
	SEC_STATE					/* .streams[].state */
} ListSection;

typedef struct ListScan
{
	const char *p;
	const char *end;
	AgogStreamState *states;
	int			n;
	int			allocated;
	int64		total;
	bool		has_error;
	int64		error_code;
	char		error_text[LIST_TEXT_LEN];
} ListScan;

/*
 * list_skip_ws
 *		Skip JSON white space in the stream list's reply.
 */
static void
list_skip_ws(ListScan *s)
{
	while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
		s->p++;
}

/* A JSON string at s->p: its raw bytes between the quotes, escapes kept. */
static bool
list_string(ListScan *s, const char **start, int *len)
{
	if (s->p >= s->end || *s->p != '"')
		return false;
	*start = ++s->p;
	for (;;)
	{
		const char *q = memchr(s->p, '"', s->end - s->p);
		const char *b;

		if (q == NULL)
			return false;
		/* escaped when an odd number of backslashes precede it */
		for (b = q; b > *start && b[-1] == '\\'; b--)
			;
		s->p = q + 1;
		if (((q - b) & 1) == 0)
		{
			*len = (int) (q - *start);
			return true;
		}
	}
}

/* Copy len bytes that are not NUL-terminated, cut to fit. */
static void
copy_text(char *dst, int size, const char *v, int len)
{
	len = Min(len, size - 1);
	memcpy(dst, v, len);
	dst[len] = '\0';
}

/*
 * agog_parse_nats_time
 *		A time as JetStream writes it, RFC 3339 in UTC with up to nine
 *		fraction digits ("2026-11-28T01:23:45.123456789Z"), len bytes at v.
 *		Digits past the microsecond are cut off, as nats.c's own parsing of
 *		message times does, so a time reads the same whichever path read it.
 *		Returns false for any other form.  Plain C: also runs inside a
 *		signal-blocked section of agog_conn.c.
 */
bool
agog_parse_nats_time(const char *v, int len, TimestampTz *out)
{
	static const int mdays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
	int			f[6];
	static const int pos[] = {0, 5, 8, 11, 14, 17};
	static const int width[] = {4, 2, 2, 2, 2, 2};
	int64		y;
	int64		era;
	int64		yoe;
	int64		doy;
	int64		days;
	int64		usec = 0;
	int			i;

	if (len < 20 || v[4] != '-' || v[7] != '-' || v[10] != 'T' || v[13] != ':' ||
		v[16] != ':' || v[len - 1] != 'Z')
		return false;
	for (i = 0; i < 6; i++)
	{
		f[i] = 0;
		for (int k = pos[i]; k < pos[i] + width[i]; k++)
		{
			if (v[k] < '0' || v[k] > '9')
				return false;
			f[i] = f[i] * 10 + (v[k] - '0');
		}
	}
	if (len > 20)
	{
		int			digits = len - 21;

		if (v[19] != '.' || digits < 1 || digits > 9)
			return false;
		for (i = 0; i < digits; i++)
		{
			char		c = v[20 + i];

			if (c < '0' || c > '9')
				return false;
			if (i < 6)
				usec = usec * 10 + (c - '0');
		}
		for (i = digits; i < 6; i++)
			usec *= 10;
	}
	if (f[0] < 1 || f[1] < 1 || f[1] > 12 || f[2] < 1 || f[3] > 23 || f[4] > 59 ||
		f[5] > 59)
		return false;
	if (f[2] > mdays[f[1] - 1] +
		(f[1] == 2 && f[0] % 4 == 0 && (f[0] % 100 != 0 || f[0] % 400 == 0)))
		return false;

	/* days since 1970-01-01 in the proleptic Gregorian calendar */
	y = f[0] - (f[1] <= 2);
	era = y / 400;				/* years are positive here */
	yoe = y - era * 400;
	doy = (153 * (f[1] + (f[1] > 2 ? -3 : 9)) + 2) / 5 + f[2] - 1;
	days = era * 146097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719468;

	*out = ((days * 24 + f[3]) * 60 + f[4]) * 60 * USECS_PER_SEC + f[5] * USECS_PER_SEC +
		usec - (int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * USECS_PER_DAY;
	return true;
}

/*
 * agog_nats_time
 *		A time JetStream wrote, len bytes at v: agog_parse_nats_time, and
 *		timestamptz_in for any other form (which throws if it is no time).
 *		Runs in a backend, outside signal-blocked sections.
 */
TimestampTz
agog_nats_time(const char *v, int len)
{
	char		text[48];
	TimestampTz ts;

	if (agog_parse_nats_time(v, len, &ts))
		return ts;
	copy_text(text, sizeof(text), v, len);
	return DatumGetTimestampTz(DirectFunctionCall3(timestamptz_in, CStringGetDatum(text),
												   ObjectIdGetDatum(InvalidOid),
												   Int32GetDatum(-1)));
}

#define KEY_IS(k, klen, lit) ((klen) == sizeof(lit) - 1 && memcmp((k), (lit), (klen)) == 0)

/* The section of the value of member key in an object of section sec. */
static ListSection
list_child(ListSection sec, const char *key, int klen)
{
	if (sec == SEC_TOP && KEY_IS(key, klen, "streams"))
		return SEC_STREAMS;
	if (sec == SEC_TOP && KEY_IS(key, klen, "error"))
		return SEC_ERROR;
	if (sec == SEC_STREAM && KEY_IS(key, klen, "config"))
		return SEC_CONFIG;
	if (sec == SEC_STREAM && KEY_IS(key, klen, "state"))
		return SEC_STATE;
	return SEC_NONE;
}

/* Keep a scalar, member key of an object of section sec, if it is shown. */
static void
list_keep(ListScan *s, ListSection sec, const char *key, int klen,
		  const char *v, int len, bool is_string)
{
	AgogStreamState *st = s->n > 0 ? &s->states[s->n - 1] : NULL;
	char		num[32];
	int64		x = 0;

	if (sec != SEC_TOP && sec != SEC_ERROR && sec != SEC_CONFIG && sec != SEC_STATE)
		return;
	if (!is_string)
	{
		if (len <= 0 || len >= (int) sizeof(num))
			return;
		memcpy(num, v, len);
		num[len] = '\0';
		x = strtoll(num, NULL, 10);
	}
	switch (sec)
	{
		case SEC_TOP:
			if (KEY_IS(key, klen, "total"))
				s->total = x;
			break;
		case SEC_ERROR:
			if (KEY_IS(key, klen, "err_code"))
				s->error_code = x;
			else if (KEY_IS(key, klen, "description") && is_string)
				copy_text(s->error_text, LIST_TEXT_LEN, v, len);
			break;
		case SEC_CONFIG:
			if (KEY_IS(key, klen, "name") && is_string)
				st->name = pnstrdup(v, len);
			else if (KEY_IS(key, klen, "max_msgs"))
				st->max_msgs = x;
			else if (KEY_IS(key, klen, "max_bytes"))
				st->max_bytes = x;
			else if (KEY_IS(key, klen, "max_age"))
				st->max_age_ms = x / 1000000;
			else if (KEY_IS(key, klen, "num_replicas"))
				st->replicas = (int) x;
			break;
		case SEC_STATE:
			if (KEY_IS(key, klen, "messages"))
				st->msgs = (uint64) x;
			else if (KEY_IS(key, klen, "bytes"))
				st->bytes = (uint64) x;
			else if (KEY_IS(key, klen, "first_seq"))
				st->first_seq = (uint64) x;
			else if (KEY_IS(key, klen, "last_seq"))
				st->last_seq = (uint64) x;
			else if (KEY_IS(key, klen, "consumer_count"))
				st->consumers = x;
			else if (KEY_IS(key, klen, "first_ts") && is_string)
				st->first_time = agog_nats_time(v, len);
			else if (KEY_IS(key, klen, "last_ts") && is_string)
				st->last_time = agog_nats_time(v, len);
			break;
		default:
			break;
	}
}

/*
 * list_punct
 *		Take the character that follows the opening of an object or array,
 *		or one of its members or elements: 0 at the closing character, 1 at
 *		a comma (another follows), -1 on anything else.  With first, a comma
 *		is not expected yet: 1 means a member or element begins.
 */
static int
list_punct(ListScan *s, char close, bool first)
{
	list_skip_ws(s);
	if (s->p < s->end && *s->p == close)
	{
		s->p++;
		return 0;
	}
	if (first)
		return s->p < s->end ? 1 : -1;
	if (s->p < s->end && *s->p == ',')
	{
		s->p++;
		return 1;
	}
	return -1;
}

/*
 * list_value
 *		Scan one JSON value of section sec; key/klen name it when it is an
 *		object's member (NULL otherwise).
 */
static bool
list_value(ListScan *s, int depth, ListSection sec, ListSection parent,
		   const char *key, int klen)
{
	int			more;

	if (depth > LIST_MAX_DEPTH)
		return false;
	list_skip_ws(s);
	if (s->p >= s->end)
		return false;
	if (*s->p == '{')
	{
		s->p++;
		if (sec == SEC_ERROR)
			s->has_error = true;
		for (more = list_punct(s, '}', true); more == 1; more = list_punct(s, '}', false))
		{
			const char *k;
			int			kl;

			list_skip_ws(s);
			if (!list_string(s, &k, &kl))
				return false;
			list_skip_ws(s);
			if (s->p >= s->end || *s->p++ != ':')
				return false;
			if (!list_value(s, depth + 1, list_child(sec, k, kl), sec, k, kl))
				return false;
		}
		return more == 0;
	}
	if (*s->p == '[')
	{
		s->p++;
		for (more = list_punct(s, ']', true); more == 1; more = list_punct(s, ']', false))
		{
			if (sec == SEC_STREAMS)
			{
				if (s->n == s->allocated)
				{
					s->allocated = Max(8, s->allocated * 2);
					s->states = repalloc(s->states, sizeof(AgogStreamState) * s->allocated);
				}
				memset(&s->states[s->n], 0, sizeof(AgogStreamState));
				s->states[s->n].name = "";
				s->n++;
			}
			if (!list_value(s, depth + 1, sec == SEC_STREAMS ? SEC_STREAM : SEC_NONE,
							sec, NULL, 0))
				return false;
		}
		return more == 0;
	}
	if (*s->p == '"')
	{
		const char *v;
		int			len;

		if (!list_string(s, &v, &len))
			return false;
		if (key != NULL)
			list_keep(s, parent, key, klen, v, len, true);
		return true;
	}
	/* number, true, false or null */
	{
		const char *v = s->p;

		while (s->p < s->end && (isalnum((unsigned char) *s->p) || *s->p == '-' ||
								 *s->p == '+' || *s->p == '.'))
			s->p++;
		if (s->p == v)
			return false;
		if (key != NULL)
			list_keep(s, parent, key, klen, v, (int) (s->p - v), false);
		return true;
	}
}


/*
 * stream_states
 *		The live state of the streams that capture agent reports (their
 *		subjects lie under agog.deliverables.>), in one $JS.API.STREAM.LIST
 *		request per page of 256 streams.  Runs in a backend.
 */
static AgogStreamState *
stream_states(int *count)
{
	ListScan	s;

	memset(&s, 0, sizeof(s));
	s.allocated = 8;
	s.states = palloc(sizeof(AgogStreamState) * s.allocated);
	for (;;)
	{
		char		payload[96];
		char	   *reply;
		AgogError	err;
		int			before = s.n;

		snprintf(payload, sizeof(payload),
				 "{\"offset\":%d,\"subject\":\"" AGOG_SUBJECT_PREFIX ".>\"}", s.n);
		reply = agog_conn_api_request(agog_backend_conn(), "STREAM.LIST", payload, &err);
		if (reply == NULL)
			agog_raise(&err, gettext_noop("could not read the state of the agent streams"));
		s.p = reply;
		s.end = reply + strlen(reply);
		s.has_error = false;
		if (!list_value(&s, 0, SEC_TOP, SEC_NONE, NULL, 0) || (list_skip_ws(&s), s.p != s.end))
			ereport(ERROR,
					(errcode(ERRCODE_PROTOCOL_VIOLATION),
					 errmsg("could not read the state of the agent streams"),
					 errdetail("The reply of the JetStream API to a stream list request was not valid JSON.")));
		if (s.has_error)
			ereport(ERROR,
					(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
					 errmsg("could not read the state of the agent streams"),
					 errdetail_internal("JetStream refused the request with error code %d: %s.",
										(int) s.error_code,
										s.error_text[0] ? s.error_text : "no description")));
		pfree(reply);
		if (s.n == before || s.n >= s.total)
			break;
	}
	for (int i = 0; i < s.n; i++)
	{
		/* an empty stream has no times (JetStream says year 1) */
		if (s.states[i].msgs == 0)
			s.states[i].first_time = s.states[i].last_time = 0;
	}
	*count = s.n;
	return s.states;
}

/*
 * agog_stream_status
 *		One row per agent stream: the seed's fields, times, limits, the share
 *		of each limit used and a health word.  A stream missing in JetStream
 *		shows as 'missing'.  One listing request to NATS for all streams.
 *		Runs in a backend, in the caller's transaction.
 */
Datum
agog_stream_status(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	const AgogAgent *rows;
	int			nrows;
	AgogStreamState *states;
	int			nstates;
	TimestampTz now = GetCurrentTimestamp();

	InitMaterializedSRF(fcinfo, MAT_SRF_USE_EXPECTED_DESC);
	rows = agog_agents(&nrows);
	states = stream_states(&nstates);

	for (int i = 0; i < nrows; i++)
	{
		Datum		values[18];
		bool		nulls[18];
		AgogStreamState *st = NULL;
		const char *health;

		memset(nulls, 0, sizeof(nulls));
		for (int j = 0; j < nstates; j++)
			if (strcmp(states[j].name, rows[i].stream) == 0)
				st = &states[j];

		values[0] = CStringGetTextDatum(rows[i].agent);
		values[1] = CStringGetTextDatum(rows[i].stream);
		values[2] = CStringGetTextDatum(agog_stream_subjects(rows[i].agent));
		if (st == NULL)
		{
			for (int c = 3; c <= 16; c++)
				nulls[c] = true;
			values[11] = Int64GetDatum(rows[i].max_msgs);
			values[12] = Int64GetDatum(rows[i].max_bytes);
			values[13] = ms_interval(rows[i].max_age_ms);
			nulls[11] = nulls[12] = nulls[13] = false;
			health = "missing";
		}
		else
		{
			int64		age_ms = 0;
			bool		drifted;
			bool		near;

			values[3] = Int64GetDatum((int64) st->msgs);
			values[4] = Int64GetDatum((int64) st->bytes);
			values[5] = Int64GetDatum((int64) st->first_seq);
			values[6] = Int64GetDatum((int64) st->last_seq);
			values[7] = Int64GetDatum(st->consumers);
			if (st->first_time != 0)
			{
				values[8] = TimestampTzGetDatum(st->first_time);
				age_ms = Max(0, (now - st->first_time) / 1000);
				values[10] = ms_interval(age_ms);
			}
			else
				nulls[8] = nulls[10] = true;
			if (st->last_time != 0)
				values[9] = TimestampTzGetDatum(st->last_time);
			else
				nulls[9] = true;
			values[11] = Int64GetDatum(st->max_msgs);
			values[12] = Int64GetDatum(st->max_bytes);
			values[13] = ms_interval(st->max_age_ms);
			put_pct(values, nulls, 14, (double) st->msgs, st->max_msgs);
			put_pct(values, nulls, 15, (double) st->bytes, st->max_bytes);
			put_pct(values, nulls, 16, (double) age_ms, st->max_age_ms);

			drifted = st->max_msgs != rows[i].max_msgs ||
				st->max_bytes != rows[i].max_bytes ||
				st->max_age_ms != rows[i].max_age_ms;
			near = (st->max_msgs > 0 && st->msgs * 10 >= (uint64) st->max_msgs * 8) ||
				(st->max_bytes > 0 && st->bytes * 10 >= (uint64) st->max_bytes * 8) ||
				(st->max_age_ms > 0 && age_ms * 10 >= st->max_age_ms * 8);
			/* near a limit first: a stream kept drifted must not hide it */
			health = near ? "near_limit" : drifted ? "drifted" : "ok";
		}
		values[17] = CStringGetTextDatum(health);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
