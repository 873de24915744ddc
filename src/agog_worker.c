/*-------------------------------------------------------------------------
 *
 * agog_worker.c
 *		The agog_nats background worker: holds the JetStream connection and
 *		keeps the agent streams in place.
 *
 * One worker per cluster, connected to agog_nats.database, started once
 * recovery has finished (so on the primary only, and after a promotion).
 * Its loop: apply a reload, connect (with backoff) while disconnected, check
 * the streams after every (re)connect, agents change and every half minute
 * (and, through agog_worker_stream_missing, before the drain sends a claim
 * that names a stream not yet in place), then wait on its latch and on
 * nats.c's event pipe until the next deadline.
 *
 * SIGTERM only sets a flag; every NATS wait is cut in slices that check it,
 * so the worker stops within a slice.  A fault throws, and the uncaught ERROR
 * ends the worker with exit code 1, so the postmaster starts it again.
 *
 * Copyright (c) 2026, agog_nats developers
 *
 * src/agog_worker.c
 *
 *-------------------------------------------------------------------------
 */
#include "agog_nats.h"

#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "access/xact.h"
#include "catalog/pg_extension.h"
#include "commands/extension.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "catalog/namespace.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

PGDLLEXPORT void agog_worker_main(Datum main_arg);

PG_FUNCTION_INFO_V1(agog_worker_status);

#define RESTART_SECONDS			5
#define RECHECK_STREAMS_MS		30000
#define EXTENSION_POLL_MS		2000
#define BACKOFF_MIN_MS			250
#define BACKOFF_MAX_MS			5000
#define OUTBOX_POLL_MS			1000
#define NOTICE_POLL_MS			5000
#define DRAIN_SLICE_MS			500
#define DRAIN_BATCHES			8	/* per call, two in flight */
#define WORKFLOW_POLL_MS		1000

/* What the worker last logged, so it logs once per change of state. */
typedef enum LoggedState
{
	LOGGED_NONE,
	LOGGED_NO_EXTENSION,
	LOGGED_CONNECTED,
	LOGGED_DOWN,
} LoggedState;

/* The agent streams, as the worker last put them in place. */
static struct
{
	bool		needed;			/* check them at the next chance */
	bool		tried;			/* checked since the last (re)connect */
	uint64		generation;		/* the agents generation they match */
	TimestampTz next_try;		/* not before this, after a failure */
	TimestampTz checked;		/* the last check */
} streams = {true, false, 0, 0, 0};

/* The last NATS error the worker logged, so it logs each once. */
static char logged_error[AGOG_ERROR_LEN] = "";

/*
 * agog_register_worker
 *		Register the one worker.  Runs in _PG_init, in the postmaster.
 */
void
agog_register_worker(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = RESTART_SECONDS;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "agog_nats");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "agog_worker_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "agog_nats worker");
	snprintf(worker.bgw_type, BGW_MAXLEN, "agog_nats worker");
	worker.bgw_main_arg = (Datum) 0;
	worker.bgw_notify_pid = 0;
	RegisterBackgroundWorker(&worker);
}

/* Between NATS wait slices: give up when asked to stop. */
static bool
worker_interrupted(void)
{
	return ShutdownRequestPending;
}

/*
 * worker_detach
 *		before_shmem_exit hook: take the worker out of the shared state.
 */
static void
worker_detach(int code, Datum arg)
{
	LWLockAcquire(agog_shared->lock, LW_EXCLUSIVE);
	if (agog_shared->worker_pid == MyProcPid)
	{
		agog_shared->worker_pid = 0;
		agog_shared->worker_latch = NULL;
		agog_shared->connected = false;
	}
	LWLockRelease(agog_shared->lock);
}

/*
 * extension_installed
 *		Whether CREATE EXTENSION agog_nats has run in this database, and
 *		whether its version has the outbox (0.2.0 on) and the workflow
 *		engine (0.3.0 on).  Opens a short
 *		transaction of its own.
 */
static bool
extension_installed(bool *has_outbox, bool *has_workflows)
{
	MemoryContext caller = CurrentMemoryContext;
	bool		found;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	found = OidIsValid(get_extension_oid("agog_nats", true));
	*has_outbox = *has_workflows = false;
	if (found)
	{
		Oid			nsp = get_namespace_oid("agog_nats", true);

		*has_outbox = OidIsValid(nsp) && OidIsValid(get_relname_relid("outbox", nsp));
		*has_workflows = OidIsValid(nsp) && OidIsValid(get_relname_relid("tasks", nsp));
	}
	CommitTransactionCommand();
	/* commit leaves TopMemoryContext current; go back to the loop's */
	MemoryContextSwitchTo(caller);
	return found;
}

