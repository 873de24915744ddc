/*-------------------------------------------------------------------------
 *
 * agog_nats.h
 *		Shared declarations of the agog_nats extension.
 *
 * The extension is layered; each layer only calls the ones below it:
 *
 *	agog_conn.c		the only code that calls nats.c (signals blocked, bounded
 *					waits, NATS errors mapped to SQLSTATEs)
 *	agog_subject.c	token validation, subject and message-id building
 *	agog_shmem.c	shared state between backends and the worker
 *	agog_xact.c		the worker's own transactions around SPI
 *	agog_agents.c	a per-process cache of agog_nats.agents
 *	agog_stream.c	stream provisioning and agog_stream_status()
 *	agog_outbox.c	the outbox: insert, claim, drain, record, purge
 *	agog_report.c	report encoding, publish and fetch functions
 *	agog_workflow.c	the worker's side of the workflow engine
 *	agog_worker.c	the background worker's loop
 *	agog_nats.c		_PG_init: settings, shared memory, worker registration,
 *					the commit callback
 *
 * Copyright (c) 2026, agog_nats developers
 *
 * src/agog_nats.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef AGOG_NATS_H
#define AGOG_NATS_H

#include "postgres.h"

#include "datatype/timestamp.h"
#include "lib/stringinfo.h"
#include "port/atomics.h"
#include "storage/latch.h"
#include "storage/lwlock.h"

#define AGOG_TOKEN_MAX_LEN		64
#define AGOG_SUBJECT_PREFIX		"agog.deliverables"
#define AGOG_TASKS_SUBJECT_PREFIX	"agog.tasks"
#define AGOG_STREAM_PREFIX		"agog_features_"
#define AGOG_SERVER_LEN			256
#define AGOG_ERROR_LEN			512

/* ----------------------------------------------------------------
 * Settings (agog_nats.c)
 * ----------------------------------------------------------------
 */
extern char *agog_url;
extern char *agog_user;
extern char *agog_password_file;
extern char *agog_token_file;
extern char *agog_nkey;
extern char *agog_nkey_seed_file;
extern char *agog_credentials_file;
extern char *agog_tls_ca_file;
extern char *agog_tls_cert_file;
extern char *agog_tls_key_file;
extern char *agog_database;
extern int	agog_timeout_ms;
extern int	agog_duplicate_window_ms;
extern int	agog_stream_replicas;
extern int	agog_outbox_max_pending;
extern int	agog_published_retention_s;
extern int	agog_task_lease_s;
extern int	agog_event_retention_s;
extern int	agog_workflow_retention_s;

/*
 * Whether a string setting is set (not NULL, not empty).  Plain C, but the
 * settings themselves are read on the process's own thread only.
 */
static inline bool
agog_setting_is_set(const char *v)
{
	return v != NULL && v[0] != '\0';
}

/* ----------------------------------------------------------------
 * Connection wrapper (agog_conn.c).  No nats.c type leaves that file.
 * ----------------------------------------------------------------
 */
typedef struct AgogConn AgogConn;

/* What went wrong in a NATS call, copied out of nats.c's thread-local state. */
typedef struct AgogError
{
	int			status;			/* natsStatus, 0 when none */
	int			js_code;		/* JetStream error code, 0 when none */
	int			sqlstate;		/* mapped SQLSTATE */
	bool		not_found;		/* the object asked for does not exist */
	char		text[AGOG_ERROR_LEN];
} AgogError;

/* A message read from a stream, in palloc'd memory. */
typedef struct AgogMsg
{
	char	   *subject;
	char	   *data;
	int			len;
	char	   *stream;
	uint64		seq;
	TimestampTz time;			/* 0 when unknown */
	char	   *msg_id;			/* Nats-Msg-Id header or NULL */
} AgogMsg;

/* The desired configuration of one agent stream. */
typedef struct AgogStreamSpec
{
	const char *name;
	const char *subject;		/* agog.deliverables.<agent>.> */
	const char *description;
	int64		max_msgs;
	int64		max_bytes;
	int64		max_age_ms;
	int32		max_msg_size;	/* -1: server default */
	int			replicas;
	int64		duplicate_window_ms;
	bool		may_lower;		/* false: keep a live stream's larger limits */
} AgogStreamSpec;

/* What agog_conn_ensure_stream did to an existing stream. */
typedef struct AgogEnsureResult
{
	bool		created;
	bool		updated;
	bool		kept;			/* kept a live limit larger than the spec's */
	bool		create_refused; /* JetStream refused to create it (an API error) */
	int64		live_max_msgs;	/* the live limits, when kept */
	int64		live_max_bytes;
	int64		live_max_age_ms;
} AgogEnsureResult;

/* The live state of one stream, as agog_stream_status() shows it. */
typedef struct AgogStreamState
{
	char	   *name;
	uint64		msgs;
	uint64		bytes;
	uint64		first_seq;
	uint64		last_seq;
	int64		consumers;
	TimestampTz first_time;		/* 0 when the stream is empty */
	TimestampTz last_time;
	int64		max_msgs;
	int64		max_bytes;
	int64		max_age_ms;
	int			replicas;
} AgogStreamState;

