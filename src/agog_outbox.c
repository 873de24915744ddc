/*-------------------------------------------------------------------------
 *
 * agog_outbox.c
 *		The transactional outbox: reports written in the caller's transaction
 *		and published to JetStream by the worker after commit, exactly once.
 *
 * A report is a row of agog_nats.outbox, inserted by agog_publish_report in
 * the caller's transaction; a rollback (or a rollback to a savepoint) takes
 * it back like any row.  At commit the transaction only sets the worker's
 * latch.  The worker then:
 *
 *	1. claims a batch of due rows (FOR UPDATE SKIP LOCKED), counting the
 *	   attempt and leasing the rows, and commits: from here on a row with
 *	   attempts > 1 may have been sent before;
 *	2. for a row that may have been sent longer ago than half the duplicate
 *	   window, looks for its Nats-Msg-Id on the subject first (JetStream's
 *	   dedup no longer covers a resend then);
 *	3. publishes the rest asynchronously, Nats-Msg-Id = the row's msg_id;
 *	4. records each outcome in a second transaction: published (stream,
 *	   sequence; a duplicate ack counts), dead (a permanent refusal, with
 *	   the server's error), or pending again with backoff (no answer).
 *
 * A crash anywhere leaves the row pending; the next attempt is covered by
 * JetStream's duplicate window or by step 2, so each committed report is
 * stored once.
 *
 * Copyright (c) 2026, agog_nats developers
 *
 * src/agog_outbox.c
 *
 *-------------------------------------------------------------------------
 */
#include "agog_nats.h"

#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "commands/dbcommands.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

PG_FUNCTION_INFO_V1(agog_outbox_changed);
PG_FUNCTION_INFO_V1(agog_retry_dead);
PG_FUNCTION_INFO_V1(agog_outbox_stats);

/* Backoff of a row that got no answer, and attempts before a refusal is final. */
#define BACKOFF_MIN_MS		250
#define BACKOFF_MAX_MS		30000
#define REFUSALS_BEFORE_DEAD 10
#define PURGE_BATCH			10000

/* Set when this transaction wrote the outbox; read at commit. */
static bool outbox_changed_in_xact = false;
static bool workflow_changed_in_xact = false;
static uint64 outbox_inserted_in_xact = 0;

/*
 * The lowest outbox id this transaction may have made pending: the reports
 * it inserted, or 0 when a statement other than agog_outbox_insert's changed
 * the outbox (an admin's update, agog_retry_dead, a task notice).  At commit
 * it lowers the shared claim floor.  INT64_MAX: none.
 */
static int64 outbox_min_id_in_xact = PG_INT64_MAX;
static bool in_outbox_insert = false;

/*
 * Where the worker's next claim starts: it takes due pending rows with ids
 * above claim_after_id (see agog_nats.claim_outbox).  The partial index
 * outbox_pending keeps an entry for every published row until vacuum, so a
 * claim that started from the lowest id would walk all of them: 2-10 ms
 * after a few tens of thousands of reports, on every claim.  Instead the
 * worker goes on from what it has seen, and starts lower only when it must:
 *
 *	- a committed transaction lowered the shared claim floor below it: a
 *	  report with a lower id committed after a later one (ids are drawn
 *	  before commit), or another statement made a row pending (floor 0);
 *	- one of its own outcomes put a row back to pending, due later, a lease
 *	  runs out (the worker's count each second finds the next of these), or
 *	  it inserted task notices itself (claim_rescan_at);
 *	- every CLAIM_RESCAN_MS whatever happened, as a bound for any path not
 *	  seen here (a prepared transaction committed later, a row skipped while
 *	  another session held a lock on it).
 */
#define CLAIM_RESCAN_MS		1000
static int64 claim_after_id = 0;
static TimestampTz claim_rescan_at = 0;	/* 0: at the next claim */
static TimestampTz claim_full_scan_at = 0;

/* Plans kept for the backend's or the worker's life. */
static SPIPlanPtr next_id_plan = NULL;
static SPIPlanPtr insert_plan = NULL;
static SPIPlanPtr pending_plan = NULL;
static SPIPlanPtr claim_plan = NULL;
static SPIPlanPtr seq_last_plan = NULL;
static SPIPlanPtr record_plan = NULL;

/*
 * keep_plan
 *		Prepare a statement once and keep it.  Runs inside SPI.
 *		cursor_options: 0, or CURSOR_OPT_GENERIC_PLAN for a statement
 *		planned once whatever its arguments (see flush_outcomes).
 */
static SPIPlanPtr
keep_plan(SPIPlanPtr *slot, const char *sql, int nargs, Oid *argtypes,
		  int cursor_options)
{
	if (*slot == NULL)
	{
		SPIPlanPtr	p = SPI_prepare_cursor(sql, nargs, argtypes, cursor_options);

		if (p == NULL || SPI_keepplan(p) != 0)
			elog(ERROR, "could not prepare \"%s\": %s", sql,
				 SPI_result_code_string(SPI_result));
		*slot = p;
	}
	return *slot;
}

/* ----------------------------------------------------------------
 * Backend side: agog_publish_report and agog_fetch_report
 * ----------------------------------------------------------------
 */

