/*-------------------------------------------------------------------------
 *
 * agog_shmem.c
 *		State shared by the backends and the background worker.
 *
 * The worker publishes its pid, latch and connection health here under the
 * lock; backends read them for agog_worker_status() and set the worker's
 * latch to wake it.  The agents generation is an atomic counter that a
 * committing transaction which changed agog_nats.agents bumps.
 *
 * Copyright (c) 2026, agog_nats developers
 *
 * src/agog_shmem.c
 *
 *-------------------------------------------------------------------------
 */
#include "agog_nats.h"

#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/shmem.h"
#include "utils/timestamp.h"

#define AGOG_TRANCHE "agog_nats"

AgogSharedState *agog_shared = NULL;

/*
 * agog_shmem_request
 *		shmem_request_hook: reserve the struct and one named lock.  Runs in
 *		the postmaster.
 */
void
agog_shmem_request(void)
{
	RequestAddinShmemSpace(MAXALIGN(sizeof(AgogSharedState)));
	RequestNamedLWLockTranche(AGOG_TRANCHE, 1);
}

/*
 * agog_shmem_startup
 *		shmem_startup_hook: create or attach the struct.  Runs in the
 *		postmaster, and in every child under EXEC_BACKEND.
 */
void
agog_shmem_startup(void)
{
	bool		found;

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	agog_shared = ShmemInitStruct("agog_nats shared state",
								  sizeof(AgogSharedState), &found);
	if (!found)
	{
		memset(agog_shared, 0, sizeof(AgogSharedState));
		agog_shared->lock = &(GetNamedLWLockTranche(AGOG_TRANCHE))->lock;
		pg_atomic_init_u64(&agog_shared->agents_generation, 0);
		pg_atomic_init_u64(&agog_shared->claim_floor, PG_UINT64_MAX);
		pg_atomic_init_u64(&agog_shared->workflow_generation, 0);
	}
	LWLockRelease(AddinShmemInitLock);
}

/*
 * agog_shmem_attach
 *		Raise an error when the extension was not preloaded (there is no
 *		shared state to attach to).
 */
void
agog_shmem_attach(void)
{
	if (agog_shared == NULL)
		agog_require_preload();
}

/*
 * agog_wake_worker
 *		Set the worker's latch, if it runs.  Runs in a backend, also at
 *		commit: it takes a shared lock and sets a latch, nothing that fails.
 */
void
agog_wake_worker(void)
{
	if (agog_shared == NULL)
		return;
	LWLockAcquire(agog_shared->lock, LW_SHARED);
	if (agog_shared->worker_latch != NULL)
		SetLatch(agog_shared->worker_latch);
	LWLockRelease(agog_shared->lock);
}

/*
 * agog_shared_set_error
 *		Record the worker's last error for agog_worker_status().
 */
void
agog_shared_set_error(const char *text)
{
	LWLockAcquire(agog_shared->lock, LW_EXCLUSIVE);
	strlcpy(agog_shared->last_error, text, sizeof(agog_shared->last_error));
	agog_shared->last_error_at = GetCurrentTimestamp();
	LWLockRelease(agog_shared->lock);
}