/*
 * set_connected
 *		Publish the connection state in shared memory: connected or not, the
 *		server, and since when.  A reconnect (to the same server or another)
 *		starts a new connected_since, also when the worker saw the disconnect
 *		and the reconnect together.  Runs in the worker's main loop.
 */
static void
set_connected(AgogConn *conn, bool connected, bool reconnected)
{
	char		server[AGOG_SERVER_LEN];

	server[0] = '\0';
	if (connected)
		agog_conn_server(conn, server, sizeof(server));
	LWLockAcquire(agog_shared->lock, LW_EXCLUSIVE);
	if (connected && (!agog_shared->connected || reconnected))
		agog_shared->connected_since = GetCurrentTimestamp();
	agog_shared->connected = connected;
	strlcpy(agog_shared->server, server, sizeof(agog_shared->server));
	LWLockRelease(agog_shared->lock);
}

/*
 * ms_until
 *		Milliseconds from now until when (0 if past), for a latch timeout.
 */
static long
ms_until(TimestampTz when)
{
	long		secs;
	int			usecs;

	if (when <= GetCurrentTimestamp())
		return 0;
	TimestampDifference(GetCurrentTimestamp(), when, &secs, &usecs);
	return secs * 1000 + usecs / 1000 + 1;
}

/*
 * ready_to_publish
 *		Whether the worker may send on conn: connected, and the streams have
 *		been tried since the last (re)connect (a stream one agent cannot have
 *		does not hold up the others).  Runs in the worker's main loop; the
 *		worker is the only writer of agog_shared->connected, so it reads its
 *		own value without the lock.
 */
static inline bool
ready_to_publish(AgogConn *conn)
{
	return conn != NULL && agog_shared->connected && streams.tried;
}

/*
 * put_streams_in_place
 *		Create or update the agent streams to match agog_nats.agents as of
 *		generation (read before), and keep the outcome in the worker's state
 *		and in shared memory; a failure is logged once per distinct error
 *		and tried again after a second.  Runs in the worker's main thread,
 *		outside any transaction, while connected.
 */
static void
put_streams_in_place(AgogConn *conn, uint64 generation)
{
	AgogError	err;
	int			ok;
	int			failed;
	bool		all_ok = agog_reconcile_streams(conn, &ok, &failed, &err);

	streams.tried = true;
	if (all_ok)
	{
		streams.needed = false;
		streams.generation = generation;
		if (logged_error[0] != '\0')
			ereport(LOG,
					(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
					 errmsg("agog_nats worker has all %d agent streams in place", ok)));
		logged_error[0] = '\0';
	}
	else if (!ShutdownRequestPending)
	{
		if (strcmp(logged_error, err.text) != 0)
			ereport(WARNING,
					(errcode(err.sqlstate),
					 errmsg("agog_nats worker could not put %d of %d agent streams in place, retrying",
							failed, ok + failed),
					 errdetail_internal("The NATS client reported: %s.", err.text)));
		strlcpy(logged_error, err.text, sizeof(logged_error));
		agog_shared_set_error(err.text);
		streams.next_try = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), 1000);
	}
	streams.checked = GetCurrentTimestamp();
	LWLockAcquire(agog_shared->lock, LW_EXCLUSIVE);
	agog_shared->streams_checked_at = streams.checked;
	agog_shared->streams_ok = ok;
	agog_shared->streams_failed = failed;
	LWLockRelease(agog_shared->lock);
}

/*
 * agog_worker_stream_missing
 *		Called by the drain after a claim commits, before anything it claimed
 *		is sent, for a claimed report whose stream the last reconcile did not
 *		put in place: reconcile now.  The reconcile reads the agents after
 *		the claim, so it sees the agent of every report the claim saw, and a
 *		new agent's first report does not go out before its stream exists
 *		(sent earlier, it would be refused, wait out a backoff, and land
 *		after the agent's next report on its subject).  The agents
 *		generation alone cannot tell: it moves in the agent's commit
 *		callback, after the commit became visible.  A stream still missing
 *		afterwards is not asked for again until the agents change, so rows
 *		of a deleted agent do not make every batch reconcile.  Runs in the
 *		worker's main thread, outside any transaction.
 */
