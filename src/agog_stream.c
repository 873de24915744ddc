/*-------------------------------------------------------------------------
 *
 * agog_stream.c
 *		Agent streams: provisioning by the worker, and agog_stream_status().
 *
 * agog_nats.agents is the desired state: one stream per agent,
 * agog_features_<task_type>, capturing agog.deliverables.<agent>.>.  The
 * worker creates or updates streams to match, and never deletes one.
 *
 * Copyright (c) 2026, agog_nats developers
 *
 * src/agog_stream.c
 *
 *-------------------------------------------------------------------------
 */
#include "agog_nats.h"

#include "access/xact.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

PG_FUNCTION_INFO_V1(agog_stream_status);

#define AGENTS_QUERY \
	"SELECT agent, task_type, stream_name, description, max_msgs, max_bytes, " \
	"       (extract(epoch FROM max_age) * 1000)::bigint, max_msg_size " \
	"  FROM agog_nats.agents ORDER BY agent"

/* Streams of the workflow engine, kept like the agent streams. */
static const struct
{
	const char *name;
	const char *subject;
	const char *description;
}			system_streams[] =
{
	{"agog_tasks", "agog.tasks.>", "agog_nats: tiny task notices to agents"},
	{"agog_notices", "agog.notices.>", "agog_nats: completion notices from agents"},
};

typedef struct AgentRow
{
	char	   *agent;
	char	   *task_type;
	char	   *stream;
	char	   *description;
	int64		max_msgs;
	int64		max_bytes;
	int64		max_age_ms;
	int32		max_msg_size;
} AgentRow;

/*
 * read_agents
 *		The rows of agog_nats.agents, copied into the caller's memory context.
 *		Runs inside a transaction, connected to SPI.
 */
static AgentRow *
read_agents(MemoryContext caller, int *count)
{
	AgentRow   *rows;
	int			ret;

	{
		static SPIPlanPtr plan = NULL;

		/* prepared once per process: planning it was a quarter of a call */
		if (plan == NULL)
		{
			SPIPlanPtr	pl = SPI_prepare(AGENTS_QUERY, 0, NULL);

			if (pl == NULL || SPI_keepplan(pl) != 0)
				elog(ERROR, "could not prepare the agents query: %s",
					 SPI_result_code_string(SPI_result));
			plan = pl;
		}
		ret = SPI_execute_plan(plan, NULL, NULL, true, 0);
	}
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading agog_nats.agents failed: %s", SPI_result_code_string(ret));

	rows = MemoryContextAllocZero(caller, sizeof(AgentRow) * Max(SPI_processed, 1));
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		MemoryContext spi = MemoryContextSwitchTo(caller);

		rows[i].agent = SPI_getvalue(tup, desc, 1);
		rows[i].task_type = SPI_getvalue(tup, desc, 2);
		rows[i].stream = SPI_getvalue(tup, desc, 3);
		rows[i].description = SPI_getvalue(tup, desc, 4);
		rows[i].max_msgs = DatumGetInt64(SPI_getbinval(tup, desc, 5, &isnull));
		rows[i].max_bytes = DatumGetInt64(SPI_getbinval(tup, desc, 6, &isnull));
		rows[i].max_age_ms = DatumGetInt64(SPI_getbinval(tup, desc, 7, &isnull));
		rows[i].max_msg_size = DatumGetInt32(SPI_getbinval(tup, desc, 8, &isnull));
		MemoryContextSwitchTo(spi);
	}
	*count = (int) SPI_processed;
	return rows;
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
	AgentRow   *rows;
	int			count;

	/* the rows are copied into the caller's (the loop's) context */
	agog_xact_begin(caller);
	rows = read_agents(caller, &count);
	agog_xact_commit(caller);

	*ok = *failed = 0;
	memset(first_err, 0, sizeof(*first_err));
	for (int i = 0; i < count; i++)
	{
		AgogStreamSpec spec;
		AgogError	err;
		bool		created;
		bool		updated;

		spec.name = rows[i].stream;
		spec.subject = agog_stream_subjects(rows[i].agent);
		spec.description = rows[i].description;
		spec.max_msgs = rows[i].max_msgs;
		spec.max_bytes = rows[i].max_bytes;
		spec.max_age_ms = rows[i].max_age_ms;
		spec.max_msg_size = rows[i].max_msg_size;
		spec.replicas = agog_stream_replicas;
		spec.duplicate_window_ms = agog_duplicate_window_ms;

		if (agog_conn_ensure_stream(conn, &spec, &created, &updated, &err))
		{
			(*ok)++;
			if (created)
				ereport(LOG,
						(errmsg("agog_nats created JetStream stream \"%s\" for agent \"%s\"",
								spec.name, rows[i].agent)));
			else if (updated)
				ereport(LOG,
						(errmsg("agog_nats updated JetStream stream \"%s\" to match agog_nats.agents",
								spec.name)));
		}
		else
		{
			if (*failed == 0)
			{
				*first_err = err;
				snprintf(first_err->text, sizeof(first_err->text),
						 "stream \"%s\": %s", spec.name, err.text);
			}
			(*failed)++;
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
		AgogError	err;
		bool		created;
		bool		updated;

		spec.name = system_streams[i].name;
		spec.subject = system_streams[i].subject;
		spec.description = system_streams[i].description;
		spec.max_msgs = 10000;
		spec.max_bytes = INT64CONST(1073741824);
		spec.max_age_ms = INT64CONST(7) * 24 * 3600 * 1000;
		spec.max_msg_size = -1;
		spec.replicas = agog_stream_replicas;
		spec.duplicate_window_ms = agog_duplicate_window_ms;
		if (!agog_conn_ensure_stream(conn, &spec, &created, &updated, &err))
		{
			if (*failed == 0)
			{
				*first_err = err;
				snprintf(first_err->text, sizeof(first_err->text),
						 "stream \"%s\": %s", spec.name, err.text);
			}
			(*failed)++;
		}
		else if (created)
			ereport(LOG,
					(errmsg("agog_nats created JetStream stream \"%s\"", spec.name)));
	}
	return *failed == 0;
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
 * agog_stream_status
 *		One row per agent stream: the seed's fields, times, limits, the share
 *		of each limit used and a health word.  A stream missing in JetStream
 *		shows as 'missing'.  One listing request to NATS for all streams.
 */
Datum
agog_stream_status(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	AgentRow   *rows;
	int			nrows;
	AgogStreamState *states;
	int			nstates;
	AgogError	err;
	TimestampTz now = GetCurrentTimestamp();
	MemoryContext caller;

	InitMaterializedSRF(fcinfo, 0);
	caller = CurrentMemoryContext;
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	rows = read_agents(caller, &nrows);
	SPI_finish();
	if (!agog_conn_stream_states(agog_backend_conn(), &states, &nstates, &err))
		agog_raise(&err, "read the state of the agent streams");

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
			health = drifted ? "drifted" : near ? "near_limit" : "ok";
		}
		values[17] = CStringGetTextDatum(health);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