/* Events the worker's connection reports through its wake-up pipe. */
typedef struct AgogConnEvents
{
	uint64		disconnects;
	uint64		reconnects;
	uint64		bells;			/* completion notices announced */
} AgogConnEvents;

/* Interrupt check run between bounded waits; returns true to give up. */
typedef bool (*AgogInterruptCheck) (void);

extern void agog_conn_set_interrupt_check(AgogInterruptCheck check);
extern char *agog_conn_settings(void);
extern AgogConn *agog_conn_open(const char *url, const char *name,
								bool keep_reconnecting, AgogError *err);
extern void agog_conn_close(AgogConn *conn);
extern bool agog_conn_is_usable(AgogConn *conn);
extern bool agog_conn_is_connected(AgogConn *conn);
extern int64 agog_conn_max_payload(AgogConn *conn);
extern void agog_conn_server(AgogConn *conn, char *buf, size_t len);
extern int	agog_conn_event_fd(AgogConn *conn);
extern void agog_conn_take_events(AgogConn *conn, AgogConnEvents *events);
extern bool agog_conn_publish(AgogConn *conn, const char *subject,
							  const char *msg_id, const char *data, int len,
							  char **stream, uint64 *seq, bool *duplicate,
							  AgogError *err);
/* One message of an asynchronous batch publish, and what became of it. */
typedef enum AgogPubOutcome
{
	AGOG_PUB_UNKNOWN = 0,		/* no answer: it may or may not be stored */
	AGOG_PUB_STORED,			/* PubAck received (possibly a duplicate) */
	AGOG_PUB_REFUSED,			/* the server refused it; see err */
} AgogPubOutcome;

typedef struct AgogPubItem
{
	/* in */
	const char *subject;
	const char *msg_id;
	const char *data;
	int			len;
	/* out */
	AgogPubOutcome outcome;
	bool		answered;		/* an ack, an error or a timeout came */
	char		stream[AGOG_SERVER_LEN];
	uint64		seq;
	bool		duplicate;
	AgogError	err;
} AgogPubItem;

extern void agog_conn_publish_send(AgogConn *conn, AgogPubItem *items, int n);
extern bool agog_conn_publish_wait(AgogConn *conn, AgogPubItem *items,
								   AgogError *err);
extern bool agog_conn_find_msg_id(AgogConn *conn, const char *stream,
								  const char *subject, const char *msg_id,
								  uint64 *seq, AgogError *err);
/* A direct get sent ahead of its wait (agog_conn_get_last_send). */
typedef struct AgogSentGet
{
	uint64		token;			/* names the reply; 0 when nothing was sent */
} AgogSentGet;

extern void agog_conn_get_last_send(AgogConn *conn, const char *stream,
									const char *subject, AgogSentGet *sent);
extern bool agog_conn_get_last(AgogConn *conn, const char *stream,
							   const char *subject, bool from_leader,
							   AgogSentGet *sent, AgogMsg *msg,
							   AgogError *err);
extern bool agog_conn_get_seq(AgogConn *conn, const char *stream, uint64 seq,
							  bool from_leader, AgogMsg *msg, AgogError *err);
extern char *agog_conn_api_request(AgogConn *conn, const char *api,
								   const char *payload, AgogError *err);
extern bool agog_error_no_responders(const AgogError *err);
extern bool agog_conn_ensure_stream(AgogConn *conn, const AgogStreamSpec *spec,
									AgogEnsureResult *result, AgogError *err);
extern void agog_conn_shutdown_library(void);

/* Completion notices consumed from NATS by the worker. */
typedef struct AgogNotice
{
	char	   *subject;
	char	   *body;
	int			len;
	int			deliveries;		/* how many times NATS delivered it */
	uint64		seq;			/* its sequence in the notices stream, 0 if unknown */
} AgogNotice;

extern bool agog_conn_notices_open(AgogConn *conn, AgogError *err);
extern bool agog_conn_notices_bound(AgogConn *conn);
extern void agog_conn_notices_reset(AgogConn *conn);
extern bool agog_conn_notices_waiting(AgogConn *conn);
extern int	agog_conn_notices_fetch(AgogConn *conn, AgogNotice *out, int max,
									AgogError *err);
extern void agog_conn_notices_ack(AgogConn *conn, int i);
extern void agog_conn_notices_nak(AgogConn *conn, int i, int delay_ms);
extern void agog_conn_notices_release(AgogConn *conn);
pg_attribute_noreturn() extern void agog_raise(const AgogError *err,
											   const char *message);

/* The backend's cached connection (agog_conn.c). */
extern AgogConn *agog_backend_conn(void);
extern AgogConn *agog_backend_conn_if_open(void);

/* ----------------------------------------------------------------
 * Subjects and tokens (agog_subject.c)
 * ----------------------------------------------------------------
 */
extern void agog_check_token(const char *argname, const char *value);
extern char *agog_report_subject(const char *agent, const char *task_type,
								 const char *feature);
