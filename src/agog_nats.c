/*-------------------------------------------------------------------------
 *
 * agog_nats.c
 *		Module load: settings, shared memory, the worker, commit hooks.
 *
 * _PG_init runs in the postmaster when the library is preloaded.  It never
 * opens NATS: the postmaster forks every backend, and nats.c's threads would
 * not survive a fork.  Connections are opened on first use by a backend or
 * by the worker.
 *
 * Copyright (c) 2026, agog_nats developers
 *
 * src/agog_nats.c
 *
 *-------------------------------------------------------------------------
 */
#include "agog_nats.h"

#include "access/xact.h"
#include "commands/trigger.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "utils/guc.h"

PG_MODULE_MAGIC;

/* Settings */
char	   *agog_url = NULL;
char	   *agog_user = NULL;
char	   *agog_password_file = NULL;
char	   *agog_token_file = NULL;
char	   *agog_nkey = NULL;
char	   *agog_nkey_seed_file = NULL;
char	   *agog_credentials_file = NULL;
char	   *agog_tls_ca_file = NULL;
char	   *agog_tls_cert_file = NULL;
char	   *agog_tls_key_file = NULL;
char	   *agog_database = NULL;
int			agog_timeout_ms = 5000;
int			agog_duplicate_window_ms = 120000;
int			agog_stream_replicas = 1;
int			agog_outbox_max_pending = 100000;
int			agog_published_retention_s = 7 * 24 * 3600;
int			agog_task_lease_s = 60;
int			agog_event_retention_s = 30 * 24 * 3600;
int			agog_workflow_retention_s = 30 * 24 * 3600;

/* Set when this transaction changed agog_nats.agents; read at commit. */
static bool agents_changed_in_xact = false;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

void		_PG_init(void);
static void agog_shmem_request_hook(void);
static void agog_shmem_startup_hook(void);
static void agog_xact_callback(XactEvent event, void *arg);

PG_FUNCTION_INFO_V1(agog_assert_preloaded);
PG_FUNCTION_INFO_V1(agog_agents_changed);

/*
 * define_settings
 *		The agog_nats.* settings.  Runs in _PG_init, in the postmaster or in a
 *		backend that loads the library late.
 */
