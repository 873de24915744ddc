/*-------------------------------------------------------------------------
 *
 * agog_agents.c
 *		A per-process cache of agog_nats.agents.
 *
 * Every report call needs its agent's stream and size limit, and
 * agog_stream_status() and the worker need every agent.  Reading the table
 * through SPI was a tenth of a fetch and of a status call, so each process
 * keeps the rows and reads them again only when they may have changed:
 *
 *	- another transaction committed a change: the agents generation in
 *	  shared memory moved (bumped at commit by agog_xact_callback);
 *	- this transaction changed the table: its own, uncommitted rows are read
 *	  on every call until it ends;
 *	- the current user is another one: the rows are read with the caller's
 *	  privileges, as the table's grants say.
 *
 * The generation is read before the rows, so a change committed while they
 * are read is seen on the next call.  The rows are read in a snapshot taken
 * then, not the caller's: they are those of the latest committed state
 * (with this transaction's own changes), also for a REPEATABLE READ
 * transaction, or a statement, that began before the change.  Read in the
 * caller's snapshot, such a transaction would have cached the state before
 * the change under the generation after it, for every later call of the
 * process (isolation spec agents_cache).
 *
 * Copyright (c) 2026, agog_nats developers
 *
 * src/agog_agents.c
 *
 *-------------------------------------------------------------------------
 */
#include "agog_nats.h"

#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

/*
 * limits_changed_at is new in 0.3.0: read through to_jsonb, the query also
 * works on an older version's table (between a new library and ALTER
 * EXTENSION UPDATE), where it is NULL: the worker then never lowers.  The
 * stamp is kept as to_jsonb renders it, for the worker's clearing update.
 */
#define AGENTS_QUERY \
	"SELECT agent, task_type, stream_name, description, max_msgs, max_bytes, " \
	"       (extract(epoch FROM max_age) * 1000)::bigint, max_msg_size, " \
	"       to_jsonb(a) ->> 'limits_changed_at', to_jsonb(a) ? 'limits_changed_at' " \
	"  FROM agog_nats.agents a ORDER BY agent"

static MemoryContext agents_cxt = NULL;
static AgogAgent *agents = NULL;
static int	nagents = 0;
static bool agents_valid = false;
static uint64 agents_generation = 0;
static Oid	agents_user = InvalidOid;

/*
 * load_agents
 *		Read every row into agents_cxt, in the latest snapshot (see the file
 *		header).  Runs in a transaction; opens and closes its own SPI
 *		connection.  On error the cache stays invalid.
 */
static void
load_agents(void)
{
	static SPIPlanPtr plan = NULL;
	MemoryContext old;
	int			ret;

	agents_valid = false;
	if (agents_cxt == NULL)
		agents_cxt = AllocSetContextCreate(TopMemoryContext, "agog_nats agents",
										   ALLOCSET_SMALL_SIZES);
	MemoryContextReset(agents_cxt);
	agents = NULL;
	nagents = 0;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (plan == NULL)
	{
		SPIPlanPtr	pl = SPI_prepare(AGENTS_QUERY, 0, NULL);

		if (pl == NULL || SPI_keepplan(pl) != 0)
			elog(ERROR, "could not prepare the agents query: %s",
				 SPI_result_code_string(SPI_result));
		plan = pl;
	}
	ret = SPI_execute_snapshot(plan, NULL, NULL, GetLatestSnapshot(), InvalidSnapshot,
							   true, false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading agog_nats.agents failed: %s", SPI_result_code_string(ret));

	old = MemoryContextSwitchTo(agents_cxt);
	agents = palloc0(sizeof(AgogAgent) * Max(SPI_processed, 1));
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;

		agents[i].agent = SPI_getvalue(tup, desc, 1);
		agents[i].task_type = SPI_getvalue(tup, desc, 2);
		agents[i].stream = SPI_getvalue(tup, desc, 3);
		agents[i].description = SPI_getvalue(tup, desc, 4);
		agents[i].max_msgs = DatumGetInt64(SPI_getbinval(tup, desc, 5, &isnull));
		agents[i].max_bytes = DatumGetInt64(SPI_getbinval(tup, desc, 6, &isnull));
		agents[i].max_age_ms = DatumGetInt64(SPI_getbinval(tup, desc, 7, &isnull));
		agents[i].max_msg_size = DatumGetInt32(SPI_getbinval(tup, desc, 8, &isnull));
		agents[i].limits_stamp = SPI_getvalue(tup, desc, 9);
		agents[i].stamp_column = DatumGetBool(SPI_getbinval(tup, desc, 10, &isnull));
	}
	nagents = (int) SPI_processed;
	MemoryContextSwitchTo(old);
	SPI_finish();
}

/*
 * agog_agents
 *		Every agent, ordered by name.  Runs in a transaction (a backend's, or
 *		one of the worker's own).  The rows stay valid until the next call of
 *		agog_agents or agog_agent in this process.
 */
const AgogAgent *
agog_agents(int *count)
{
	uint64		generation;
	Oid			user = GetUserId();

	/* without the preload there is no generation to read: refuse */
	agog_shmem_attach();
	generation = pg_atomic_read_u64(&agog_shared->agents_generation);

	if (!agents_valid || generation != agents_generation || user != agents_user ||
		agog_agents_changed_in_xact())
	{
		load_agents();
		agents_generation = generation;
		agents_user = user;
		/* this transaction's own changes are read again on every call */
		agents_valid = !agog_agents_changed_in_xact();
	}
	*count = nagents;
	return agents;
}

/*
 * agog_agents_invalidate
 *		Read the agents again on the next call, whatever the generation: the
 *		worker changed them without moving it.  Runs anywhere.
 */
void
agog_agents_invalidate(void)
{
	agents_valid = false;
}

/*
 * agog_agent
 *		One agent by name, or NULL when there is no such agent.  Runs in a
 *		transaction; same lifetime as agog_agents.
 */
const AgogAgent *
agog_agent(const char *agent)
{
	int			count;
	const AgogAgent *all = agog_agents(&count);

	for (int i = 0; i < count; i++)
		if (strcmp(all[i].agent, agent) == 0)
			return &all[i];
	return NULL;
}