/*
 * agog_outbox_next_id
 *		The next outbox id, and its Nats-Msg-Id: agog-<system id>-<database
 *		oid>-<id>-<16 random hex digits>.  The system id and database oid
 *		keep apart clusters and databases that share a NATS server; the
 *		random part keeps apart the histories of one database.  After a
 *		failover with asynchronous replication the new primary draws again
 *		outbox ids the old one had used for reports it published and lost
 *		in the failover; with the same message id JetStream would take a
 *		new report for a duplicate of the lost one and drop it, and the
 *		worker would record it as published.  Runs in the caller's
 *		transaction.
 */
int64
agog_outbox_next_id(char **msg_id)
{
	int64		id;
	bool		isnull;
	int			ret;
	uint8		rnd[8];
	char		hex[2 * sizeof(rnd) + 1];

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ret = SPI_execute_plan(keep_plan(&next_id_plan,
									 "SELECT pg_catalog.nextval('agog_nats.outbox_id_seq')",
									 0, NULL, 0),
						   NULL, NULL, false, 1);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not draw an outbox id: %s", SPI_result_code_string(ret));
	id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	SPI_finish();

	if (!pg_strong_random(rnd, sizeof(rnd)))
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not generate random bytes for a message id")));
	for (size_t i = 0; i < sizeof(rnd); i++)
		snprintf(hex + 2 * i, 3, "%02x", rnd[i]);
	*msg_id = psprintf("agog-" UINT64_FORMAT "-%u-" INT64_FORMAT "-%s",
					   GetSystemIdentifier(), MyDatabaseId, id, hex);
	return id;
}

/*
 * agog_outbox_check_depth
 *		Refuse a new report while the outbox holds agog_nats.outbox_max_pending
 *		unpublished ones (counted by the worker every second, plus what has
 *		committed since).
 */
void
agog_outbox_check_depth(void)
{
	uint64		pending;

	if (agog_outbox_max_pending <= 0 || agog_shared == NULL)
		return;
	pending = pg_atomic_read_u64(&agog_shared->outbox_pending) + outbox_inserted_in_xact;
	if (pending >= (uint64) agog_outbox_max_pending)
		ereport(ERROR,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("the agog_nats outbox is full"),
				 errdetail("%llu reports are waiting to be published; agog_nats.outbox_max_pending is %d.",
						   (unsigned long long) pending, agog_outbox_max_pending),
				 errhint("Check agog_nats.worker_health: the NATS server may be unreachable. Raise agog_nats.outbox_max_pending to queue more.")));
}

/*
 * agog_outbox_check_database
 *		Refuse to queue a report outside agog_nats.database: the worker
 *		drains that database's outbox only, and a report queued anywhere
 *		else would stay pending for ever.  When agog_nats.database names no
 *		database the worker cannot start at all (it logs why) and nothing is
 *		refused here.  Runs in a backend, in a transaction; the database is
 *		looked up until found, then kept (the setting is fixed at server
 *		start, and the database a backend is connected to cannot be renamed
 *		under it).
 */
void
agog_outbox_check_database(void)
{
	static Oid	worker_db = InvalidOid;

	if (!OidIsValid(worker_db))
		worker_db = get_database_oid(agog_database, true);
	if (OidIsValid(worker_db) && MyDatabaseId != worker_db)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("reports can be queued only in database \"%s\"", agog_database),
				 errdetail("The agog_nats worker publishes the outbox of agog_nats.database only; a report queued in database \"%s\" would never be published.",
						   get_database_name(MyDatabaseId)),
				 errhint("Connect to database \"%s\", or use agog_publish_report_now, which publishes without the worker.",
						 agog_database)));
}

/*
 * agog_outbox_insert
 *		Write a checked, encoded report into the outbox, in the caller's
 *		transaction.
 */
void
agog_outbox_insert(int64 id, const char *msg_id, const char *agent,
				   const char *task_type, const char *feature,
				   const char *subject, const char *stream, const char *body)
{
	Oid			argtypes[8] = {INT8OID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID};
	Datum		values[8];
	int			ret;

	values[0] = Int64GetDatum(id);
	values[1] = CStringGetTextDatum(msg_id);
	values[2] = CStringGetTextDatum(agent);
	values[3] = CStringGetTextDatum(task_type);
	values[4] = CStringGetTextDatum(feature);
	values[5] = CStringGetTextDatum(subject);
	values[6] = CStringGetTextDatum(stream);
	values[7] = CStringGetTextDatum(body);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	/* the statement trigger of this insert must not take it for another */
	in_outbox_insert = true;
	PG_TRY();
	{
		ret = SPI_execute_plan(keep_plan(&insert_plan,
										 "INSERT INTO agog_nats.outbox "
										 "  (id, msg_id, agent, task_type, feature, subject, target_stream, body) "
										 "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
										 8, argtypes, 0),
							   values, NULL, false, 0);
	}
	PG_FINALLY();
	{
		in_outbox_insert = false;
	}
	PG_END_TRY();
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "could not write the report to the outbox: %s",
			 SPI_result_code_string(ret));
	SPI_finish();
	outbox_inserted_in_xact++;
	outbox_min_id_in_xact = Min(outbox_min_id_in_xact, id);
}

