/*-------------------------------------------------------------------------
 *
 * agog_workflow.c
 *		The worker's side of the workflow engine.
 *
 * The engine's state and transitions are SQL (agog_nats.orchestrate and
 * agog_nats.apply_notice, in the extension script): every state change is a
 * row change in one transaction, so a crash loses or repeats none.  The
 * worker runs an orchestration step, in a transaction of its own, when
 * tasks or workflows may have changed (see the worker's loop): time out
 * overdue tasks, dispatch ready ones (their tiny notices go through the
 * outbox, which the worker drains right after).
 *
 * Agents that speak only NATS send their completion notices to
 * agog.notices.<agent>.<feature>; the worker consumes them through a durable
 * consumer and acknowledges each one only after the transaction that applied
 * it (or kept it as a bad notice) has committed.
 *
 * Copyright (c) 2026, agog_nats developers
 *
 * src/agog_workflow.c
 *
 *-------------------------------------------------------------------------
 */
#include "agog_nats.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

/*
 * agog_workflow_step
 *		One orchestration step.  Returns the milliseconds until the next
 *		deadline or retry, or -1 when nothing is due.  Runs in the worker,
 *		outside any transaction.
 */
long
agog_workflow_step(void)
{
	MemoryContext cxt = CurrentMemoryContext;
	bool		isnull;
	Datum		d;
	long		next_ms = -1;
	int			ret;

	agog_xact_begin(cxt);
	ret = SPI_execute("SELECT agog_nats.orchestrate()", false, 1);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "agog_nats.orchestrate() failed: %s", SPI_result_code_string(ret));
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	if (!isnull)
		next_ms = (long) DatumGetInt64(d);
	agog_xact_commit(cxt);
	return next_ms;
}

#define NOTICE_BATCH 64
/* a notice whose workflow another session holds comes again after this */
#define NOTICE_BUSY_DELAY_MS 1000
/* and one whose transaction failed (a fault of the system) after this */
#define NOTICE_FAILED_DELAY_MS 5000
/* a notice is filed as bad at this failed try (apply_nats_notice's max_tries) */
#define NOTICE_MAX_TRIES 5

/*
 * The faults of the notices put back after a failed transaction, by their
 * sequence in the notices stream: apply_nats_notice files a notice as bad
 * at its fifth failed try, and JetStream's delivery count would also count
 * the times it was put back because its workflow was busy.  Kept for the
 * worker's life and cleared when the consumer is bound again (a wiped
 * server numbers its messages from 1 again); a restart, or an entry pushed
 * out by FAULTS_KEPT others failing at once, starts a count again (more
 * tries, not fewer).  So that no notice is retried forever, one delivered
 * DELIVERIES_MAX times counts as at its last try whatever the table says.
 */
#define FAULTS_KEPT 256
#define DELIVERIES_MAX 1000

typedef struct NoticeFaults
{
	uint64		seq;			/* 0: a free entry */
	int			faults;
} NoticeFaults;

static NoticeFaults notice_faults[FAULTS_KEPT];
static int	faults_next = 0;

/*
 * faults_of, faults_set, faults_clear
 *		The faults noted for a notice (0 when none); note them (0 forgets
 *		it), in a free entry, else in place of the entry noted longest
 *		ago; forget them all.
 */
static int
faults_of(uint64 seq)
{
	for (int i = 0; i < FAULTS_KEPT; i++)
		if (seq != 0 && notice_faults[i].seq == seq)
			return notice_faults[i].faults;
	return 0;
}

static void
faults_set(uint64 seq, int faults)
{
	int			slot = -1;

	if (seq == 0)
		return;
	for (int i = 0; i < FAULTS_KEPT; i++)
	{
		if (notice_faults[i].seq == seq)
		{
			notice_faults[i].faults = faults;
			if (faults == 0)
				notice_faults[i].seq = 0;
			return;
		}
		if (slot < 0 && notice_faults[i].seq == 0)
			slot = i;
	}
	if (faults == 0)
		return;
	if (slot < 0)
	{
		slot = faults_next;
		faults_next = (faults_next + 1) % FAULTS_KEPT;
	}
	notice_faults[slot].seq = seq;
	notice_faults[slot].faults = faults;
}

static void
faults_clear(void)
{
	memset(notice_faults, 0, sizeof(notice_faults));
	faults_next = 0;
}

typedef enum NoticeOutcome
{
	NOTICE_DONE,				/* applied, a duplicate, or filed as bad */
	NOTICE_BUSY,				/* its workflow or task is locked */
	NOTICE_FAILED				/* its transaction failed */
} NoticeOutcome;

/*
 * apply_notice
 *		Apply one completion notice in a transaction of its own.  Runs in the
 *		worker, outside any transaction, back in cxt after.  An error (a
 *		fault of the system, not of the notice: apply_nats_notice files
 *		those) aborts the transaction and is logged as a warning: the caller
 *		puts the notice back, and the worker goes on with its loop instead
 *		of exiting, so the outbox and the other workflows do not wait for
 *		the restart.  FATAL errors (shutdown) are not caught.
 */
