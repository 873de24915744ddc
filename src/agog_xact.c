/*-------------------------------------------------------------------------
 *
 * agog_xact.c
 *		The worker's short transactions.
 *
 * The worker runs outside any transaction and opens one per step (read the
 * agents, claim a batch, record outcomes, apply a notice, orchestrate).
 * StartTransactionCommand and CommitTransactionCommand switch memory
 * contexts; these helpers bring the caller's context back, so what a step
 * allocates lives in the worker's loop context and is freed with it.
 *
 * Copyright (c) 2026, agog_nats developers
 *
 * src/agog_xact.c
 *
 *-------------------------------------------------------------------------
 */
#include "agog_nats.h"

#include "access/xact.h"
#include "catalog/pg_extension.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "pgstat.h"
#include "storage/lmgr.h"
#include "utils/snapmgr.h"

/*
 * agog_xact_begin
 *		Start a transaction with a snapshot and connect to SPI.  Runs in the
 *		worker, outside any transaction; cxt is the caller's context.
 *
 *		The transaction first takes a share lock on the extension, as DROP
 *		EXTENSION takes an exclusive one before it drops the extension's
 *		tables: a drop then waits for the worker's transaction (or the
 *		worker for the drop).  Without it the two locked tables in opposite
 *		orders and one of them died of a deadlock.
 */
void
agog_xact_begin(MemoryContext cxt)
{
	Oid			extoid;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	extoid = get_extension_oid("agog_nats", true);
	if (OidIsValid(extoid))
		LockDatabaseObject(ExtensionRelationId, extoid, 0, AccessShareLock);
	PushActiveSnapshot(GetTransactionSnapshot());
	MemoryContextSwitchTo(cxt);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
}

/*
 * agog_xact_commit
 *		Disconnect from SPI and commit; back in cxt.
 *
 *		Then hand the transaction's table statistics to the cumulative
 *		statistics system, as a backend does when it goes idle: a
 *		background worker must do it itself.  Without it autovacuum never
 *		learnt of the dead rows the claims and records leave in the outbox,
 *		and every claim walked more dead index entries than the last.  The
 *		call does nothing until a second has passed since the last flush.
 */
void
agog_xact_commit(MemoryContext cxt)
{
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	(void) pgstat_report_stat(false);
	MemoryContextSwitchTo(cxt);
}