static void
define_settings(void)
{
	DefineCustomStringVariable("agog_nats.url",
							   "NATS servers to connect to, comma-separated.",
							   "Each entry is a URL such as nats://127.0.0.1:4222, "
							   "without credentials: they go in agog_nats.user, "
							   "agog_nats.password_file or agog_nats.token_file.",
							   &agog_url,
							   "nats://127.0.0.1:4222",
							   PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("agog_nats.user",
							   "User name for NATS user/password authentication.",
							   "Its password is read from agog_nats.password_file.",
							   &agog_user,
							   "",
							   PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("agog_nats.password_file",
							   "File holding the NATS password of agog_nats.user.",
							   "Secrets live in files only the server's operating system user can read.",
							   &agog_password_file,
							   "",
							   PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("agog_nats.token_file",
							   "File holding a NATS authentication token.",
							   NULL,
							   &agog_token_file,
							   "",
							   PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("agog_nats.nkey",
							   "Public NKey (U...) for NATS NKey authentication.",
							   "Its seed is read from agog_nats.nkey_seed_file; set both or neither.",
							   &agog_nkey,
							   "",
							   PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("agog_nats.nkey_seed_file",
							   "File holding the seed (SU...) of agog_nats.nkey.",
							   "The seed signs the server's nonce at every connect; it never leaves the file otherwise.",
							   &agog_nkey_seed_file,
							   "",
							   PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("agog_nats.credentials_file",
							   "File of NATS user credentials (.creds: a user JWT and its NKey seed).",
							   "For servers in operator (JWT) mode.  It is read at every connect; the seed signs the server's nonce and never leaves the file otherwise.",
							   &agog_credentials_file,
							   "",
							   PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("agog_nats.tls_ca_file",
							   "File of CA certificates that sign the NATS server's certificate.",
							   "Setting it (or a client certificate) makes the connection use TLS.",
							   &agog_tls_ca_file,
							   "",
							   PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("agog_nats.tls_cert_file",
							   "File of the client certificate (chain) for TLS to NATS.",
							   NULL,
							   &agog_tls_cert_file,
							   "",
							   PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("agog_nats.tls_key_file",
							   "File of the client certificate's private key.",
							   NULL,
							   &agog_tls_key_file,
							   "",
							   PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("agog_nats.database",
							   "Database the agog_nats background worker connects to.",
							   NULL,
							   &agog_database,
							   "postgres",
							   PGC_POSTMASTER,
							   0,
							   NULL, NULL, NULL);

	DefineCustomIntVariable("agog_nats.timeout_ms",
							"Bound on every wait for a NATS server.",
							"Connects, publishes, gets and stream requests give up after this long.",
							&agog_timeout_ms,
							5000, 100, 600000,
							PGC_USERSET,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("agog_nats.duplicate_window",
							"JetStream duplicate window of the agent streams.",
							"A message id seen within this window is stored once.",
							&agog_duplicate_window_ms,
							120000, 1000, 7 * 24 * 3600 * 1000,
							PGC_SIGHUP,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("agog_nats.stream_replicas",
							"Replicas of each agent stream in a JetStream cluster.",
							NULL,
							&agog_stream_replicas,
							1, 1, 5,
							PGC_SIGHUP,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("agog_nats.outbox_max_pending",
							"Most reports that may wait in the outbox to be published.",
							"agog_publish_report fails with an error past it; 0 removes the cap.",
							&agog_outbox_max_pending,
							100000, 0, INT_MAX,
							PGC_SIGHUP,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("agog_nats.published_retention",
							"How long published reports stay in the outbox.",
							"The worker deletes older published rows; pending and dead rows stay.",
							&agog_published_retention_s,
							7 * 24 * 3600, 0, INT_MAX,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("agog_nats.task_lease",
							"Lease of a claimed task, renewed by agog_heartbeat_task.",
							"A running task whose lease runs out is retried.",
							&agog_task_lease_s,
							60, 1, 24 * 3600,
							PGC_USERSET,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("agog_nats.event_retention",
							"How long workflow events are kept.",
							NULL,
							&agog_event_retention_s,
							30 * 24 * 3600, 60, INT_MAX,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("agog_nats.workflow_retention",
							"How long finished workflows, their tasks and notices are kept.",
							NULL,
							&agog_workflow_retention_s,
							30 * 24 * 3600, 60, INT_MAX,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	MarkGUCPrefixReserved("agog_nats");
}

/*
 * _PG_init
 *		Library load.  With shared_preload_libraries: settings, shared memory,
 *		the worker and the commit hook.  Loaded any other way it does nothing;
 *		agog_assert_preloaded() then refuses CREATE EXTENSION.
 */
void
_PG_init(void)
{
	/*
	 * Loaded late (not preloaded), define nothing: agog_nats.database is a
	 * PGC_POSTMASTER setting, which cannot be created after startup, and
	 * every function refuses to run anyway.
	 */
	if (!process_shared_preload_libraries_in_progress)
		return;

	define_settings();

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = agog_shmem_request_hook;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = agog_shmem_startup_hook;

	/* Registered once here; every backend inherits it. */
	RegisterXactCallback(agog_xact_callback, NULL);

	agog_register_worker();
}

/*
 * agog_shmem_request_hook
 *		shmem_request_hook: ask for the extension's shared memory.  Runs in
 *		the postmaster at start, after shared_preload_libraries are loaded.
 */
static void
agog_shmem_request_hook(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	agog_shmem_request();
}

/*
 * agog_shmem_startup_hook
 *		shmem_startup_hook: create or attach the shared state.  Runs in the
 *		postmaster (and in EXEC_BACKEND children); no NATS here.
 */
static void
agog_shmem_startup_hook(void)
{
	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	agog_shmem_startup();
}

/*
 * agog_require_preload
 *		Throw the error that says how to preload the library.
 */
void
agog_require_preload(void)
{
	ereport(ERROR,
			(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
			 errmsg("agog_nats must be loaded via shared_preload_libraries"),
			 errhint("Add agog_nats to shared_preload_libraries in postgresql.conf, for example shared_preload_libraries = 'agog_nats', and restart the server.")));
}

/*
 * agog_assert_preloaded
 *		SQL-callable; the extension script calls it first, so CREATE EXTENSION
 *		fails with a hint when the library was not preloaded.
 */
Datum
agog_assert_preloaded(PG_FUNCTION_ARGS)
{
	agog_shmem_attach();
	PG_RETURN_VOID();
}

/*
 * agog_note_agents_changed
 *		Remember that this transaction changed agog_nats.agents.
 */
void
agog_note_agents_changed(void)
{
	agents_changed_in_xact = true;
}

/*
 * agog_agents_changed_in_xact
 *		Whether this transaction changed agog_nats.agents.
 */
bool
agog_agents_changed_in_xact(void)
{
	return agents_changed_in_xact;
}

/*
 * agog_agents_change_unnoted
 *		Forget that this transaction changed agog_nats.agents: the worker's
 *		own clearing of applied stamps, which must not wake it (nor every
 *		backend's agents cache) again.  Runs in the worker, in a transaction.
 */
void
agog_agents_change_unnoted(void)
{
	agents_changed_in_xact = false;
}

/*
 * agog_agents_changed
 *		Statement trigger on agog_nats.agents.  Only notes the change; the
 *		worker is woken at commit, so it never reads uncommitted rows.
 */
Datum
agog_agents_changed(PG_FUNCTION_ARGS)
{
	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("agog_agents_changed must be called as a trigger")));
	agog_note_agents_changed();
	return PointerGetDatum(NULL);
}

/*
 * agog_xact_callback
 *		At commit, bump the agents generation and set the worker's latch when
 *		this transaction changed the agents.  Post-commit code must not fail:
 *		an atomic add and a latch, no I/O, no allocation.  Before a PREPARE
 *		(which may still fail) refuse to prepare a change of the agents.
 */
static void
agog_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			if (agents_changed_in_xact && agog_shared != NULL)
			{
				pg_atomic_fetch_add_u64(&agog_shared->agents_generation, 1);
				agog_wake_worker();
			}
			agents_changed_in_xact = false;
			agog_outbox_at_commit();
			break;
		case XACT_EVENT_PRE_PREPARE:

			/*
			 * COMMIT PREPARED runs no callback of ours: the generation would
			 * not move, and every process would keep the agents it has.
			 */
			if (agents_changed_in_xact)
				ereport(ERROR,
						(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
						 errmsg("cannot prepare a transaction that changed agog_nats.agents"),
						 errdetail("Other sessions and the agog_nats worker read the agents again when the transaction that changed them commits, and COMMIT PREPARED does not tell them."),
						 errhint("Change agog_nats.agents in a transaction that is not prepared.")));
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			agents_changed_in_xact = false;
			agog_outbox_at_abort();
			break;
		default:
			break;
	}
}