extern char *agog_stream_subjects(const char *agent);
extern char *agog_stream_name(const char *task_type);
extern char *agog_unique_msg_id(const char *kind);

/* ----------------------------------------------------------------
 * The agents (agog_agents.c)
 * ----------------------------------------------------------------
 */
typedef struct AgogAgent
{
	char	   *agent;
	char	   *task_type;
	char	   *stream;
	char	   *description;
	int64		max_msgs;
	int64		max_bytes;
	int64		max_age_ms;
	int32		max_msg_size;
	char	   *limits_stamp;	/* limits_changed_at not yet applied, or NULL */
	bool		stamp_column;	/* the table has limits_changed_at (0.3.0 on) */
} AgogAgent;

extern const AgogAgent *agog_agents(int *count);
extern const AgogAgent *agog_agent(const char *agent);

/* ----------------------------------------------------------------
 * Shared state (agog_shmem.c)
 * ----------------------------------------------------------------
 */
typedef struct AgogSharedState
{
	LWLock	   *lock;
	pid_t		worker_pid;
	Latch	   *worker_latch;
	pg_atomic_uint64 agents_generation;
	pg_atomic_uint64 workflow_generation;	/* commits that changed tasks or workflows */
	/* the rest is written by the worker under lock */
	bool		connected;
	char		server[AGOG_SERVER_LEN];
	uint64		reconnects;
	uint64		disconnects;
	TimestampTz connected_since;
	TimestampTz streams_checked_at;
	int			streams_ok;
	int			streams_failed;
	TimestampTz last_error_at;
	char		last_error[AGOG_ERROR_LEN];
	/* outbox: written by the worker, except pending which commits bump */
	int64		max_payload;	/* the server's, 0 until known */
	pg_atomic_uint64 outbox_pending;
	pg_atomic_uint64 claim_floor;	/* lowest outbox id committed since the
									 * worker's last claim; 0: start from the
									 * lowest; PG_UINT64_MAX: none
									 * (agog_outbox.c) */
	Oid			worker_dboid;	/* the worker's database, once connected */
	uint64		reports_published;
	uint64		reports_dead;
	TimestampTz last_drain_at;
} AgogSharedState;

extern AgogSharedState *agog_shared;

extern void agog_shmem_request(void);
extern void agog_shmem_startup(void);
extern void agog_shmem_attach(void);
extern void agog_wake_worker(void);
extern void agog_shared_set_error(const char *text);

/* ----------------------------------------------------------------
 * The worker's transactions (agog_xact.c)
 * ----------------------------------------------------------------
 */
extern void agog_xact_begin(MemoryContext cxt);
extern void agog_xact_commit(MemoryContext cxt);

/* ----------------------------------------------------------------
 * Outbox (agog_outbox.c)
 * ----------------------------------------------------------------
 */
#define AGOG_DRAIN_BATCH 256

extern int64 agog_outbox_next_id(char **msg_id);
extern void agog_outbox_check_database(void);
extern void agog_outbox_check_depth(void);
extern void agog_outbox_insert(int64 id, const char *msg_id, const char *agent,
							   const char *task_type, const char *feature,
							   const char *subject, const char *stream,
							   const char *body);
extern char *agog_outbox_latest_pending(const char *subject);
extern void agog_outbox_note_changed(void);
extern void agog_outbox_at_commit(void);
extern void agog_outbox_at_abort(void);
extern void agog_outbox_release_leases(void);
extern int	agog_outbox_drain(AgogConn *conn, int max_batches, bool *more);
extern long agog_outbox_maintain(bool purge);

/* ----------------------------------------------------------------
 * Workflows (agog_workflow.c)
 * ----------------------------------------------------------------
 */
extern long agog_workflow_step(void);
extern int	agog_notices_consume(AgogConn *conn, bool rung, long *again_ms);

/* ----------------------------------------------------------------
 * Streams (agog_stream.c)
 * ----------------------------------------------------------------
 */
extern bool agog_reconcile_streams(AgogConn *conn, int *ok, int *failed,
								   AgogError *first_err);
extern bool agog_stream_in_place(const char *name);
extern bool agog_stream_create_refused(const char *name);
extern bool agog_parse_nats_time(const char *v, int len, TimestampTz *out);
extern TimestampTz agog_nats_time(const char *v, int len);
extern bool agog_stream_absent(const char *name, uint64 generation);
extern void agog_stream_note_absent(const char *name, uint64 generation);

/* ----------------------------------------------------------------
 * Worker (agog_worker.c) and _PG_init (agog_nats.c)
 * ----------------------------------------------------------------
 */
extern void agog_register_worker(void);
extern void agog_worker_stream_missing(AgogConn *conn, const char *stream);
extern void agog_note_agents_changed(void);
extern bool agog_agents_changed_in_xact(void);
extern void agog_agents_change_unnoted(void);
extern void agog_agents_invalidate(void);
extern void agog_require_preload(void);

#endif							/* AGOG_NATS_H */