/*
 * agog_outbox_latest_pending
 *		The body of the newest report on the subject that is not yet in
 *		JetStream (this transaction's own, or committed and waiting), or NULL.
 *		One probe of outbox_subject_pending, which holds pending reports
 *		only: the subject's published rows, kept for
 *		agog_nats.published_retention, are not walked (through
 *		outbox_subject, a subject with 5,000 of them cost 10 ms per fetch).
 *		"Pending" is written as in the index's predicate, which
 *		outbox_pending's (state = 'pending') is not: that index, walked
 *		backwards, would cross every pending row of every subject.  Runs in
 *		a backend.  Objects of 0.1.0 have no outbox (the library is newer
 *		than the objects until ALTER EXTENSION UPDATE): nothing is pending.
 */
char *
agog_outbox_latest_pending(const char *subject)
{
	MemoryContext caller = CurrentMemoryContext;
	Oid			argtypes[1] = {TEXTOID};
	Datum		arg;
	char	   *body = NULL;
	int			ret;
	Oid			nsp = get_namespace_oid("agog_nats", true);

	if (!OidIsValid(nsp) || !OidIsValid(get_relname_relid("outbox", nsp)))
		return NULL;
	arg = CStringGetTextDatum(subject);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ret = SPI_execute_plan(keep_plan(&pending_plan,
									 "SELECT body FROM agog_nats.outbox "
									 " WHERE subject = $1 AND state NOT IN ('published', 'dead') "
									 "   AND kind = 'report' "
									 " ORDER BY id DESC LIMIT 1",
									 1, argtypes, 0),
						   &arg, NULL, true, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read the outbox: %s", SPI_result_code_string(ret));
	if (SPI_processed == 1)
	{
		char	   *v = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);

		body = MemoryContextStrdup(caller, v);
	}
	SPI_finish();
	return body;
}

/* ----------------------------------------------------------------
 * Commit hooks
 * ----------------------------------------------------------------
 */

void
agog_outbox_note_changed(void)
{
	outbox_changed_in_xact = true;
}

/*
 * agog_outbox_changed
 *		Statement trigger on agog_nats.outbox, and (as
 *		agog_nats.workflow_changed) on tasks and workflows: note the change;
 *		the worker is woken at commit, and a change of tasks or workflows
 *		also moves the workflow generation, which tells the worker to run an
 *		orchestration step.  The worker's own changes do not wake it.
 */
Datum
agog_outbox_changed(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	bool		is_outbox;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("agog_outbox_changed must be called as a trigger")));
	is_outbox = strcmp(RelationGetRelationName(td->tg_relation), "outbox") == 0;
	if (agog_shared == NULL || agog_shared->worker_pid != MyProcPid)
	{
		agog_outbox_note_changed();
		if (!is_outbox)
			workflow_changed_in_xact = true;
		else if (!in_outbox_insert)
			outbox_min_id_in_xact = 0;	/* any row may be pending now */
	}
	else if (is_outbox && TRIGGER_FIRED_BY_INSERT(td->tg_event))
		claim_rescan_at = 0;	/* the worker's own task notices */
	return PointerGetDatum(NULL);
}

/*
 * forget_xact
 *		Reset what the transaction that just ended noted (in_outbox_insert is
 *		reset by agog_outbox_insert itself, on every path).  Runs in the
 *		commit and abort callbacks; nothing that can fail.
 */
static void
forget_xact(void)
{
	outbox_changed_in_xact = false;
	workflow_changed_in_xact = false;
	outbox_inserted_in_xact = 0;
	outbox_min_id_in_xact = PG_INT64_MAX;
}

/*
 * agog_outbox_at_commit
 *		Transaction callback at commit: count what was queued and wake the
 *		worker.  An atomic add and a latch; nothing that can fail.
 */
void
agog_outbox_at_commit(void)
{
	if (outbox_inserted_in_xact > 0 && agog_shared != NULL)
		pg_atomic_fetch_add_u64(&agog_shared->outbox_pending, outbox_inserted_in_xact);
	if (outbox_min_id_in_xact != PG_INT64_MAX && agog_shared != NULL &&
		(agog_shared->worker_dboid == MyDatabaseId || agog_shared->worker_dboid == InvalidOid))
	{
		/*
		 * Lower the claim floor to this transaction's lowest id.  Runs after
		 * the commit made the rows visible, and before the worker is woken:
		 * a claim that read the floor before this missed nothing it could
		 * see, and the next one starts low enough.  Only for the worker's
		 * database: another database's outbox is not drained.
		 */
		uint64		floor = pg_atomic_read_u64(&agog_shared->claim_floor);
		uint64		mine = (uint64) outbox_min_id_in_xact;

		while (mine < floor &&
			   !pg_atomic_compare_exchange_u64(&agog_shared->claim_floor, &floor, mine))
		{
			/* floor now holds the value another commit set: compare again */
		}
	}
	if (workflow_changed_in_xact && agog_shared != NULL)
		pg_atomic_fetch_add_u64(&agog_shared->workflow_generation, 1);
	if (outbox_changed_in_xact)
		agog_wake_worker();
	forget_xact();
}

/*
 * agog_outbox_at_abort
 *		Transaction callback at abort: forget what this transaction queued.
 */
void
agog_outbox_at_abort(void)
{
	forget_xact();
}

/* ----------------------------------------------------------------
 * Admin functions
 * ----------------------------------------------------------------
 */

/*
 * agog_retry_dead
 *		Put dead reports back in the queue, with the same message id (a
 *		resend of one the server did store is deduplicated or found).
 */