void
agog_worker_stream_missing(AgogConn *conn, const char *stream)
{
	uint64		generation = pg_atomic_read_u64(&agog_shared->agents_generation);

	if (agog_stream_absent(stream, generation) || !agog_shared->connected ||
		GetCurrentTimestamp() < streams.next_try)
		return;
	put_streams_in_place(conn, generation);
	if (!agog_stream_in_place(stream))
		agog_stream_note_absent(stream, generation);
}

/*
 * release_free_memory
 *		Give the pages malloc keeps free back to the kernel, once the outbox
 *		is drained.  A drain holds two batches of reports in flight (in its
 *		memory contexts and in nats.c's messages, about 10 MB for 20 KB
 *		reports); freed, they stay in malloc's arenas, scattered among live
 *		blocks, and the worker's resident memory would stay at its high-water
 *		mark.  Runs in the worker's main thread, between drains.
 */
static void
release_free_memory(void)
{
#ifdef __GLIBC__
	(void) malloc_trim(0);
#endif
}

/*
 * agog_worker_main
 *		Entry point of the background worker.
 */
void
agog_worker_main(Datum main_arg)
{
	MemoryContext loop_cxt;
	AgogConn   *conn = NULL;
	char	   *conn_url = NULL;
	LoggedState logged = LOGGED_NONE;
	uint64		drained_since_trim = 0;
	uint64		seen_wgen = 0;
	TimestampTz stepped_at = 0;
	TimestampTz step_due = 0;
	uint64		seen_reconnects = 0;
	uint64		seen_disconnects = 0;
	uint64		seen_bells = 0;
	TimestampTz notices_checked = 0;
	TimestampTz notices_due = 0;
	int			backoff_ms = BACKOFF_MIN_MS;
	TimestampTz next_connect = 0;
	TimestampTz outbox_checked = 0;
	bool		leases_released = false;
	bool		has_outbox = false;
	bool		has_workflows = false;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();

	if (agog_shared == NULL)
		elog(ERROR, "agog_nats shared state is not initialized");

	BackgroundWorkerInitializeConnection(agog_database, NULL, 0);

	/*
	 * The worker's commits are synchronous whatever the configuration says:
	 * a claim's commit record follows those of the reports it claims, so
	 * flushing it before publishing makes sure that nothing reaches JetStream
	 * whose transaction (or outbox id) a crash could still take back.  (The
	 * record of a batch alone sets it off for its own transaction: see
	 * flush_outcomes in agog_outbox.c.)
	 */
	SetConfigOption("synchronous_commit", "on", PGC_SUSET, PGC_S_SESSION);

	/*
	 * The worker runs as the bootstrap superuser, and its own statements
	 * name functions and operators (now(), =) without a schema.  The
	 * search_path the database's settings give it is the database owner's
	 * to choose, and a schema of theirs before pg_catalog would have the
	 * worker run their functions as superuser.  Pinned, as a session value
	 * above the database's and role's settings, to what the extension's own
	 * functions pin for themselves (every object of the extension it uses is
	 * named with its schema).
	 */
	SetConfigOption("search_path", "pg_catalog, pg_temp", PGC_SUSET, PGC_S_SESSION);

	/*
	 * No JIT: it is decided per execution from the plan's estimated cost and
	 * costs milliseconds each time, where the worker's statements are short
	 * and run thousands of times a minute.  A plan made with a scan turned
	 * off (the claim's and the record's are) may carry the planner's
	 * penalty for it in its cost, past any jit_above_cost.
	 */
	SetConfigOption("jit", "off", PGC_SUSET, PGC_S_SESSION);
	pgstat_report_appname("agog_nats worker");

	LWLockAcquire(agog_shared->lock, LW_EXCLUSIVE);
	agog_shared->worker_pid = MyProcPid;
	agog_shared->worker_latch = MyLatch;
	agog_shared->worker_dboid = MyDatabaseId;	/* commits elsewhere leave the claim floor */
	agog_shared->connected = false;
	/* what an earlier worker saw no longer holds */
	agog_shared->streams_checked_at = 0;
	agog_shared->streams_ok = 0;
	agog_shared->streams_failed = 0;
	LWLockRelease(agog_shared->lock);
	before_shmem_exit(worker_detach, (Datum) 0);

	agog_conn_set_interrupt_check(worker_interrupted);
	loop_cxt = AllocSetContextCreate(TopMemoryContext, "agog_nats worker loop",
									 ALLOCSET_DEFAULT_SIZES);
	ereport(LOG,
			(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
			 errmsg("agog_nats worker started in database \"%s\"", agog_database)));

	while (!ShutdownRequestPending)
	{
		long		timeout = RECHECK_STREAMS_MS;
		int			events = WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH;
		TimestampTz now;

		MemoryContextReset(loop_cxt);
		MemoryContextSwitchTo(loop_cxt);

		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			if (conn != NULL && strcmp(conn_url, agog_conn_settings()) != 0)
			{
				size_t		urllen = strlen(agog_url);
				bool		url_changed = strncmp(conn_url, agog_url, urllen) != 0 ||
					conn_url[urllen] != '|';

				if (url_changed)
					ereport(LOG,
							(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
							 errmsg("agog_nats.url changed, reconnecting to NATS")));
				else
					ereport(LOG,
							(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
							 errmsg("agog_nats authentication settings changed, reconnecting to NATS")));
				agog_conn_close(conn);
				conn = NULL;
				set_connected(NULL, false, false);
				next_connect = 0;
				backoff_ms = BACKOFF_MIN_MS;
			}
			streams.needed = true;
		}

		if (!extension_installed(&has_outbox, &has_workflows))
		{
			if (logged != LOGGED_NO_EXTENSION)
				ereport(LOG,
						(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
						 errmsg("agog_nats worker is waiting for CREATE EXTENSION agog_nats in database \"%s\"",
								agog_database)));
			logged = LOGGED_NO_EXTENSION;
			timeout = EXTENSION_POLL_MS;
			goto wait;
		}

		now = GetCurrentTimestamp();
		if (conn == NULL && now >= next_connect)
		{
			AgogError	err;

			/* the connection itself lives in TopMemoryContext */
			conn = agog_conn_open(agog_url, "agog_nats worker", true, &err);
			if (conn == NULL)
			{
				if (ShutdownRequestPending)
					break;
				if (logged != LOGGED_DOWN || strcmp(logged_error, err.text) != 0)
					ereport(WARNING,
							(errcode(err.sqlstate),
							 errmsg("agog_nats worker could not connect to NATS, retrying"),
							 errdetail_internal("The NATS client reported: %s.", err.text)));
				logged = LOGGED_DOWN;
				strlcpy(logged_error, err.text, sizeof(logged_error));
				agog_shared_set_error(err.text);
				next_connect = TimestampTzPlusMilliseconds(now, backoff_ms);
				backoff_ms = Min(backoff_ms * 2, BACKOFF_MAX_MS);
			}
			else
			{
				AgogConnEvents ev;

				if (conn_url != NULL)
					pfree(conn_url);
				conn_url = MemoryContextStrdup(TopMemoryContext, agog_conn_settings());
				agog_conn_take_events(conn, &ev);
				seen_reconnects = ev.reconnects;
				seen_disconnects = ev.disconnects;
				set_connected(conn, true, false);
				LWLockAcquire(agog_shared->lock, LW_EXCLUSIVE);
				agog_shared->max_payload = agog_conn_max_payload(conn);
				LWLockRelease(agog_shared->lock);
				ereport(LOG,
						(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
						 errmsg("agog_nats worker connected to NATS at %s",
								agog_shared->server)));
				logged = LOGGED_CONNECTED;
				backoff_ms = BACKOFF_MIN_MS;
				streams.needed = true;
				streams.tried = false;
				streams.next_try = 0;
			}
		}

		if (conn != NULL)
		{
			AgogConnEvents ev;
			uint64		generation;
			bool		reconnected;

			agog_conn_take_events(conn, &ev);
			if (ev.disconnects != seen_disconnects)
			{
				LWLockAcquire(agog_shared->lock, LW_EXCLUSIVE);
				agog_shared->disconnects += ev.disconnects - seen_disconnects;
				LWLockRelease(agog_shared->lock);
				seen_disconnects = ev.disconnects;
			}
			reconnected = (ev.reconnects != seen_reconnects);
			if (reconnected)
			{
				LWLockAcquire(agog_shared->lock, LW_EXCLUSIVE);
				agog_shared->reconnects += ev.reconnects - seen_reconnects;
				LWLockRelease(agog_shared->lock);
				seen_reconnects = ev.reconnects;
				/* the server may have lost the notice consumer: bind again */
				agog_conn_notices_reset(conn);
				/* a server restarted on an empty store has no streams */
				streams.needed = true;
				streams.tried = false;
				streams.next_try = 0;
				/* another server of the cluster may announce another limit */
				LWLockAcquire(agog_shared->lock, LW_EXCLUSIVE);
				agog_shared->max_payload = agog_conn_max_payload(conn);
				LWLockRelease(agog_shared->lock);
			}
			if (!agog_conn_is_usable(conn))
			{
				ereport(LOG, (errcode(ERRCODE_SUCCESSFUL_COMPLETION), errmsg("agog_nats worker's NATS connection was closed")));
				agog_conn_close(conn);
				conn = NULL;
				set_connected(NULL, false, false);
				next_connect = 0;
				goto wait;
			}

			{
				bool		up = agog_conn_is_connected(conn);

				/*
				 * A reconnect may come between two wake-ups with its
				 * disconnect, to another server of the cluster: record the
				 * server it is connected to now.
				 */
				if (up != agog_shared->connected || (up && reconnected))
				{
					set_connected(conn, up, reconnected);
					if (up)
						ereport(LOG,
								(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
								 errmsg("agog_nats worker reconnected to NATS at %s",
										agog_shared->server)));
					else
						ereport(LOG,
								(errcode(ERRCODE_SUCCESSFUL_COMPLETION),
								 errmsg("agog_nats worker lost its NATS connection, reconnecting")));
					logged = up ? LOGGED_CONNECTED : LOGGED_DOWN;
					logged_error[0] = '\0';
				}
			}

			generation = pg_atomic_read_u64(&agog_shared->agents_generation);
			if (generation != streams.generation)
				streams.needed = true;
			now = GetCurrentTimestamp();
			if (streams.checked != 0 &&
				TimestampDifferenceExceeds(streams.checked, now, RECHECK_STREAMS_MS))
				streams.needed = true;
			if (streams.needed && agog_shared->connected && now >= streams.next_try)
				put_streams_in_place(conn, generation);
		}

		/* Time out, retry and dispatch workflow tasks, connected or not. */
		if (has_workflows)
		{
			bool		notices_applied = false;
			uint64		wgen;

			if (ready_to_publish(conn))
			{
				AgogConnEvents ev;

				/*
				 * Completion notices from agents that speak only NATS: when
				 * the doorbell rang, and every few seconds in case a notice
				 * arrived while the doorbell was not subscribed.
				 */
				agog_conn_take_events(conn, &ev);
				now = GetCurrentTimestamp();
				if (ev.bells != seen_bells || notices_checked == 0 ||
					(notices_due != 0 && now >= notices_due) ||
					TimestampDifferenceExceeds(notices_checked, now, NOTICE_POLL_MS))
				{
					bool		rung = (ev.bells != seen_bells);
					long		again_ms;

					seen_bells = ev.bells;
					notices_checked = now;
					if (agog_notices_consume(conn, rung, &again_ms) > 0)
					{
						timeout = 0;	/* there may be more */
						notices_applied = true;
					}
					/*
					 * Notices put back ring no doorbell: fetch when they are
					 * due, counted from the end of the batch, after the naks.
					 */
					if (again_ms >= 0)
						notices_due = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), again_ms);
					else if (notices_due != 0 && now >= notices_due)
						notices_due = 0;
				}
				if (notices_due != 0)
					timeout = Min(timeout, Max(ms_until(notices_due), 10));
			}

			/*
			 * One orchestration step when something may have changed: a
			 * commit of tasks or workflows by another session (the workflow
			 * generation moved; read before the step, so a commit during it
			 * brings another), a notice applied here, the step's own next
			 * deadline or retry, and at least once a second (retention,
			 * message ids of reports published since).  Not on every
			 * wake-up: each report committed wakes the worker, and a step is
			 * a few milliseconds of PL/pgSQL that its publication would wait
			 * for.
			 */
			wgen = pg_atomic_read_u64(&agog_shared->workflow_generation);
			now = GetCurrentTimestamp();
			if (stepped_at == 0 || wgen != seen_wgen || notices_applied ||
				(step_due != 0 && now >= step_due) ||
				TimestampDifferenceExceeds(stepped_at, now, WORKFLOW_POLL_MS))
			{
				long		due;

				/*
				 * Publish what is queued first, so that a notice dispatched
				 * now can name the message id of a report its upstream stage
				 * just committed.  Only before a step: on every wake-up it
				 * was a second claim for each report committed, which the
				 * outbox's own drain below then found nothing for.
				 */
				if (has_outbox && ready_to_publish(conn))
				{
					bool		more;

					(void) agog_outbox_drain(conn, 1, &more);
					now = GetCurrentTimestamp();	/* it may have waited for acks */
				}
				seen_wgen = wgen;
				stepped_at = now;
				due = agog_workflow_step();
				step_due = due >= 0 ? TimestampTzPlusMilliseconds(now, due) : 0;
			}
			if (step_due != 0)
				timeout = Min(timeout, Max(ms_until(step_due), 10));
			timeout = Min(timeout, WORKFLOW_POLL_MS);
		}

		if (has_outbox)
		{
			bool		more = false;

			if (!leases_released)
			{
				agog_outbox_release_leases();
				leases_released = true;
			}
			/*
			 * Drain while connected, once the streams have been checked since
			 * the last (re)connect; one agent whose stream cannot be created
			 * must not hold up the others' reports.
			 */
			if (ready_to_publish(conn))
			{
				TimestampTz start = GetCurrentTimestamp();

				do
				{
					MemoryContextReset(loop_cxt);
					drained_since_trim += agog_outbox_drain(conn, DRAIN_BATCHES, &more);
				} while (more && !ShutdownRequestPending && !ConfigReloadPending &&
						 !TimestampDifferenceExceeds(start, GetCurrentTimestamp(), DRAIN_SLICE_MS));
			}
			now = GetCurrentTimestamp();
			if (more)
				timeout = 0;
			else if (outbox_checked == 0 ||
					 TimestampDifferenceExceeds(outbox_checked, now, OUTBOX_POLL_MS))
			{
				long		due = agog_outbox_maintain(true);

				if (drained_since_trim > 0)
				{
					release_free_memory();
					drained_since_trim = 0;
				}

				outbox_checked = now;
				if (due >= 0 && conn != NULL && agog_shared->connected)
					timeout = Min(timeout, Max(due, 10));
			}
			timeout = Min(timeout, OUTBOX_POLL_MS);
		}

		if (conn == NULL)
			timeout = Min(timeout, ms_until(next_connect));
		else if (streams.needed)
			timeout = Min(timeout, Max(ms_until(streams.next_try), 100));

