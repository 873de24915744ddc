/*-------------------------------------------------------------------------
 *
 * agog_workflow.c
 *		The worker's side of the workflow engine.
 *
 * The engine's state and transitions are SQL (agog_nats.orchestrate and
 * agog_nats.apply_notice, in the extension script): every state change is a
 * row change in one transaction, so a crash loses or repeats none.  The
 * worker runs one orchestration step per wake-up, in a transaction of its
 * own: time out overdue tasks, dispatch ready ones (their tiny notices go
 * through the outbox, which the worker drains right after).
 *
 * Copyright (c) 2026, agog_nats developers
 *
 * src/agog_workflow.c
 *
 *-------------------------------------------------------------------------
 */
#include "agog_nats.h"

#include "access/xact.h"
#include "executor/spi.h"
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

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	MemoryContextSwitchTo(cxt);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ret = SPI_execute("SELECT agog_nats.orchestrate()", false, 1);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "agog_nats.orchestrate() failed: %s", SPI_result_code_string(ret));
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	if (!isnull)
		next_ms = (long) DatumGetInt64(d);
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(cxt);
	return next_ms;
}