Datum
agog_retry_dead(PG_FUNCTION_ARGS)
{
	Oid			argtypes[1] = {INT8ARRAYOID};
	Datum		arg = PG_ARGISNULL(0) ? (Datum) 0 : PG_GETARG_DATUM(0);
	char		nulls[1] = {PG_ARGISNULL(0) ? 'n' : ' '};
	int			ret;
	uint64		n;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ret = SPI_execute_with_args("UPDATE agog_nats.outbox "
								"   SET state = 'pending', next_attempt_at = now(), "
								"       attempts = 0, last_error = NULL "
								" WHERE state = 'dead' AND ($1 IS NULL OR id = ANY ($1))",
								1, argtypes, &arg, nulls, false, 0);
	if (ret != SPI_OK_UPDATE)
		elog(ERROR, "could not requeue dead reports: %s", SPI_result_code_string(ret));
	n = SPI_processed;
	SPI_finish();
	if (n > 0)
	{
		outbox_inserted_in_xact += n;
		outbox_min_id_in_xact = 0;	/* requeued rows have any id */
		agog_outbox_note_changed();
	}
	PG_RETURN_INT64((int64) n);
}

/*
 * agog_outbox_stats
 *		The worker's counters since it started.
 */
Datum
agog_outbox_stats(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[5];
	bool		nulls[5] = {false};

	agog_shmem_attach();
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	LWLockAcquire(agog_shared->lock, LW_SHARED);
	values[0] = Int64GetDatum((int64) agog_shared->reports_published);
	values[1] = Int64GetDatum((int64) agog_shared->reports_dead);
	values[2] = TimestampTzGetDatum(agog_shared->last_drain_at);
	nulls[2] = agog_shared->last_drain_at == 0;
	values[3] = Int64GetDatum(agog_shared->max_payload);
	nulls[3] = agog_shared->max_payload == 0;
	LWLockRelease(agog_shared->lock);
	values[4] = Int64GetDatum((int64) pg_atomic_read_u64(&agog_shared->outbox_pending));

	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/* ----------------------------------------------------------------
 * Worker side
 * ----------------------------------------------------------------
 */

/* A claimed row. */
typedef struct Claimed
{
	int64		id;
	char	   *msg_id;
	char	   *subject;
	const char *body;			/* not NUL-terminated: body_len bytes */
	int			body_len;
	int			attempts;
	int64		first_sent_age_ms;
	char	   *stream;			/* the agent's stream; NULL if the agent is gone */
	uint64		found_seq;		/* already stored at this sequence, or 0 */
	bool		looked_up;		/* its earlier send was looked for */
	bool		unresolved;		/* could not check an earlier send */
} Claimed;

/*
 * agog_outbox_release_leases
 *		At worker start: rows leased by a worker that died are due again now.
 *		Only one worker runs, so no lease of a live drainer is cut short.
 */
void
agog_outbox_release_leases(void)
{
	MemoryContext cxt = CurrentMemoryContext;
	int			ret;

	agog_xact_begin(cxt);
	ret = SPI_execute("UPDATE agog_nats.outbox SET next_attempt_at = now() "
					  " WHERE state = 'pending' AND attempts > 0 AND next_attempt_at > now()",
					  false, 0);
	if (ret != SPI_OK_UPDATE)
		elog(ERROR, "could not release outbox leases: %s", SPI_result_code_string(ret));
	agog_xact_commit(cxt);
}

/* qsort comparator: claimed rows by id.  Runs in the worker, in claim_batch. */
static int
claimed_by_id(const void *a, const void *b)
{
	int64		ia = ((const Claimed *) a)->id;
	int64		ib = ((const Claimed *) b)->id;

	return (ia > ib) - (ia < ib);
}

/*
 * claim_batch
 *		Transaction 1: agog_nats.claim_outbox leases up to AGOG_DRAIN_BATCH
 *		due rows, oldest first, counting the attempt.  Returns them in id
 *		order, the order they are sent in.
 */
static int
claim_batch(Claimed *rows, MemoryContext cxt)
{
	Oid			argtypes[3] = {INT4OID, INT4OID, INT8OID};
	Datum		args[3];
	int			ret;
	int			n;
	TimestampTz now = GetCurrentTimestamp();
	uint64		floor;
	int64		seq_last = 0;
	bool		isnull;

	/*
	 * Where to start (see claim_after_id).  The floor is taken before the
	 * claim's snapshot: a row committed since is visible to the claim, or
	 * lowers the floor again for the next one.
	 */
	floor = pg_atomic_exchange_u64(&agog_shared->claim_floor, PG_UINT64_MAX);
	if (floor != PG_UINT64_MAX)
		claim_after_id = Min(claim_after_id, (int64) floor - 1);
	if ((claim_rescan_at != PG_INT64_MAX && now >= claim_rescan_at) ||
		now < claim_full_scan_at ||	/* the clock stepped back */
		TimestampDifferenceExceeds(claim_full_scan_at, now, CLAIM_RESCAN_MS))
	{
		claim_after_id = 0;
		claim_rescan_at = PG_INT64_MAX;
		claim_full_scan_at = now;
	}

	args[0] = Int32GetDatum(AGOG_DRAIN_BATCH);
	args[1] = Int32GetDatum(2 * agog_timeout_ms + 1000);
	args[2] = Int64GetDatum(claim_after_id);

	agog_xact_begin(cxt);
	ret = SPI_execute_plan(keep_plan(&claim_plan,
									 "SELECT * FROM agog_nats.claim_outbox($1, $2, $3)",
									 3, argtypes, 0),
						   args, NULL, false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not claim outbox rows: %s", SPI_result_code_string(ret));

	n = (int) SPI_processed;
	for (int i = 0; i < n; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		text	   *body;
		MemoryContext spi = MemoryContextSwitchTo(cxt);

		rows[i].id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		rows[i].msg_id = SPI_getvalue(tup, desc, 2);
		rows[i].subject = SPI_getvalue(tup, desc, 3);
		/*
		 * Decompressed (or copied) once, into cxt, where it outlives SPI;
		 * not through the output function, which would copy it again.
		 */
		body = DatumGetTextPCopy(SPI_getbinval(tup, desc, 4, &isnull));
		rows[i].body = VARDATA(body);
		rows[i].body_len = (int) (VARSIZE(body) - VARHDRSZ);
		rows[i].attempts = DatumGetInt32(SPI_getbinval(tup, desc, 5, &isnull));
		rows[i].first_sent_age_ms = DatumGetInt64(SPI_getbinval(tup, desc, 6, &isnull));
		rows[i].stream = SPI_getvalue(tup, desc, 7);
		MemoryContextSwitchTo(spi);
	}

	/*
	 * The claim picks the lowest ids, but its UPDATE returns them in the
	 * order it visits them: on a small outbox a sequential scan, in
	 * physical order, which a row's newer version can change.  Sent in that
	 * order, an older report could land after a newer one on its subject.
	 */
	qsort(rows, n, sizeof(Claimed), claimed_by_id);

	/*
	 * Where a short batch leaves the cursor: every id up to the sequence's
	 * last value is visible to the claim above, or belongs to a transaction
	 * that commits after the claim's snapshot was taken, so after the floor
	 * was read, and lowers it when it does.  Without it a claim that found
	 * nothing would leave the cursor where it was (at 0 after a full scan),
	 * and the next claims would walk from there.  A full batch needs no
	 * read: it goes on from its last id.
	 */
	if (n < AGOG_DRAIN_BATCH)
	{
		ret = SPI_execute_plan(keep_plan(&seq_last_plan,
										 "SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END"
										 "  FROM agog_nats.outbox_id_seq",
										 0, NULL, 0),
							   NULL, NULL, true, 1);
		if (ret != SPI_OK_SELECT || SPI_processed != 1)
			elog(ERROR, "could not read the outbox id sequence: %s", SPI_result_code_string(ret));
		seq_last = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	}
	agog_xact_commit(cxt);

	/*
	 * After a full batch go on from its last id.  After a short one every
	 * due pending row the claim could see was taken: go on from the last id
	 * drawn.
	 */
	if (n == AGOG_DRAIN_BATCH)
		claim_after_id = rows[n - 1].id;
	else
		claim_after_id = Max(claim_after_id, seq_last);
	return n;
}

/* Backoff after the given number of attempts. */
static int
backoff_ms(int attempts)
{
	int64		ms = BACKOFF_MIN_MS;

	for (int i = 1; i < attempts && ms < BACKOFF_MAX_MS; i++)
		ms *= 2;
	return (int) Min(ms, BACKOFF_MAX_MS);
}

/*
 * The outcomes of a batch, recorded by one UPDATE: one statement per batch
 * instead of one per row (each statement's executor start re-reads the
 * table's CHECK constraints).
 */
typedef struct Outcomes
{
	ArrayBuildState *ids;
	ArrayBuildState *states;
	ArrayBuildState *streams;
	ArrayBuildState *seqs;
	ArrayBuildState *dups;
	ArrayBuildState *errors;
	ArrayBuildState *delays;
	int			n;
} Outcomes;

/*
 * outcomes_init
 *		Empty arrays of a batch's outcomes, in the current memory context.
 */
static void
outcomes_init(Outcomes *o)
{
	MemoryContext cxt = CurrentMemoryContext;

	o->ids = initArrayResult(INT8OID, cxt, false);
	o->states = initArrayResult(TEXTOID, cxt, false);
	o->streams = initArrayResult(TEXTOID, cxt, false);
	o->seqs = initArrayResult(INT8OID, cxt, false);
	o->dups = initArrayResult(BOOLOID, cxt, false);
	o->errors = initArrayResult(TEXTOID, cxt, false);
	o->delays = initArrayResult(INT4OID, cxt, false);
	o->n = 0;
}

/*
 * record_outcome
 *		Add one row's outcome: published, dead or pending again.
 */
static void
record_outcome(Outcomes *o, int64 id, const char *state, const char *stream,
			   uint64 seq, bool duplicate, const char *error, int delay_ms)
{
	MemoryContext cxt = CurrentMemoryContext;
	bool		published = strcmp(state, "published") == 0;

	/* a row pending again is due later: the claim then starts from the lowest id */
	if (strcmp(state, "pending") == 0)
		claim_rescan_at = Min(claim_rescan_at,
							  TimestampTzPlusMilliseconds(GetCurrentTimestamp(), delay_ms));

	accumArrayResult(o->ids, Int64GetDatum(id), false, INT8OID, cxt);
	accumArrayResult(o->states, CStringGetTextDatum(state), false, TEXTOID, cxt);
	accumArrayResult(o->streams, published ? CStringGetTextDatum(stream) : (Datum) 0,
					 !published, TEXTOID, cxt);
	accumArrayResult(o->seqs, Int64GetDatum((int64) seq), !published, INT8OID, cxt);
	accumArrayResult(o->dups, BoolGetDatum(duplicate), !published, BOOLOID, cxt);
	accumArrayResult(o->errors, error ? CStringGetTextDatum(error) : (Datum) 0,
					 error == NULL, TEXTOID, cxt);
	accumArrayResult(o->delays, Int32GetDatum(delay_ms), false, INT4OID, cxt);
	o->n++;
}

/*
 * set_local
 *		A setting for the rest of the worker's transaction, as SET LOCAL
 *		does, without parsing a statement.
 */
static void
set_local(const char *name, const char *value)
{
	(void) set_config_option(name, value, PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_LOCAL, true, 0, false);
}

/*
 * flush_outcomes
 *		Transaction 2: record every outcome of the batch.  Only rows still
 *		pending are changed.  Runs inside the worker's transaction, with SPI.
 */
static void
flush_outcomes(Outcomes *o)
{
	Oid			argtypes[7] = {INT8ARRAYOID, TEXTARRAYOID, TEXTARRAYOID, INT8ARRAYOID,
	BOOLARRAYOID, TEXTARRAYOID, INT4ARRAYOID};
	Datum		values[7];
	MemoryContext cxt = CurrentMemoryContext;
	int			ret;

	if (o->n == 0)
		return;

	/*
	 * This commit need not wait for its WAL flush: if a crash loses it, the
	 * rows are still pending and their resend is deduplicated or found by
	 * its message id.  (The claim's commit, before sending, is synchronous.)
	 */
	set_local("synchronous_commit", "off");
	values[0] = makeArrayResult(o->ids, cxt);
	values[1] = makeArrayResult(o->states, cxt);
	values[2] = makeArrayResult(o->streams, cxt);
	values[3] = makeArrayResult(o->seqs, cxt);
	values[4] = makeArrayResult(o->dups, cxt);
	values[5] = makeArrayResult(o->errors, cxt);
	values[6] = makeArrayResult(o->delays, cxt);

	/*
	 * "Still pending" is written as neither published nor dead (the same,
	 * by the table's CHECK) so that the partial index outbox_pending cannot
	 * serve the outbox side of the join: its statistics say little about
	 * how many rows are pending right now, and a plan that hashed all of
	 * them (or rescanned the batch for each) cost more than the rest of the
	 * drain.  The plan must look up each row of the batch by primary key
	 * however large the outbox is: a generic plan made at the worker's
	 * start, when the outbox was small, was a sequential scan of it, kept
	 * until an autovacuum happened to invalidate it (20 ms per batch after
	 * 100,000 reports).  Planning it on every call for the batch's and the
	 * table's sizes fixed that, at the price of the planner on every batch,
	 * the largest share of the worker's CPU when reports trickle in a few
	 * per batch.  So the plan is generic, made once, and made (and remade
	 * after an invalidation) in this transaction with every other way to
	 * join or scan the outbox turned off: a nested loop over the batch,
	 * one primary-key probe per row, whatever the statistics say.
	 */
	set_local("enable_seqscan", "off");
	set_local("enable_bitmapscan", "off");
	set_local("enable_hashjoin", "off");
	set_local("enable_mergejoin", "off");
	ret = SPI_execute_plan(keep_plan(&record_plan,
									 "UPDATE agog_nats.outbox o"
									 "   SET state = r.state, stream = r.stream, seq = r.seq,"
									 "       duplicate = r.dup,"
									 "       published_at = CASE WHEN r.state = 'published' THEN now() END,"
									 "       last_error = r.err,"
									 "       next_attempt_at = CASE WHEN r.state = 'pending'"
									 "            THEN now() + r.delay * interval '1 millisecond'"
									 "            ELSE o.next_attempt_at END"
									 "  FROM unnest($1, $2, $3, $4, $5, $6, $7)"
									 "       AS r(id, state, stream, seq, dup, err, delay)"
									 " WHERE o.id = r.id AND o.state <> 'published' AND o.state <> 'dead'",
									 7, argtypes, CURSOR_OPT_GENERIC_PLAN),
						   values, NULL, false, 0);
	if (ret != SPI_OK_UPDATE)
		elog(ERROR, "could not record outbox outcomes: %s", SPI_result_code_string(ret));
}

/* One claimed batch on its way: claimed, sent, then waited for and recorded. */
typedef struct DrainBatch
{
	MemoryContext cxt;
	Claimed    *rows;
	AgogPubItem *items;
	int		   *item_row;
	int			n;
	int			nitems;
	bool		interrupted;
} DrainBatch;

/*
 * batch_claim_send
 *		Claim a batch (transaction 1, committed before anything is sent),
 *		look up earlier sends whose ack may have been lost, and send the rest
 *		asynchronously without waiting.  Returns the number of rows claimed;
 *		with 0 nothing is left to finish.  Runs in the worker, outside any
 *		transaction.
 */
static int
batch_claim_send(AgogConn *conn, DrainBatch *b, MemoryContext parent)
{
	MemoryContext old;
	TimestampTz claimed_at = GetCurrentTimestamp();	/* at or before the claim's now() */
	bool		looked;

	memset(b, 0, sizeof(*b));
	b->cxt = AllocSetContextCreate(parent, "agog_nats drain batch", ALLOCSET_DEFAULT_SIZES);
	old = MemoryContextSwitchTo(b->cxt);
	b->rows = palloc0(sizeof(Claimed) * AGOG_DRAIN_BATCH);
	b->n = claim_batch(b->rows, b->cxt);
	if (b->n == 0)
	{
		MemoryContextSwitchTo(old);
		MemoryContextDelete(b->cxt);
		b->cxt = NULL;
		return 0;
	}
	b->items = palloc0(sizeof(AgogPubItem) * b->n);
	b->item_row = palloc0(sizeof(int) * b->n);

	/* a report of an agent added since the streams were last put in place */
	for (int i = 0; i < b->n; i++)
	{
		if (b->rows[i].stream != NULL && !agog_stream_in_place(b->rows[i].stream))
			agog_worker_stream_missing(conn, b->rows[i].stream);
	}

	/*
	 * A row claimed before may have been stored by an earlier send whose ack
	 * was lost.  Within the duplicate window JetStream drops a resend; past
	 * half of it, look for the message id on the subject instead.  The age
	 * that counts is the one at the send, after every look-up of the batch:
	 * a row young enough at the claim may not be after slow look-ups of
	 * others, so the rows are gone over again until a pass looks nothing
	 * up (each row is looked up at most once).  A shutdown request ends the
	 * look-ups (each would wait its first slice before seeing it); then
	 * nothing is sent.
	 */
	do
	{
		looked = false;
		for (int i = 0; i < b->n && !b->interrupted; i++)
		{
			Claimed    *row = &b->rows[i];
			AgogError	err;

			if (row->looked_up || row->attempts <= 1 || row->stream == NULL)
				continue;
			if (row->first_sent_age_ms +
				TimestampDifferenceMilliseconds(claimed_at, GetCurrentTimestamp()) <
				agog_duplicate_window_ms / 2)
				continue;
			row->looked_up = looked = true;
			if (!agog_conn_find_msg_id(conn, row->stream, row->subject,
									   row->msg_id, &row->found_seq, &err))
			{
				row->unresolved = true;
				b->interrupted |= (err.sqlstate == ERRCODE_ADMIN_SHUTDOWN);
			}
		}
	} while (looked && !b->interrupted);

	for (int i = 0; i < b->n && !b->interrupted; i++)
	{
		Claimed    *row = &b->rows[i];

		if (row->unresolved || row->found_seq != 0)
			continue;
		b->items[b->nitems].subject = row->subject;
		b->items[b->nitems].msg_id = row->msg_id;
		b->items[b->nitems].data = row->body;
		b->items[b->nitems].len = row->body_len;
		b->item_row[b->nitems] = i;
		b->nitems++;
	}
	if (b->interrupted)
		b->nitems = 0;			/* send nothing; the leases run out */
	if (b->nitems > 0)
		agog_conn_publish_send(conn, b->items, b->nitems);
	MemoryContextSwitchTo(old);
	return b->n;
}

/*
 * leaderless
 *		Whether a refusal may only mean that a replicated stream has no
 *		leader: "no responders" with agog_nats.stream_replicas above 1, for a
 *		stream JetStream did not refuse to create.  Two of three servers down
 *		leave a stream leaderless for as long as they are down, so such a
 *		refusal never makes a report dead; the report is tried again every
 *		BACKOFF_MAX_MS.  A stream the server refused to create (at the last
 *		reconcile, which comes before the first drain of a worker) is not
 *		leaderless: its reports go dead as with one replica, and do not fill
 *		the outbox up to agog_nats.outbox_max_pending.  Runs in the worker.
 */
static bool
leaderless(const AgogError *err, const char *stream)
{
	return agog_stream_replicas > 1 && agog_error_no_responders(err) &&
		!(stream != NULL && agog_stream_create_refused(stream));
}

/*
 * batch_finish
 *		Wait for the answers of a sent batch and record every outcome
 *		(transaction 2), then free the batch.  Returns false when the wait
 *		was interrupted by a shutdown request.  Runs in the worker, outside
 *		any transaction.
 */
static bool
batch_finish(AgogConn *conn, DrainBatch *b)
{
	MemoryContext old = MemoryContextSwitchTo(b->cxt);
	uint64		published = 0;
	uint64		dead = 0;
	AgogError	err;
	Outcomes	outcomes;

	if (b->nitems > 0 && !agog_conn_publish_wait(conn, b->items, &err))
		b->interrupted = true;

	/* Transaction 2: record every outcome (array set-up needs a transaction). */
	agog_xact_begin(b->cxt);
	outcomes_init(&outcomes);
	for (int i = 0; i < b->n; i++)
	{
		Claimed    *row = &b->rows[i];

		if (row->found_seq != 0)
		{
			/* an earlier send was stored: found by its message id */
			record_outcome(&outcomes, row->id, "published", row->stream,
						   row->found_seq, true, NULL, 0);
			published++;
		}
		else if (row->unresolved && !b->interrupted)
			record_outcome(&outcomes, row->id, "pending", NULL, 0, false,
						   "could not check whether an earlier send was stored",
						   backoff_ms(row->attempts));
	}
	for (int k = 0; k < b->nitems; k++)
	{
		Claimed    *row = &b->rows[b->item_row[k]];
		AgogPubItem *it = &b->items[k];

		if (b->interrupted && it->outcome == AGOG_PUB_UNKNOWN)
			continue;			/* the lease runs out; it is retried */
		if (it->outcome == AGOG_PUB_STORED)
		{
			record_outcome(&outcomes, row->id, "published", it->stream, it->seq,
						   it->duplicate, NULL, 0);
			published++;
		}
		else if (it->outcome == AGOG_PUB_REFUSED &&
				 (it->err.sqlstate == ERRCODE_PROGRAM_LIMIT_EXCEEDED ||
				  (row->attempts >= REFUSALS_BEFORE_DEAD && !leaderless(&it->err, row->stream))))
		{
			record_outcome(&outcomes, row->id, "dead", NULL, 0, false, it->err.text, 0);
			dead++;
		}
		else
			record_outcome(&outcomes, row->id, "pending", NULL, 0, false,
						   it->err.text[0] ? it->err.text : "no acknowledgement from JetStream",
						   backoff_ms(row->attempts));
	}
	flush_outcomes(&outcomes);
	agog_xact_commit(b->cxt);

	LWLockAcquire(agog_shared->lock, LW_EXCLUSIVE);
	agog_shared->reports_published += published;
	agog_shared->reports_dead += dead;
	agog_shared->last_drain_at = GetCurrentTimestamp();
	LWLockRelease(agog_shared->lock);

	MemoryContextSwitchTo(old);
	MemoryContextDelete(b->cxt);
	b->cxt = NULL;
	return !b->interrupted;
}

/*
 * agog_outbox_drain
 *		Claim, publish and record up to max_batches batches, two in flight:
 *		while the acks of one arrive, the next is claimed and sent, then the
 *		first is recorded.  *more is set when the last batch was full.
 *		Returns the number of rows claimed (0 when nothing was due or the
 *		drain was interrupted).  Runs in the worker, outside any
 *		transaction; all memory of the batches is freed before it returns.
 *		If it throws, the worker exits: the rows' leases run out and they are
 *		retried.
 */
int
agog_outbox_drain(AgogConn *conn, int max_batches, bool *more)
{
	MemoryContext caller = CurrentMemoryContext;
	DrainBatch	pair[2];
	DrainBatch *cur = &pair[0];
	DrainBatch *next = &pair[1];
	int			total;
	int			batches = 1;
	bool		ok = true;

	*more = false;
	total = batch_claim_send(conn, cur, caller);
	if (total == 0)
		return 0;
	for (;;)
	{
		bool		go_on = cur->n == AGOG_DRAIN_BATCH && !cur->interrupted &&
			batches < max_batches;
		int			n = 0;

		if (go_on)
		{
			n = batch_claim_send(conn, next, caller);
			total += n;
			batches++;
		}
		*more = (n == 0) ? (cur->n == AGOG_DRAIN_BATCH) : (n == AGOG_DRAIN_BATCH);
		ok &= batch_finish(conn, cur);
		if (n == 0)
			break;
		if (!ok)
		{
			(void) batch_finish(conn, next);
			break;
		}
		cur = next;
		next = (cur == &pair[0]) ? &pair[1] : &pair[0];
	}
	MemoryContextSwitchTo(caller);
	if (!ok)
		*more = false;
	return ok ? total : 0;
}

/*
 * agog_outbox_maintain
 *		Count the pending rows (for the depth cap) and, when purge is set,
 *		delete published rows older than agog_nats.published_retention.
 *		Returns the milliseconds until the next pending row is due (-1 when
 *		none).  Runs in the worker.
 */
long
agog_outbox_maintain(bool purge)
{
	MemoryContext cxt = CurrentMemoryContext;
	int			ret;
	bool		isnull;
	int64		pending;
	int64		due_ms = -1;
	Datum		d;

	agog_xact_begin(cxt);
	ret = SPI_execute("SELECT count(*),"
					  "       (extract(epoch FROM min(next_attempt_at) - now()) * 1000)::bigint,"
					  "       min(next_attempt_at) FILTER (WHERE attempts > 0 AND next_attempt_at > now())"
					  "  FROM agog_nats.outbox WHERE state = 'pending'",
					  true, 1);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not count the outbox: %s", SPI_result_code_string(ret));
	pending = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);
	if (!isnull)
		due_ms = Max(0, DatumGetInt64(d));

	/*
	 * The next retry or lease to run out: rows below the claim cursor, so
	 * the claim must start from the lowest id then.  A full scan forgets
	 * the deadlines it passed; this brings back the later ones.
	 */
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3, &isnull);
	if (!isnull)
		claim_rescan_at = Min(claim_rescan_at, DatumGetTimestampTz(d));

	if (purge)
	{
		Oid			argtypes[2] = {INT4OID, INT4OID};
		Datum		args[2];

		args[0] = Int32GetDatum(agog_published_retention_s);
		args[1] = Int32GetDatum(PURGE_BATCH);
		ret = SPI_execute_with_args("DELETE FROM agog_nats.outbox WHERE id = ANY (ARRAY("
									"  SELECT id FROM agog_nats.outbox"
									"   WHERE state = 'published'"
									"     AND published_at < now() - $1 * interval '1 second'"
									"   LIMIT $2))",
									2, argtypes, args, NULL, false, 0);
		if (ret != SPI_OK_DELETE)
			elog(ERROR, "could not purge the outbox: %s", SPI_result_code_string(ret));
	}
	agog_xact_commit(cxt);

	pg_atomic_write_u64(&agog_shared->outbox_pending, (uint64) pending);
	return (long) due_ms;
}