wait:
		if (conn != NULL && agog_conn_event_fd(conn) >= 0)
			events |= WL_SOCKET_READABLE;
		if (!ShutdownRequestPending)
			(void) WaitLatchOrSocket(MyLatch, events,
									 conn != NULL ? agog_conn_event_fd(conn) : PGINVALID_SOCKET,
									 timeout, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}

	MemoryContextSwitchTo(TopMemoryContext);
	agog_conn_close(conn);
	ereport(LOG, (errcode(ERRCODE_SUCCESSFUL_COMPLETION), errmsg("agog_nats worker shutting down")));
	/* exit 1: the postmaster restarts it unless the cluster is stopping */
	proc_exit(1);
}

/*
 * agog_worker_status
 *		One row: the worker's pid (NULL when it is not running) and its NATS
 *		connection's health.  Runs in a backend; reads shared state only.
 */
Datum
agog_worker_status(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[11];
	bool		nulls[11] = {false};
	AgogSharedState snap;

	agog_shmem_attach();
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	LWLockAcquire(agog_shared->lock, LW_SHARED);
	memcpy(&snap, agog_shared, sizeof(snap));
	LWLockRelease(agog_shared->lock);

	values[0] = Int32GetDatum(snap.worker_pid);
	nulls[0] = snap.worker_pid == 0;
	values[1] = BoolGetDatum(snap.worker_pid != 0 && snap.connected);
	values[2] = CStringGetTextDatum(snap.server);
	nulls[2] = !snap.connected || snap.server[0] == '\0';
	values[3] = TimestampTzGetDatum(snap.connected_since);
	nulls[3] = !snap.connected || snap.connected_since == 0;
	values[4] = Int64GetDatum((int64) snap.reconnects);
	values[5] = Int64GetDatum((int64) snap.disconnects);
	values[6] = TimestampTzGetDatum(snap.streams_checked_at);
	nulls[6] = snap.streams_checked_at == 0;
	values[7] = Int32GetDatum(snap.streams_ok);
	values[8] = Int32GetDatum(snap.streams_failed);
	values[9] = CStringGetTextDatum(snap.last_error);
	nulls[9] = snap.last_error[0] == '\0';
	values[10] = TimestampTzGetDatum(snap.last_error_at);
	nulls[10] = snap.last_error_at == 0;

	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}