static NoticeOutcome
apply_notice(MemoryContext cxt, const char *subject, const char *body, int tries)
{
	Oid			argtypes[4] = {TEXTOID, TEXTOID, INT4OID, INT4OID};
	Datum		args[4];
	volatile NoticeOutcome outcome = NOTICE_DONE;

	args[0] = CStringGetTextDatum(subject);
	args[1] = CStringGetTextDatum(body);
	args[2] = Int32GetDatum(tries);
	args[3] = Int32GetDatum(NOTICE_MAX_TRIES);

	PG_TRY();
	{
		bool		isnull;
		int			ret;

		agog_xact_begin(cxt);
		ret = SPI_execute_with_args("SELECT agog_nats.apply_nats_notice($1, $2, $3, $4) = 'busy'",
									4, argtypes, args, NULL, false, 1);
		if (ret != SPI_OK_SELECT || SPI_processed != 1)
			elog(ERROR, "agog_nats.apply_nats_notice() failed: %s",
				 SPI_result_code_string(ret));
		if (DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0],
									   SPI_tuptable->tupdesc, 1, &isnull)) && !isnull)
			outcome = NOTICE_BUSY;
		agog_xact_commit(cxt);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		MemoryContextSwitchTo(cxt);
		ereport(WARNING,
				(errcode(edata->sqlerrcode),
				 errmsg("agog_nats worker could not apply a completion notice on \"%s\"", subject),
				 errdetail_internal("%s", edata->message),
				 errhint("The notice comes again in %d seconds (try %d).",
						 NOTICE_FAILED_DELAY_MS / 1000, tries)));
		FreeErrorData(edata);
		outcome = NOTICE_FAILED;
	}
	PG_END_TRY();
	return outcome;
}

/*
 * again
 *		Fetch again once a notice put back with delay_ms is due (a little
 *		after, so that the server has it ready).
 */
static void
again(long *again_ms, int delay_ms)
{
	long		ms = delay_ms + 100;

	if (*again_ms < 0 || ms < *again_ms)
		*again_ms = ms;
}

/*
 * agog_notices_consume
 *		Apply the completion notices waiting in NATS, each in a transaction
 *		of its own, acknowledged after its commit.  rung: the doorbell
 *		announced a notice; otherwise the consumer is asked first.  Returns how many were
 *		applied or filed (0 when none, or when the consumer cannot be reached
 *		now).  A notice whose workflow or task another session has locked is
 *		put back to come again a second later: the worker does not wait for
 *		a lock an open transaction may hold for long; one whose transaction
 *		failed comes again 5 s later.  *again_ms: when to fetch again for
 *		the notices put back (they ring no doorbell), or -1.
 *		Runs in the worker, outside any transaction.
 */
int
agog_notices_consume(AgogConn *conn, bool rung, long *again_ms)
{
	MemoryContext cxt = CurrentMemoryContext;
	AgogNotice	notices[NOTICE_BATCH];
	AgogError	err;
	int			n;
	int			applied = 0;

	*again_ms = -1;
	if (!agog_conn_notices_bound(conn))
	{
		if (!agog_conn_notices_open(conn, &err))
			return 0;			/* the stream may not exist yet; next time */
		faults_clear();			/* the server may number its notices anew */
	}
	/* without the doorbell, ask first: an empty fetch is held until it expires */
	if (!rung && !agog_conn_notices_waiting(conn))
		return 0;
	n = agog_conn_notices_fetch(conn, notices, NOTICE_BATCH, &err);
	if (n < 0)
	{
		/* the consumer may be gone with a wiped server: bind it again */
		agog_conn_notices_reset(conn);
		return 0;
	}

	for (int i = 0; i < n; i++)
	{
		char	   *body = notices[i].body;
		NoticeOutcome outcome;
		int			tries;

		/* a body that is not text is kept as hex, and fails as JSON */
		if (memchr(body, '\0', notices[i].len) != NULL ||
			!pg_verifymbstr(body, notices[i].len, true))
		{
			StringInfoData hex;

			initStringInfo(&hex);
			appendStringInfoString(&hex, "\\x");
			for (int b = 0; b < Min(notices[i].len, 4096); b++)
				appendStringInfo(&hex, "%02x", (unsigned char) body[b]);
			body = hex.data;
		}
		/* tries: the failed ones so far, and this one */
		tries = notices[i].seq != 0 ? faults_of(notices[i].seq) + 1 : notices[i].deliveries;
		if (notices[i].deliveries >= DELIVERIES_MAX)
			tries = Max(tries, NOTICE_MAX_TRIES);
		outcome = apply_notice(cxt, notices[i].subject, body, tries);
		if (outcome == NOTICE_BUSY)
		{
			/* another session holds its workflow or task: again later */
			elog(DEBUG1, "agog_nats: a completion notice on \"%s\" waits for a lock held by another session",
				 notices[i].subject);
			agog_conn_notices_nak(conn, i, NOTICE_BUSY_DELAY_MS);
			again(again_ms, NOTICE_BUSY_DELAY_MS);
		}
		else if (outcome == NOTICE_FAILED)
		{
			faults_set(notices[i].seq, tries);
			agog_conn_notices_nak(conn, i, NOTICE_FAILED_DELAY_MS);
			again(again_ms, NOTICE_FAILED_DELAY_MS);
		}
		else
		{
			faults_set(notices[i].seq, 0);
			agog_conn_notices_ack(conn, i);
			applied++;
		}
	}
	agog_conn_notices_release(conn);
	return applied;
}
