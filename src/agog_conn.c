/*-------------------------------------------------------------------------
 *
 * agog_conn.c
 *		The connection wrapper: the only code of agog_nats that calls nats.c,
 *		but for the NKey signature's callbacks in agog_auth.c.
 *
 * nats.c starts threads of its own (timers, reader, flusher, reconnect,
 * callbacks), and a thread inherits the signal mask of the thread that
 * creates it.  So every nats.c call here runs with all signals blocked,
 * between NATS_BEGIN and NATS_END; nats.c's threads then never run
 * PostgreSQL's signal handlers.  Inside such a section we never ereport
 * (PG_TRY does not restore the signal mask) and allocate only with
 * MCXT_ALLOC_NO_OOM.
 *
 * Every wait is bounded by agog_nats.timeout_ms and cut in short slices; the
 * interrupt check runs between slices, so query cancel and worker shutdown
 * are served within a slice even when the server is frozen.  A publish that
 * is sent again after a slice runs out carries the same Nats-Msg-Id, which
 * JetStream's duplicate window makes harmless.
 *
 * The worker's callbacks run on nats.c threads and call nothing of
 * PostgreSQL's: the connection events touch process-static counters with
 * atomic builtins and write one byte to a pipe the worker waits on; the ack
 * handler writes a batch's outcome under a pthread mutex and signals a
 * condition variable.  A backend's connection has no nats.c thread at all
 * (see "The backend as its loop"): its event-loop callbacks run on the
 * backend's own thread, inside a signal-blocked section.
 *
 * Copyright (c) 2026, agog_nats developers
 *
 * src/agog_conn.c
 *
 *-------------------------------------------------------------------------
 */
#include "agog_nats.h"
#include "agog_auth.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <nats/nats.h>

#include "common/jsonapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "storage/fd.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "utils/json.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

struct AgogConn
{
	natsConnection *nc;
	jsCtx	   *js;
	bool		with_events;
	/* the worker's completion-notice consumer, see agog_conn_notices_open */
	natsSubscription *notice_sub;
	natsSubscription *bell_sub;
	natsMsgList held;			/* fetched, not yet released */
	bool		holding;
	/* a backend's requests by hand, see "Requests" below */
	natsSubscription *reply_sub;
	char		reply_prefix[64];
	uint64		reply_seq;
	uint64		unsettled;		/* a request nobody waited for, or 0 */
	/* a backend's connection without threads, see "The backend as its loop" */
	bool		loop_asked;		/* the settings asked for one (loop_wanted) */
	bool		threadless;		/* and it is one: the server wants no TLS */
	int			sock;			/* its socket, from loop_attach */
	bool		want_write;		/* nats.c has buffered bytes to send */
	bool		detached;		/* nats.c closed the connection */
	bool		broken;			/* its socket failed under poll(2) */
	int			left_buffered;	/* bytes still unsent when the last wait ended */
};

/*
 * Slices of a bounded wait, in milliseconds; the last one repeats.  A
 * backend answers query cancel within its longest slice (400 ms); the
 * worker, which must stop within a second on SIGTERM, allows 900 ms, so it
 * also works over a link whose round trip is most of a second.  A request
 * that gets no answer within a slice is sent again (a publish with the
 * same message id), so a backend's calls need a round trip under 400 ms.
 */
static const int64 backend_wait_slices[] = {100, 200, 400};
static const int64 worker_wait_slices[] = {250, 500, 900};
static const int64 *wait_slices = backend_wait_slices;
static int	nwait_slices = lengthof(backend_wait_slices);

/* Whether nats_Open has run in this process, and the exit hook is set. */
static bool library_open = false;

/* Whether this process has opened a TLS connection (see conn_at_exit). */
static bool tls_used = false;

/* The backend's cached connection and the url it was opened with. */
static AgogConn *backend_conn = NULL;
static char *backend_conn_url = NULL;

/* Every open connection of this process, closed at exit if still open. */
#define MAX_OPEN_CONNS 4
static AgogConn *open_conns[MAX_OPEN_CONNS];

/* Slices of a connect attempt (a TCP, INFO, CONNECT, PING/PONG exchange). */
static const int64 backend_connect_slices[] = {100, 200, 400, 500};
static const int64 worker_connect_slices[] = {250, 500, 900};
static const int64 *connect_slices = backend_connect_slices;
static int	nconnect_slices = lengthof(backend_connect_slices);

typedef struct WaitBudget
{
	TimestampTz start;
	int			attempt;
} WaitBudget;

static void budget_start(WaitBudget *b);
static int64 budget_next_slice(WaitBudget *b, const int64 *slices, int nslices,
							   bool *interrupted);
static void set_timeout_error(AgogError *err, bool interrupted);

static bool default_interrupt_check(void);
static AgogInterruptCheck interrupt_check = default_interrupt_check;

static bool tls_asked(void);
static bool loop_wanted(const char *url, bool keep_reconnecting);
static bool server_requires_tls(const char *server, int wait_ms);
static natsStatus loop_attach(void **userData, void *loop, natsConnection *nc,
							  natsSock sock);
static natsStatus loop_read(void *userData, bool add);
static natsStatus loop_write(void *userData, bool add);
static natsStatus loop_detach(void *userData);
static void loop_catch_up(AgogConn *conn);
static void loop_hang_up(AgogConn *conn);
static char *copy_bytes_noerror(const char *src, int len);

/*
 * State shared with nats.c's callback threads.  It lives for the whole
 * process, so a callback that runs after its connection was destroyed still
 * finds it.  Only atomic builtins and write(2) touch it from those threads.
 */
static struct
{
	uint64		disconnects;
	uint64		reconnects;
	uint64		bells;			/* completion notices seen on the doorbell */
	int			pipe_rd;
	int			pipe_wr;
}			conn_events = {0, 0, 0, -1, -1};

/*
 * The asynchronous batches being published by the worker: up to two in
 * flight, so that the next batch is claimed and sent while the acks of the
 * previous one arrive.  The ack handler runs on a nats.c thread and records
 * outcomes here under batch_mutex (a plain pthread mutex and condition
 * variable: no PostgreSQL call on that thread).  A free slot has items
 * NULL, so a late ack finds nothing to write into.
 */
#define AGOG_MAX_BATCHES 2

typedef struct PubBatch
{
	AgogPubItem *items;
	int			n;
	int			unanswered;		/* items without an answer yet */
	int			next;			/* where the next ack is looked for first */
} PubBatch;

static pthread_mutex_t batch_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t batch_cond = PTHREAD_COND_INITIALIZER;
static PubBatch batches[AGOG_MAX_BATCHES];

#define NATS_BEGIN(saved) \
	do { \
		sigset_t	all_signals_; \
		sigfillset(&all_signals_); \
		pthread_sigmask(SIG_BLOCK, &all_signals_, &(saved)); \
	} while (0)

#define NATS_END(saved) \
	pthread_sigmask(SIG_SETMASK, &(saved), NULL)

/*
 * default_interrupt_check
 *		Between wait slices in a backend: serve query cancel and termination.
 *		Runs with signals unblocked and no nats.c object held, so it may throw.
 */
static bool
default_interrupt_check(void)
{
	CHECK_FOR_INTERRUPTS();
	return false;
}

/*
 * agog_conn_set_interrupt_check
 *		The worker installs its own check (shutdown requested) at start, and
 *		with it the worker's longer wait slices.
 */
void
agog_conn_set_interrupt_check(AgogInterruptCheck check)
{
	interrupt_check = check ? check : default_interrupt_check;
	if (check != NULL)
	{
		wait_slices = worker_wait_slices;
		nwait_slices = lengthof(worker_wait_slices);
		connect_slices = worker_connect_slices;
		nconnect_slices = lengthof(worker_connect_slices);
	}
}

/*
 * map_status
 *		Pick the SQLSTATE for a NATS failure.  Pure C: runs inside a
 *		signal-blocked section.
 */
static int
map_status(natsStatus s, jsErrCode jerr, bool *not_found)
{
	*not_found = false;
	if (jerr == JSStreamNotFoundErr || jerr == JSNoMessageFoundErr ||
		s == NATS_NOT_FOUND)
	{
		*not_found = true;
		return ERRCODE_UNDEFINED_OBJECT;
	}
	if (jerr == JSStreamMessageExceedsMaximumErr)
		return ERRCODE_PROGRAM_LIMIT_EXCEEDED;
	if (jerr != 0)
		return ERRCODE_EXTERNAL_ROUTINE_EXCEPTION;

	switch (s)
	{
		case NATS_NO_SERVER:
		case NATS_CONNECTION_CLOSED:
		case NATS_CONNECTION_DISCONNECTED:
		case NATS_STALE_CONNECTION:
		case NATS_IO_ERROR:
		case NATS_TIMEOUT:
		case NATS_NOT_YET_CONNECTED:
		case NATS_SSL_ERROR:
		case NATS_SECURE_CONNECTION_WANTED:
		case NATS_SECURE_CONNECTION_REQUIRED:
		case NATS_PROTOCOL_ERROR:
			return ERRCODE_CONNECTION_FAILURE;
		case NATS_CONNECTION_AUTH_FAILED:
			return ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION;
		case NATS_NOT_PERMITTED:
			return ERRCODE_INSUFFICIENT_PRIVILEGE;
		case NATS_MAX_PAYLOAD:
			return ERRCODE_PROGRAM_LIMIT_EXCEEDED;
		case NATS_NO_RESPONDERS:
			return ERRCODE_UNDEFINED_OBJECT;
		case NATS_INVALID_ARG:
		case NATS_INVALID_SUBJECT:
			return ERRCODE_INVALID_PARAMETER_VALUE;
		case NATS_NO_MEMORY:
			return ERRCODE_OUT_OF_MEMORY;
		default:
			return ERRCODE_EXTERNAL_ROUTINE_EXCEPTION;
	}
}

/*
 * no_responders_text
 *		What "no responders" to a publish means: no stream captures the
 *		subject, or, with replicated streams, the stream may be between two
 *		leaders.  Plain C, but it reads a setting that a reload changes: runs
 *		on the backend's or the worker's own thread, never on nats.c's (the
 *		ack handler leaves the text to agog_conn_publish_wait).
 */
static const char *
no_responders_text(void)
{
	return agog_stream_replicas > 1 ?
		"no JetStream stream answered for this subject (no responders): no stream captures it, or its replicas are electing a new leader" :
		"no JetStream stream captures this subject (no responders)";
}

/*
 * agog_error_no_responders
 *		Whether err is nats.c's "no responders" (nothing answered on the
 *		subject).  Plain C.
 */
bool
agog_error_no_responders(const AgogError *err)
{
	return err->status == (int) NATS_NO_RESPONDERS;
}

/*
 * capture_error
 *		Copy what nats.c knows of a failure into *err.  Runs inside a
 *		signal-blocked section: nats.c and plain C only.  The thread-local
 *		last error is used only when its status is this one (it may be left
 *		over from an earlier failure).
 */
static void
capture_error(AgogError *err, natsStatus s, jsErrCode jerr)
{
	natsStatus	last_status = NATS_OK;
	const char *last_text = nats_GetLastError(&last_status);
	const char *text;

	err->status = (int) s;
	err->js_code = (int) jerr;
	err->sqlstate = map_status(s, jerr, &err->not_found);

	if (s == NATS_NO_RESPONDERS)
		text = no_responders_text();
	else if (last_text != NULL && last_text[0] != '\0' && last_status == s)
		text = last_text;
	else
		text = natsStatus_GetText(s);
	strlcpy(err->text, text ? text : "unknown NATS error", sizeof(err->text));
}

/*
 * set_error
 *		Fill *err without nats.c, for failures found by this file itself.
 */
static void
set_error(AgogError *err, int sqlstate, const char *text)
{
	memset(err, 0, sizeof(*err));
	err->status = (int) NATS_ERR;
	err->sqlstate = sqlstate;
	strlcpy(err->text, text, sizeof(err->text));
}

/*
 * agog_raise
 *		Throw the ERROR for a failed NATS call, with message as its primary
 *		message: a whole sentence the caller wrote (marked with
 *		gettext_noop), never one assembled from pieces.  Runs in the calling
 *		backend, after the signal-blocked section has ended.
 */
void
agog_raise(const AgogError *err, const char *message)
{
	if (err->sqlstate == ERRCODE_CONNECTION_FAILURE)
		ereport(ERROR,
				(errcode(err->sqlstate),
				 errmsg("%s", _(message)),
				 errdetail_internal("The NATS client reported: %s.", err->text),
				 errhint("Check that a NATS server with JetStream enabled is reachable at the address set in agog_nats.url.")));
	else if (err->js_code != 0)
		ereport(ERROR,
				(errcode(err->sqlstate),
				 errmsg("%s", _(message)),
				 errdetail_internal("JetStream refused the request with error code %d: %s.",
									err->js_code, err->text)));
	else
		ereport(ERROR,
				(errcode(err->sqlstate),
				 errmsg("%s", _(message)),
				 errdetail_internal("The NATS client reported: %s.", err->text)));
	pg_unreachable();
}

/* ----------------------------------------------------------------
 * Library lifetime
 * ----------------------------------------------------------------
 */

/*
 * conn_at_exit
 *		on_proc_exit hook: destroy the backend's cached connection, then close
 *		the library, waiting a bounded time for its threads.  Every nats.c
 *		object of this process is gone by then.
 */
static void
conn_at_exit(int code, Datum arg)
{
	backend_conn = NULL;
	for (int i = 0; i < MAX_OPEN_CONNS; i++)
		if (open_conns[i] != NULL)
			agog_conn_close(open_conns[i]);

	/*
	 * Closing nats.c also cleans up OpenSSL's global state, which
	 * PostgreSQL's own OpenSSL use still relies on at exit (a process that
	 * used TLS crashed there).  Its threads end with the process anyway.
	 */
	if (!tls_used)
		agog_conn_shutdown_library();
}

/*
 * register_conn
 *		Remember an open connection so conn_at_exit closes it.  Runs after a
 *		successful connect; throws only if a process opens more than it should.
 */
static void
register_conn(AgogConn *conn)
{
	for (int i = 0; i < MAX_OPEN_CONNS; i++)
		if (open_conns[i] == NULL)
		{
			open_conns[i] = conn;
			return;
		}
	elog(ERROR, "too many NATS connections in one process");
}

/*
 * unregister_conn
 *		Forget a connection being closed.  Never throws.
 */
static void
unregister_conn(AgogConn *conn)
{
	for (int i = 0; i < MAX_OPEN_CONNS; i++)
		if (open_conns[i] == conn)
			open_conns[i] = NULL;
}

/*
 * agog_conn_shutdown_library
 *		Close nats.c for good in this process.  Runs at process exit only.
 */
void
agog_conn_shutdown_library(void)
{
	sigset_t	saved;

	if (!library_open)
		return;
	NATS_BEGIN(saved);
	nats_CloseAndWait(1000);
	NATS_END(saved);
	library_open = false;
}

/*
 * open_library
 *		nats_Open once per process, on first use in a backend or the worker
 *		(never in the postmaster).  Returns false with *err set on failure.
 */
static bool
open_library(AgogError *err)
{
	static bool exit_hook_set = false;
	sigset_t	saved;
	natsStatus	s;

	if (library_open)
		return true;
	if (!exit_hook_set)
	{
		on_proc_exit(conn_at_exit, (Datum) 0);
		exit_hook_set = true;
	}
	NATS_BEGIN(saved);
	s = nats_Open(-1);
	if (s != NATS_OK)
		capture_error(err, s, 0);
	NATS_END(saved);
	if (s != NATS_OK)
		return false;
	library_open = true;
	return true;
}

/* ----------------------------------------------------------------
 * Callbacks: nats.c threads.  No PostgreSQL function may be called here.
 * ----------------------------------------------------------------
 */
static void
notify_owner(void)
{
	char		byte = 1;
	ssize_t		rc;

	if (conn_events.pipe_wr >= 0)
	{
		rc = write(conn_events.pipe_wr, &byte, 1);
		(void) rc;				/* a full pipe already wakes the owner */
	}
}

/*
 * on_disconnected
 *		nats.c's disconnected callback (worker only), on a nats.c thread:
 *		count it and wake the worker.  Atomics and a pipe write only.
 */
static void
on_disconnected(natsConnection *nc, void *closure)
{
	__atomic_add_fetch(&conn_events.disconnects, 1, __ATOMIC_SEQ_CST);
	notify_owner();
}

/*
 * on_bell
 *		Core-NATS handler of the notice subject (worker only), on a nats.c
 *		thread: a notice arrived, so count it and wake the worker to pull it
 *		from its durable consumer.  Atomics and a pipe write only.
 */
static void
on_bell(natsConnection *nc, natsSubscription *sub, natsMsg *msg, void *closure)
{
	natsMsg_Destroy(msg);
	__atomic_add_fetch(&conn_events.bells, 1, __ATOMIC_SEQ_CST);
	notify_owner();
}

/*
 * on_reconnected
 *		nats.c's reconnected callback (worker only), on a nats.c thread:
 *		count it and wake the worker.  Atomics and a pipe write only.
 */
static void
on_reconnected(natsConnection *nc, void *closure)
{
	__atomic_add_fetch(&conn_events.reconnects, 1, __ATOMIC_SEQ_CST);
	notify_owner();
}

/*
 * on_pub_ack
 *		Ack handler of asynchronous publishes (worker only), on a nats.c
 *		thread: record the outcome of the message with this Nats-Msg-Id in
 *		the current batch, then destroy the message, which is ours.
 */
static void
on_pub_ack(jsCtx *js, natsMsg *msg, jsPubAck *pa, jsPubAckErr *pae,
		   void *closure)
{
	const char *id = NULL;
	AgogPubItem *it = NULL;
	PubBatch   *b = NULL;

	if (natsMsgHeader_Get(msg, "Nats-Msg-Id", &id) != NATS_OK)
		id = NULL;
	pthread_mutex_lock(&batch_mutex);
	/* acks mostly come in the order sent: look at the expected item first */
	for (int k = 0; id != NULL && it == NULL && k < AGOG_MAX_BATCHES; k++)
	{
		b = &batches[k];
		for (int j = 0; b->items != NULL && j < b->n; j++)
		{
			AgogPubItem *cand = &b->items[(b->next + j) % b->n];

			if (!cand->answered && strcmp(cand->msg_id, id) == 0)
			{
				it = cand;
				b->next = (int) (cand - b->items) + 1;
				break;
			}
		}
	}
	if (it != NULL)
	{
		if (pa != NULL)
		{
			it->outcome = AGOG_PUB_STORED;
			strlcpy(it->stream, pa->Stream ? pa->Stream : "", sizeof(it->stream));
			it->seq = pa->Sequence;
			it->duplicate = pa->Duplicate;
		}
		else if (pae != NULL)
		{
			const char *text = pae->ErrText;

			it->err.status = (int) pae->Err;
			it->err.js_code = (int) pae->ErrCode;
			it->err.sqlstate = map_status(pae->Err, pae->ErrCode, &it->err.not_found);
			if (pae->Err == NATS_NO_RESPONDERS)
				text = "no responders";	/* worded by agog_conn_publish_wait */
			else if (text == NULL || text[0] == '\0')
				text = natsStatus_GetText(pae->Err);
			strlcpy(it->err.text, text ? text : "unknown NATS error", sizeof(it->err.text));
			/* a timeout says nothing of whether the server stored it */
			if (pae->Err != NATS_TIMEOUT)
				it->outcome = AGOG_PUB_REFUSED;
		}
		it->answered = true;

		/*
		 * A wait that ran out sets every batch's count to 0 while their
		 * items stay in place until it clears them; an ack nats.c had
		 * already taken off its pending list arrives in between.  It must
		 * not take a count below 0, which the other batch's wait would
		 * never see as complete.
		 */
		if (b->unanswered > 0 && --b->unanswered == 0)
			pthread_cond_broadcast(&batch_cond);
	}
	pthread_mutex_unlock(&batch_mutex);
	natsMsg_Destroy(msg);
}

/* ----------------------------------------------------------------
 * Connections
 * ----------------------------------------------------------------
 */

/*
 * split_servers
 *		Split agog_nats.url on commas into a palloc'd array of trimmed urls.
 */
static const char **
split_servers(const char *url, int *count)
{
	char	   *copy = pstrdup(url);
	const char **servers = palloc0(sizeof(char *) * (strlen(url) / 2 + 2));
	char	   *tok;
	char	   *save = NULL;
	int			n = 0;

	for (tok = strtok_r(copy, ",", &save); tok != NULL;
		 tok = strtok_r(NULL, ",", &save))
	{
		char	   *end;

		while (*tok == ' ' || *tok == '\t')
			tok++;
		end = tok + strlen(tok);
		while (end > tok && (end[-1] == ' ' || end[-1] == '\t'))
			*--end = '\0';
		if (*tok != '\0')
			servers[n++] = tok;
	}
	*count = n;
	return servers;
}

/*
 * server_authority
 *		Where the authority of one agog_nats.url entry starts: after
 *		"scheme://" when there is one.  It runs up to the first '/'.
 */
static const char *
server_authority(const char *server)
{
	const char *p = strstr(server, "://");

	return (p != NULL) ? p + 3 : server;
}

/*
 * url_has_credentials
 *		True when one server entry of agog_nats.url carries a user, password
 *		or token ("nats://user:pass@host:4222") in its authority.
 */
static bool
url_has_credentials(const char *server)
{
	const char *p = server_authority(server);

	return memchr(p, '@', strcspn(p, "/")) != NULL;
}

/* Whether the TLS settings ask for a TLS connection (a CA or a certificate). */
static bool
tls_asked(void)
{
	return agog_setting_is_set(agog_tls_ca_file) || agog_setting_is_set(agog_tls_cert_file);
}

/*
 * agog_conn_settings
 *		What a connection was opened with: url, user, secret and TLS files.  A
 *		connection whose settings differ from the current ones (a SIGHUP
 *		changed them) is closed and opened again.
 */
char *
agog_conn_settings(void)
{
#define S(x) ((x) ? (x) : "")
	return psprintf("%s|%s|%s|%s|%s|%s|%s|%s|%s|%s", agog_url, S(agog_user),
					S(agog_password_file), S(agog_token_file), S(agog_nkey),
					S(agog_nkey_seed_file), S(agog_credentials_file), S(agog_tls_ca_file),
					S(agog_tls_cert_file), S(agog_tls_key_file));
#undef S
}

/*
 * connect_attempts
 *		agog_conn_open's connect: attempts of growing length within
 *		agog_nats.timeout_ms, each with fresh options.  Returns NATS_OK with
 *		*nc and *js set, or the last failure with *err set.  Runs in a
 *		backend or the worker, signals blocked around each attempt; throws
 *		only from the interrupt check between attempts (query cancel), which
 *		agog_conn_open catches to wipe the secrets.
 */
static natsStatus
connect_attempts(AgogConn *conn, const char **servers, int nservers,
				 const char *name, bool keep_reconnecting, const char *password,
				 const char *token, natsConnection **ncp, jsCtx **jsp,
				 AgogError *err)
{
	natsOptions *opts = NULL;
	natsConnection *nc = NULL;
	jsCtx	   *js = NULL;
	jsOptions	jsopts;
	natsStatus	s = NATS_OK;
	sigset_t	saved;
	WaitBudget	budget;
	bool		interrupted = false;
	int			resigned = 0;
	bool		tls_failed = false;
	bool		shown = agog_auth_file_shown();

	/*
	 * Connect in attempts of growing length, so cancel and shutdown are
	 * served between them even when a server accepts TCP but never
	 * answers.  A refused connection fails at once and is not retried
	 * here.
	 */
	budget_start(&budget);
	for (;;)
	{
		int64		slice = budget_next_slice(&budget, connect_slices,
											  nconnect_slices, &interrupted);
		TimestampTz started = GetCurrentTimestamp();

		if (slice <= 0)
		{
			s = NATS_TIMEOUT;
			set_timeout_error(err, interrupted);
			break;
		}
		opts = NULL;
		nc = NULL;
		js = NULL;
		NATS_BEGIN(saved);
		s = natsOptions_Create(&opts);
		if (s == NATS_OK)
			s = natsOptions_SetServers(opts, servers, nservers);
		if (s == NATS_OK)
			s = natsOptions_SetName(opts, name);
		if (s == NATS_OK)
			s = natsOptions_SetTimeout(opts, slice);
		if (s == NATS_OK)
			s = natsOptions_SetWriteDeadline(opts, agog_timeout_ms);
		if (s == NATS_OK)
			s = natsOptions_SetNoRandomize(opts, true);
		if (s == NATS_OK && agog_setting_is_set(agog_user))
			s = natsOptions_SetUserInfo(opts, agog_user, password ? password : "");
		if (s == NATS_OK && token != NULL)
			s = natsOptions_SetToken(opts, token);
		if (s == NATS_OK)
			s = agog_auth_set_options(opts);
		if (s == NATS_OK && tls_asked())
		{
			tls_used = true;
			s = natsOptions_SetSecure(opts, true);
		}
		if (s == NATS_OK && agog_setting_is_set(agog_tls_ca_file))
		{
			s = natsOptions_LoadCATrustedCertificates(opts, agog_tls_ca_file);
			tls_failed = (s != NATS_OK);
		}
		if (s == NATS_OK && agog_setting_is_set(agog_tls_cert_file))
		{
			s = natsOptions_LoadCertificatesChain(opts, agog_tls_cert_file,
												  agog_setting_is_set(agog_tls_key_file) ?
												  agog_tls_key_file : agog_tls_cert_file);
			tls_failed = (s != NATS_OK);
		}
		if (s == NATS_OK && keep_reconnecting)
		{
			s = natsOptions_SetAllowReconnect(opts, true);
			if (s == NATS_OK)
				s = natsOptions_SetMaxReconnect(opts, -1);
			if (s == NATS_OK)
				s = natsOptions_SetReconnectWait(opts, 250);
			if (s == NATS_OK)
				s = natsOptions_SetPingInterval(opts, 2000);
			if (s == NATS_OK)
				s = natsOptions_SetMaxPingsOut(opts, 2);
			if (s == NATS_OK)
				s = natsOptions_SetDisconnectedCB(opts, on_disconnected, NULL);
			if (s == NATS_OK)
				s = natsOptions_SetReconnectedCB(opts, on_reconnected, NULL);
		}
		else if (s == NATS_OK)
		{
			s = natsOptions_SetAllowReconnect(opts, false);
			/* a backend's requests go out at once, see request_send */
			if (s == NATS_OK)
				s = natsOptions_SetSendAsap(opts, true);
			/* no reader and no ping thread: see "The backend as its loop" */
			if (s == NATS_OK && conn->threadless)
				s = natsOptions_SetPingInterval(opts, 0);
			if (s == NATS_OK && conn->threadless)
				s = natsOptions_SetEventLoop(opts, conn, loop_attach, loop_read,
											 loop_write, loop_detach);
		}
		if (s == NATS_OK)
			s = natsConnection_Connect(&nc, opts);
		if (s == NATS_OK)
		{
			jsOptions_Init(&jsopts);
			jsopts.Wait = agog_timeout_ms;
			if (keep_reconnecting)
			{
				jsopts.PublishAsync.AckHandler = on_pub_ack;
				jsopts.PublishAsync.MaxPending = 8192;
			}
			s = natsConnection_JetStream(&js, nc, &jsopts);
		}
		if (s != NATS_OK)
		{
			capture_error(err, s, 0);
			jsCtx_Destroy(js);
			natsConnection_Destroy(nc);
		}
		natsOptions_Destroy(opts);
		NATS_END(saved);

		/*
		 * nats.c names the TLS file it could not load: keep the path from a
		 * session that may not read the settings (and from the worker's
		 * last_error), and put it in the server log only.
		 */
		if (tls_failed && !shown)
		{
			/* once per process and text: the worker tries again and again */
			static char logged_tls[AGOG_ERROR_LEN] = "";

			if (strcmp(logged_tls, err->text) != 0)
				ereport(LOG_SERVER_ONLY,
						(errcode(ERRCODE_CONFIG_FILE_ERROR),
						 errmsg("agog_nats could not load the TLS files named by its settings"),
						 errdetail_internal("The NATS client reported: %s", err->text)));
			strlcpy(logged_tls, err->text, sizeof(logged_tls));
			strlcpy(err->text, "could not load the files named by agog_nats.tls_ca_file, "
					"agog_nats.tls_cert_file and agog_nats.tls_key_file", sizeof(err->text));
			break;
		}

		/*
		 * A signature nats.c would have left out of its CONNECT (see
		 * agog_auth.c): the server's next nonce gives another signature.  One
		 * connect in 256 meets this, so four more tries never all do.  Each
		 * takes a slice of the budget like any attempt, so an interrupt is
		 * still served, and a budget spent meanwhile reports a timeout.
		 */
		if (s != NATS_OK && agog_auth_take_dropped() && ++resigned <= 4)
			continue;
		if (s == NATS_OK ||
			!TimestampDifferenceExceeds(started, GetCurrentTimestamp(), (int) (slice / 2)))
			break;
	}
	*ncp = nc;
	*jsp = js;
	return s;
}

/*
 * agog_conn_open
 *		Connect to the servers in url.  Runs in a backend or the worker.
 *		keep_reconnecting (the worker) retries forever after a disconnect and
 *		reports events through agog_conn_event_fd(); a backend's connection
 *		closes on disconnect instead and is opened again on next use.  The
 *		connect is bounded by agog_nats.timeout_ms.  Returns NULL with *err
 *		set on failure; never throws for a NATS failure.
 */
AgogConn *
agog_conn_open(const char *url, const char *name, bool keep_reconnecting,
			   AgogError *err)
{
	const char **servers;
	int			nservers;
	AgogConn   *conn;
	natsConnection *nc = NULL;
	jsCtx	   *js = NULL;
	natsStatus	s;
	char	   *volatile password = NULL;
	char	   *volatile token = NULL;

	memset(err, 0, sizeof(*err));
	/* the signer reads these files at each connect; fail early and clearly */
	agog_auth_check_files();
	servers = split_servers(url, &nservers);
	for (int i = 0; i < nservers; i++)
	{
		/* the URL is not repeated: it holds the secret */
		if (url_has_credentials(servers[i]))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("agog_nats.url must not hold credentials"),
					 errdetail("Server %d of %d in agog_nats.url has a user, password or token before \"@\"; a setting's value shows in pg_settings and in the configuration files.",
							   i + 1, nservers),
					 errhint("Set agog_nats.user and agog_nats.password_file, or agog_nats.token_file, and remove the credentials from agog_nats.url.")));
	}
	if (nservers == 0)
	{
		set_error(err, ERRCODE_INVALID_PARAMETER_VALUE,
				  "agog_nats.url names no server");
		err->status = (int) NATS_ADDRESS_MISSING;
		return NULL;
	}
	if (!open_library(err))
		return NULL;

	if (keep_reconnecting && conn_events.pipe_rd < 0)
	{
		int			fds[2];

		if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0)
			ereport(ERROR,
					(errcode_for_file_access(),
					 errmsg("could not create the NATS event pipe: %m")));
		conn_events.pipe_rd = fds[0];
		conn_events.pipe_wr = fds[1];
	}
	conn = MemoryContextAllocZero(TopMemoryContext, sizeof(AgogConn));
	conn->loop_asked = loop_wanted(url, keep_reconnecting);
	conn->threadless = conn->loop_asked &&
		!server_requires_tls(servers[0], (int) Min(connect_slices[0], agog_timeout_ms));
	conn->sock = -1;

	/*
	 * The secrets are read last, and wiped on every path: the interrupt
	 * check between attempts may throw (query cancel), as may the reads.
	 */
	PG_TRY();
	{
		password = agog_auth_read_secret("agog_nats.password_file", agog_password_file);
		token = agog_auth_read_secret("agog_nats.token_file", agog_token_file);
		s = connect_attempts(conn, servers, nservers, name, keep_reconnecting,
							 password, token, &nc, &js, err);
	}
	PG_CATCH();
	{
		agog_auth_forget_secret(password);
		agog_auth_forget_secret(token);
		pfree(conn);
		PG_RE_THROW();
	}
	PG_END_TRY();
	agog_auth_forget_secret(password);
	agog_auth_forget_secret(token);

	if (s != NATS_OK)
	{
		pfree(conn);
		return NULL;
	}
	conn->nc = nc;
	conn->js = js;
	conn->with_events = keep_reconnecting;
	register_conn(conn);
	return conn;
}

/*
 * agog_conn_close
 *		Destroy a connection and its JetStream context.  Safe on NULL.
 */
void
agog_conn_close(AgogConn *conn)
{
	sigset_t	saved;

	if (conn == NULL)
		return;
	unregister_conn(conn);
	agog_conn_notices_reset(conn);
	/* batches still in flight (an error between send and wait): forget them */
	pthread_mutex_lock(&batch_mutex);
	for (int k = 0; k < AGOG_MAX_BATCHES; k++)
	{
		batches[k].items = NULL;
		batches[k].n = 0;
		batches[k].unanswered = 0;
	}
	pthread_mutex_unlock(&batch_mutex);
	NATS_BEGIN(saved);
	if (conn->threadless)
		loop_hang_up(conn);
	natsSubscription_Destroy(conn->reply_sub);
	jsCtx_Destroy(conn->js);
	natsConnection_Destroy(conn->nc);
	NATS_END(saved);
	pfree(conn);
}

/*
 * agog_conn_is_usable
 *		True while the connection is connected or reconnecting by itself.  A
 *		thread-less connection first takes in what arrived since its last
 *		use, so a close by the server is seen here, before a request is sent.
 *		One whose socket failed, or whose earlier requests the server has not
 *		taken off the socket any further since the last call ended (a frozen
 *		server), is not usable either: nats.c applies no write deadline to
 *		it, and its buffer would grow with every call.
 */
bool
agog_conn_is_usable(AgogConn *conn)
{
	sigset_t	saved;
	natsConnStatus st;
	bool		stuck = false;

	if (conn == NULL)
		return false;
	NATS_BEGIN(saved);
	if (conn->threadless)
	{
		loop_catch_up(conn);
		if (conn->want_write)
		{
			int			left = natsConnection_Buffered(conn->nc);

			stuck = left > 0 && left >= conn->left_buffered;
		}
		stuck = stuck || conn->broken;
	}
	st = natsConnection_Status(conn->nc);
	NATS_END(saved);
	if (stuck)
		return false;
	if (conn->with_events)
		return st != NATS_CONN_STATUS_CLOSED;
	return st == NATS_CONN_STATUS_CONNECTED;
}

/*
 * agog_conn_is_connected
 *		True only while the connection is connected right now.
 */
bool
agog_conn_is_connected(AgogConn *conn)
{
	sigset_t	saved;
	natsConnStatus st;

	if (conn == NULL)
		return false;
	NATS_BEGIN(saved);
	st = natsConnection_Status(conn->nc);
	NATS_END(saved);
	return st == NATS_CONN_STATUS_CONNECTED;
}

/*
 * agog_conn_max_payload
 *		The server's max_payload, as it announced it; headers count in it.
 */
int64
agog_conn_max_payload(AgogConn *conn)
{
	sigset_t	saved;
	int64		max;

	NATS_BEGIN(saved);
	max = natsConnection_GetMaxPayload(conn->nc);
	NATS_END(saved);
	return max;
}

/*
 * agog_conn_server
 *		The url of the server connected to, without any user information.
 */
void
agog_conn_server(AgogConn *conn, char *buf, size_t len)
{
	sigset_t	saved;
	natsStatus	s;
	char		raw[AGOG_SERVER_LEN];
	char	   *scheme;
	char	   *at;

	raw[0] = '\0';
	NATS_BEGIN(saved);
	s = natsConnection_GetConnectedUrl(conn->nc, raw, sizeof(raw));
	NATS_END(saved);
	if (s != NATS_OK)
		raw[0] = '\0';

	scheme = strstr(raw, "://");
	at = strchr(raw, '@');
	if (scheme != NULL && at != NULL && at > scheme)
		snprintf(buf, len, "%.*s%s", (int) (scheme + 3 - raw), raw, at + 1);
	else
		strlcpy(buf, raw, len);
}

/*
 * agog_conn_event_fd
 *		The file descriptor the worker adds to its wait: readable when
 *		nats.c reported a disconnect, reconnect or close.
 */
int
agog_conn_event_fd(AgogConn *conn)
{
	return conn_events.pipe_rd;
}

/*
 * agog_conn_take_events
 *		Drain the event pipe and read the counters.  Runs in the worker.
 */
void
agog_conn_take_events(AgogConn *conn, AgogConnEvents *events)
{
	char		buf[64];

	if (conn_events.pipe_rd >= 0)
		while (read(conn_events.pipe_rd, buf, sizeof(buf)) > 0)
			;
	events->disconnects = __atomic_load_n(&conn_events.disconnects, __ATOMIC_SEQ_CST);
	events->reconnects = __atomic_load_n(&conn_events.reconnects, __ATOMIC_SEQ_CST);
	events->bells = __atomic_load_n(&conn_events.bells, __ATOMIC_SEQ_CST);
}

/*
 * backend_conn_current
 *		Whether the cached connection (not NULL) was opened with these
 *		settings, is of the kind they ask for (with or without nats.c's
 *		threads: agog_nats.stream_replicas decides) and is still usable.
 */
static bool
backend_conn_current(const char *settings)
{
	return strcmp(backend_conn_url, settings) == 0 &&
		backend_conn->loop_asked == loop_wanted(agog_url, false) &&
		agog_conn_is_usable(backend_conn);
}

/*
 * agog_backend_conn
 *		The backend's cached connection, opened on first use and opened again
 *		when it was lost or its settings changed (a SIGHUP).  Throws when the
 *		server cannot be reached within agog_nats.timeout_ms.
 */
AgogConn *
agog_backend_conn(void)
{
	AgogError	err;
	char		name[64];
	char	   *settings;

	/* the settings exist only when the library was preloaded */
	agog_shmem_attach();
	settings = agog_conn_settings();
	if (backend_conn != NULL && !backend_conn_current(settings))
	{
		agog_conn_close(backend_conn);
		backend_conn = NULL;
	}
	if (backend_conn != NULL)
		return backend_conn;

	if (backend_conn_url != NULL)
		pfree(backend_conn_url);
	backend_conn_url = MemoryContextStrdup(TopMemoryContext, settings);

	snprintf(name, sizeof(name), "agog_nats backend %d", MyProcPid);
	backend_conn = agog_conn_open(agog_url, name, false, &err);
	if (backend_conn == NULL)
		agog_raise(&err, gettext_noop("could not connect to NATS"));
	return backend_conn;
}

/*
 * agog_backend_conn_if_open
 *		The backend's cached connection when it is open, usable and opened
 *		with the current settings; NULL otherwise.  Never connects and never
 *		throws, so a caller can use NATS early only when that costs nothing.
 */
AgogConn *
agog_backend_conn_if_open(void)
{
	char	   *settings;
	bool		current;

	if (backend_conn == NULL)
		return NULL;
	settings = agog_conn_settings();
	current = backend_conn_current(settings);
	pfree(settings);
	return current ? backend_conn : NULL;
}

/* ----------------------------------------------------------------
 * Bounded waits
 * ----------------------------------------------------------------
 */
static void
budget_start(WaitBudget *b)
{
	b->start = GetCurrentTimestamp();
	b->attempt = 0;
}

/*
 * budget_next_slice
 *		The wait for the next attempt, in ms, or 0 when agog_nats.timeout_ms
 *		is used up.  Runs the interrupt check before every attempt but the
 *		first; *interrupted is set when the worker is asked to stop.
 */
static int64
budget_next_slice(WaitBudget *b, const int64 *slices, int nslices,
				  bool *interrupted)
{
	long		secs;
	int			usecs;
	int64		elapsed_ms;
	int64		remaining;
	int64		slice;

	*interrupted = false;
	if (b->attempt > 0 && interrupt_check())
	{
		*interrupted = true;
		return 0;
	}
	TimestampDifference(b->start, GetCurrentTimestamp(), &secs, &usecs);
	elapsed_ms = (int64) secs * 1000 + usecs / 1000;
	remaining = agog_timeout_ms - elapsed_ms;
	if (remaining <= 0)
		return 0;
	slice = slices[Min(b->attempt, nslices - 1)];
	b->attempt++;
	return Min(slice, remaining);
}

/*
 * set_timeout_error
 *		Fill *err for a bounded wait that ran out, or that a shutdown
 *		request cut short.  No I/O; never throws.
 */
static void
set_timeout_error(AgogError *err, bool interrupted)
{
	if (interrupted)
		set_error(err, ERRCODE_ADMIN_SHUTDOWN, "the wait was interrupted by a shutdown request");
	else
	{
		char		text[128];

		snprintf(text, sizeof(text), "no answer within agog_nats.timeout_ms (%d ms)",
				 agog_timeout_ms);
		set_error(err, ERRCODE_CONNECTION_FAILURE, text);
		err->status = (int) NATS_TIMEOUT;
	}
}

/*
 * One attempt of a sliced wait: runs its own signal-blocked section, waits
 * at most wait_ms, and fills *err for any failure but NATS_TIMEOUT.
 */
typedef natsStatus (*AttemptFn) (AgogConn *conn, int64 wait_ms, void *arg,
								 AgogError *err);

/* The pause before asking again a stream that had no leader. */
#define NO_LEADER_PAUSE_MS 50

/*
 * run_sliced
 *		Run attempt until it answers something other than NATS_TIMEOUT, or
 *		agog_nats.timeout_ms is used up, checking for interrupts between
 *		slices.  A timeout (or an interrupt) sets *err.  With
 *		retry_no_responders, "no responders" is asked again after a short
 *		pause on the process latch as well: a replicated stream between two
 *		leaders (one server of the cluster died) answers nothing for a
 *		moment.  When the time runs out then, the error is the last one.
 */
static natsStatus
run_sliced(AgogConn *conn, AttemptFn attempt, void *arg,
		   bool retry_no_responders, AgogError *err)
{
	WaitBudget	budget;
	bool		interrupted = false;
	natsStatus	s = NATS_TIMEOUT;

	memset(err, 0, sizeof(*err));
	budget_start(&budget);
	for (;;)
	{
		int64		slice = budget_next_slice(&budget, wait_slices,
											  nwait_slices, &interrupted);

		if (slice <= 0)
			break;
		s = attempt(conn, slice, arg, err);
		if (s == NATS_NO_RESPONDERS && retry_no_responders)
		{
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 Min(slice, NO_LEADER_PAUSE_MS), PG_WAIT_EXTENSION);
			ResetLatch(MyLatch);
			continue;
		}
		if (s != NATS_TIMEOUT)
			break;
	}
	if (s == NATS_TIMEOUT)
		set_timeout_error(err, interrupted);
	else if (interrupted)
		set_timeout_error(err, true);
	return s;
}

/* ----------------------------------------------------------------
 * The backend as its loop
 *
 * nats.c runs a reader thread for each connection: a reply wakes that
 * thread, which parses it and then wakes the caller waiting on a condition
 * variable.  A backend's connection (single-replica streams, no TLS) is
 * instead attached to an "external event loop" that is the backend itself:
 * nats.c starts no reader, flusher or ping thread for it, and the backend
 * reads its replies on its own thread (poll(2) on the socket, then
 * natsConnection_ProcessReadEvent), one thread hand-off less per call (see
 * docs/benchmarks.md, "Tenth round").  Nothing reads the socket between
 * calls, so every use starts by taking in what arrived meanwhile: the
 * server's PINGs are answered then, and a connection the server closed (a
 * restart, or too many PINGs left unanswered by a long-idle backend) is
 * found closed and opened again before anything is sent on it.
 *
 * The callbacks below run only on the backend's own thread: no nats.c
 * thread touches a connection that has no reader, flusher, ping timer or
 * reconnect.  Replicated streams keep the threaded connection: reading
 * through the stream leader uses nats.c's blocking helpers (js_GetLastMsg),
 * which need its reader thread.  So does TLS, so that OpenSSL's own
 * buffering never hides a reply from poll(2).
 * ----------------------------------------------------------------
 */

/*
 * loop_attach
 *		nats.c attached the connection: remember its socket.  With no ping
 *		of our own, a peer that vanished without a word (its host down, a
 *		NAT entry dropped) is left to TCP: bytes unacknowledged for twice
 *		agog_nats.timeout_ms (at least 10 s) fail the socket, and the next
 *		use opens a new connection.
 */
static natsStatus
loop_attach(void **userData, void *loop, natsConnection *nc, natsSock sock)
{
	AgogConn   *conn = (AgogConn *) loop;
	unsigned int user_timeout = (unsigned int) Max(2 * (int64) agog_timeout_ms, 10000);

	conn->sock = (int) sock;
	conn->detached = false;
	conn->broken = false;
	(void) setsockopt(conn->sock, IPPROTO_TCP, TCP_USER_TIMEOUT,
					  &user_timeout, sizeof(user_timeout));
	*userData = conn;
	return NATS_OK;
}

/* The socket is always polled for reading while a call waits. */
static natsStatus
loop_read(void *userData, bool add)
{
	return NATS_OK;
}

/* nats.c has bytes to send (add), or sent them all. */
static natsStatus
loop_write(void *userData, bool add)
{
	((AgogConn *) userData)->want_write = add;
	return NATS_OK;
}

/* nats.c closed the connection. */
static natsStatus
loop_detach(void *userData)
{
	AgogConn   *conn = (AgogConn *) userData;

	conn->detached = true;
	conn->want_write = false;
	return NATS_OK;
}

/*
 * loop_wanted
 *		Whether a connection opened now goes without nats.c's threads: a
 *		backend's, with single-replica streams and no TLS.
 */
static bool
loop_wanted(const char *url, bool keep_reconnecting)
{
	return !keep_reconnecting && agog_stream_replicas == 1 &&
		!tls_asked() &&
		strstr(url, "tls://") == NULL;
}

/*
 * server_requires_tls
 *		Whether a server says, in the INFO line it sends to every client that
 *		connects, that it requires TLS: nats.c would then switch to TLS by
 *		itself even though no TLS setting asks for it, and OpenSSL waits
 *		without a bound inside nats.c when a record arrives in parts, which a
 *		thread-less connection must never do.  server is the first of
 *		agog_nats.url's servers, the one nats.c tries first.  Reads at most
 *		wait_ms (the first connect slice, so a link slower than that keeps
 *		the threaded connection); a server that cannot be asked counts as
 *		requiring TLS, so the connection keeps nats.c's threads.  Runs in a
 *		backend before connecting; never throws.
 */
static bool
server_requires_tls(const char *server, int wait_ms)
{
	char		host[256];
	char		port[16] = "4222";
	const char *p = server_authority(server);
	const char *colon;
	struct addrinfo hints;
	struct addrinfo *addrs = NULL;
	char		info[4096];
	size_t		got = 0;
	int			fd = -1;
	bool		requires = true;
	TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), wait_ms);

	/* host[:port], host maybe [IPv6]; credentials were refused before */
	if (*p == '[')
	{
		const char *end = strchr(p, ']');

		if (end == NULL)
			return true;
		snprintf(host, sizeof(host), "%.*s", (int) (end - p - 1), p + 1);
		colon = (end[1] == ':') ? end + 1 : NULL;
	}
	else
	{
		colon = strrchr(p, ':');
		snprintf(host, sizeof(host), "%.*s", (int) (colon ? colon - p : strlen(p)), p);
	}
	if (colon != NULL && colon[1] != '\0')
		snprintf(port, sizeof(port), "%.*s", (int) strcspn(colon + 1, "/"), colon + 1);

	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	if (getaddrinfo(host, port, &hints, &addrs) != 0 || addrs == NULL)
		return true;
	/* every address in turn, as nats.c does ("localhost" may give ::1 first) */
	for (struct addrinfo *ai = addrs; ai != NULL; ai = ai->ai_next)
	{
		bool		answered = false;

		fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
		if (fd >= 0 &&
			(connect(fd, ai->ai_addr, ai->ai_addrlen) == 0 || errno == EINPROGRESS))
		{
			for (;;)
			{
				long		left = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), deadline);
				struct pollfd pfd = {fd, POLLIN, 0};
				ssize_t		n;

				if (left <= 0 || poll(&pfd, 1, (int) left) <= 0)
					break;
				n = recv(fd, info + got, sizeof(info) - 1 - got, 0);
				if (n <= 0)
					break;
				got += n;
				info[got] = '\0';
				if (strstr(info, "\r\n") != NULL || got == sizeof(info) - 1)
				{
					/* nats-server writes its INFO as compact JSON */
					requires = strncmp(info, "INFO ", 5) != 0 ||
						strstr(info, "\"tls_required\":true") != NULL;
					answered = true;
					break;
				}
			}
		}
		if (fd >= 0)
			close(fd);
		fd = -1;
		got = 0;
		if (answered ||
			TimestampDifferenceMilliseconds(GetCurrentTimestamp(), deadline) <= 0)
			break;
	}
	freeaddrinfo(addrs);
	return requires;
}

/*
 * loop_turn
 *		Wait at most wait_ms for the socket, then send what nats.c has
 *		buffered and take in what arrived (replies, PINGs, the close).
 *		wait_ms 0 only looks.  Returns NATS_TIMEOUT when nothing happened,
 *		NATS_CONNECTION_CLOSED once nats.c closed the connection.  Runs inside
 *		a signal-blocked section, on a thread-less connection.
 */
static natsStatus
loop_turn(AgogConn *conn, int64 wait_ms)
{
	struct pollfd p;
	int			r;

	if (conn->detached)
		return NATS_CONNECTION_CLOSED;
	p.fd = conn->sock;
	p.events = POLLIN | (conn->want_write ? POLLOUT : 0);
	p.revents = 0;
	r = poll(&p, 1, (int) Min(wait_ms, INT_MAX));
	if (r < 0 && errno != EINTR)
	{
		conn->broken = true;	/* replaced at its next use */
		return NATS_IO_ERROR;
	}
	if (r <= 0)
		return NATS_TIMEOUT;
	if ((p.revents & POLLNVAL) != 0)
	{
		conn->broken = true;	/* no socket: never spin on it */
		return NATS_CONNECTION_CLOSED;
	}
	if ((p.revents & POLLOUT) != 0)
		natsConnection_ProcessWriteEvent(conn->nc);
	if ((p.revents & (POLLIN | POLLHUP | POLLERR)) != 0 && !conn->detached)
		natsConnection_ProcessReadEvent(conn->nc);
	return conn->detached ? NATS_CONNECTION_CLOSED : NATS_OK;
}

/*
 * loop_catch_up
 *		Without waiting: send what is buffered (a request just made, PONGs)
 *		as far as the socket takes it, and take in everything that arrived.
 *		Runs inside a signal-blocked section, on a thread-less connection.
 */
static void
loop_catch_up(AgogConn *conn)
{
	if (conn->want_write && !conn->detached)
		natsConnection_ProcessWriteEvent(conn->nc);
	/* bounded: a socket that keeps delivering is left for the next wait */
	for (int i = 0; i < 64; i++)
		if (loop_turn(conn, 0) != NATS_OK)
			break;
}

/*
 * loop_hang_up
 *		Close a thread-less connection from this side before it is destroyed.
 *		nats.c's own close of a connected connection flushes what it holds
 *		(an UNSUB at least) with a PING and waits half a second for a PONG
 *		that nothing would read.  Shutting the socket down makes the next
 *		read see its end, and nats.c then closes the connection as lost,
 *		without that flush.  Runs inside a signal-blocked section.
 */
static void
loop_hang_up(AgogConn *conn)
{
	if (conn->detached)
		return;
	if (conn->sock >= 0)
		(void) shutdown(conn->sock, SHUT_RDWR);
	/* each read takes at most 32 KB: room for a full receive buffer of late replies */
	for (int i = 0; i < 1024 && !conn->detached; i++)
		natsConnection_ProcessReadEvent(conn->nc);
}

/*
 * next_reply
 *		The next message on the reply subscription, waiting at most wait_ms.
 *		On a thread-less connection the backend reads the socket itself, and
 *		notes the bytes still unsent when it stops waiting (what its next
 *		use compares with, see agog_conn_is_usable).  Runs inside a
 *		signal-blocked section.
 */
static natsStatus
next_reply(AgogConn *conn, natsMsg **m, int64 wait_ms)
{
	int64		deadline = nats_Now() + wait_ms;
	natsStatus	s;

	if (!conn->threadless)
		return natsSubscription_NextMsg(m, conn->reply_sub, wait_ms);
	for (;;)
	{
		int64		remaining;

		s = natsSubscription_NextMsg(m, conn->reply_sub, 0);
		if (s != NATS_TIMEOUT)
			break;
		remaining = deadline - nats_Now();
		if (remaining <= 0)
			break;
		s = loop_turn(conn, remaining);
		if (s != NATS_OK && s != NATS_TIMEOUT)
			break;
	}
	conn->left_buffered = natsConnection_Buffered(conn->nc);
	return s;
}

/* ----------------------------------------------------------------
 * Requests by hand
 *
 * A backend's requests (publish, direct get, the stream checks and list)
 * are sent by hand, not through nats.c's helpers (js_Publish,
 * js_DirectGetMsg, natsConnection_Request): those wait on a condition
 * variable for nats.c's reader thread, which a thread-less connection does
 * not have, and a direct get by hand lets agog_fetch_report send one, read
 * the outbox during its round trip, and only then wait for the answer.
 * Each connection has one synchronous subscription on <inbox>.*, and every
 * request a reply subject of its own, <inbox>.<n>; the caller takes its
 * reply from that subscription itself, and drops the replies that name
 * another n (a slice ran out, or a fetch did not wait).  The connection is
 * opened with SendAsap, so a request is written to the socket by the caller
 * and not left for nats.c's flusher thread, which waits about a millisecond.
 *
 * A "no responders" status is the one reply that cannot be told apart:
 * natsSubscription_NextMsg consumes it and answers NATS_NO_RESPONDERS,
 * without the subject.  So before a request is sent after one nobody
 * waited for, the replies already queued are dropped, a "no responders"
 * among them included.  A direct get only gets that status when JetStream is
 * off altogether (a stream that does not exist gives no answer at all),
 * and then the next request gets it as well.
 * ----------------------------------------------------------------
 */

/*
 * request_settle
 *		Drop the replies already queued on the reply subscription, once a
 *		request was sent that nobody waited for (conn->unsettled).  Runs
 *		inside a signal-blocked section.
 */
static natsStatus
request_settle(AgogConn *conn)
{
	if (conn->unsettled == 0)
		return NATS_OK;
	conn->unsettled = 0;
	if (conn->threadless)
		loop_catch_up(conn);	/* the replies that arrived are read first */
	for (;;)
	{
		natsMsg    *m = NULL;
		natsStatus	s = natsSubscription_NextMsg(&m, conn->reply_sub, 0);

		if (s == NATS_NO_RESPONDERS)
			continue;
		if (s == NATS_TIMEOUT)
			return NATS_OK;		/* nothing more is queued */
		if (s != NATS_OK)
			return s;
		natsMsg_Destroy(m);
	}
}

/*
 * request_send
 *		Send one request with a reply subject of its own; *token names the
 *		reply for request_wait.  msg_id, when set, goes out as the
 *		Nats-Msg-Id header.  Runs inside a signal-blocked section: nats.c and
 *		plain C only.
 */
static natsStatus
request_send(AgogConn *conn, const char *subject, const char *msg_id,
			 const char *data, int len, uint64 *token)
{
	natsStatus	s = NATS_OK;
	char		reply[96];

	if (conn->reply_sub == NULL)
	{
		natsInbox  *inbox = NULL;
		char		wildcard[96];

		s = natsInbox_Create(&inbox);
		if (s == NATS_OK)
		{
			strlcpy(conn->reply_prefix, (const char *) inbox,
					sizeof(conn->reply_prefix));
			snprintf(wildcard, sizeof(wildcard), "%s.*", conn->reply_prefix);
			s = natsConnection_SubscribeSync(&conn->reply_sub, conn->nc, wildcard);
		}
		natsInbox_Destroy(inbox);
		if (s != NATS_OK)
		{
			conn->reply_sub = NULL;
			return s;
		}
	}

	s = request_settle(conn);
	if (s != NATS_OK)
		return s;
	*token = ++conn->reply_seq;
	snprintf(reply, sizeof(reply), "%s." UINT64_FORMAT, conn->reply_prefix, *token);
	if (msg_id == NULL)
		s = natsConnection_PublishRequest(conn->nc, subject, reply, data, len);
	else
	{
		natsMsg    *m = NULL;

		s = natsMsg_Create(&m, subject, reply, data, len);
		if (s == NATS_OK)
			s = natsMsgHeader_Set(m, "Nats-Msg-Id", msg_id);
		if (s == NATS_OK)
			s = natsConnection_PublishMsg(conn->nc, m);
		natsMsg_Destroy(m);
	}
	/* on the wire now, so the caller may work during the round trip */
	if (s == NATS_OK && conn->threadless)
		loop_catch_up(conn);
	return s;
}

/*
 * request_wait
 *		Wait at most wait_ms for the reply to the request named by token, and
 *		drop the late replies of earlier requests on the way.  A "no
 *		responders" status is this request's (the earlier ones were settled)
 *		and answers NATS_NO_RESPONDERS.  The reply is the caller's to
 *		destroy.  Runs inside a signal-blocked section.
 */
static natsStatus
request_wait(AgogConn *conn, uint64 token, int64 wait_ms, natsMsg **reply)
{
	int64		deadline = nats_Now() + wait_ms;
	char		want[96];

	*reply = NULL;
	if (conn->reply_sub == NULL)
		return NATS_ILLEGAL_STATE;
	snprintf(want, sizeof(want), "%s." UINT64_FORMAT, conn->reply_prefix, token);
	for (;;)
	{
		natsMsg    *m = NULL;
		int64		remaining = deadline - nats_Now();
		natsStatus	s;

		if (remaining <= 0)
			s = NATS_TIMEOUT;
		else
			s = next_reply(conn, &m, remaining);
		if (s == NATS_TIMEOUT || s == NATS_NO_RESPONDERS)
		{
			/*
			 * Its reply may still come (or, when the status was an earlier
			 * request's, may be queued): drop it before the next request.
			 */
			conn->unsettled = token;
		}
		if (s != NATS_OK)
			return s;
		if (strcmp(natsMsg_GetSubject(m), want) != 0)
		{
			natsMsg_Destroy(m);		/* the reply to an earlier request */
			continue;
		}
		if (natsMsg_IsNoResponders(m))
		{
			/* a nats.c that hands the status over instead of consuming it */
			natsMsg_Destroy(m);
			return NATS_NO_RESPONDERS;
		}
		*reply = m;
		return NATS_OK;
	}
}

/*
 * request_status
 *		The status line of a reply that carries one ("404", "408", ...), or
 *		NULL for a plain reply.  Its description, if any, goes to *text.
 *		Runs inside a signal-blocked section.
 */
static const char *
request_status(natsMsg *m, const char **text)
{
	const char *status = NULL;

	*text = NULL;
	if (natsMsgHeader_Get(m, "Status", &status) != NATS_OK || status == NULL)
		return NULL;
	if (natsMsgHeader_Get(m, "Description", text) != NATS_OK)
		*text = NULL;
	return status;
}

/* ----------------------------------------------------------------
 * JetStream API replies
 * ----------------------------------------------------------------
 */

/* What a JetStream API reply says, as far as this file reads it. */
typedef struct ApiReply
{
	int			depth;			/* nesting of objects and arrays */
	bool		is_object;		/* the reply is one JSON object */
	bool		in_error;		/* inside its "error" object */
	char	   *field;			/* the field whose value comes next */
	bool		has_error;
	int			err_code;
	char		description[AGOG_ERROR_LEN];
	bool		has_stream;
	char		stream[AGOG_SERVER_LEN];
	bool		has_seq;
	uint64		seq;
	bool		duplicate;
} ApiReply;

/*
 * reply_object_start, reply_object_end, reply_array_start, reply_array_end,
 * reply_field, reply_scalar
 *		pg_parse_json's callbacks for api_reply_read: they track the nesting
 *		and keep the few fields read, in plain C.  They run after the
 *		signal-blocked section and never throw.
 */
static void
reply_object_start(void *state)
{
	ApiReply   *r = (ApiReply *) state;

	if (r->depth == 0)
		r->is_object = true;
	else if (r->depth == 1 && r->field != NULL && strcmp(r->field, "error") == 0)
		r->in_error = r->has_error = true;
	r->depth++;
}

static void
reply_object_end(void *state)
{
	ApiReply   *r = (ApiReply *) state;

	if (--r->depth == 1)
		r->in_error = false;
}

static void
reply_array_start(void *state)
{
	((ApiReply *) state)->depth++;
}

static void
reply_array_end(void *state)
{
	((ApiReply *) state)->depth--;
}

static void
reply_field(void *state, char *fname, bool isnull)
{
	((ApiReply *) state)->field = fname;
}

static void
reply_scalar(void *state, char *token, JsonTokenType type)
{
	ApiReply   *r = (ApiReply *) state;
	const char *f = r->field;

	if (f == NULL)
		return;
	if (r->depth == 1)
	{
		if (strcmp(f, "stream") == 0 && type == JSON_TOKEN_STRING)
			r->has_stream = strlcpy(r->stream, token, sizeof(r->stream)) < sizeof(r->stream);
		else if (strcmp(f, "seq") == 0 && type == JSON_TOKEN_NUMBER &&
				 strspn(token, "0123456789") == strlen(token))
		{
			r->seq = strtoull(token, NULL, 10);
			r->has_seq = true;
		}
		else if (strcmp(f, "duplicate") == 0)
			r->duplicate = (type == JSON_TOKEN_TRUE);
	}
	else if (r->depth == 2 && r->in_error)
	{
		if (strcmp(f, "err_code") == 0 && type == JSON_TOKEN_NUMBER)
			r->err_code = (int) strtol(token, NULL, 10);
		else if (strcmp(f, "description") == 0 && type == JSON_TOKEN_STRING)
			strlcpy(r->description, token, sizeof(r->description));
	}
}

/*
 * api_reply_read
 *		Read a JetStream API reply (NUL-terminated, body_len bytes): its
 *		stream, seq and duplicate fields (a PubAck's), or its error object
 *		({"error": {"code", "err_code", "description"}}).  Returns false with
 *		*err set when the reply is an error or not a JSON object.  Runs after
 *		the signal-blocked section: PostgreSQL's JSON parser, which reports
 *		bad input as a result, never by throwing.
 */
static bool
api_reply_read(char *body, int body_len, const char *what, ApiReply *r,
			   AgogError *err)
{
	JsonLexContext *lex = makeJsonLexContextCstringLen(body, body_len, PG_UTF8, true);
	JsonSemAction sem;

	memset(r, 0, sizeof(*r));
	memset(&sem, 0, sizeof(sem));
	sem.semstate = r;
	sem.object_start = reply_object_start;
	sem.object_end = reply_object_end;
	sem.array_start = reply_array_start;
	sem.array_end = reply_array_end;
	sem.object_field_start = reply_field;
	sem.scalar = reply_scalar;
	memset(err, 0, sizeof(*err));
	if (pg_parse_json(lex, &sem) != JSON_SUCCESS || !r->is_object)
	{
		char		text[128];

		snprintf(text, sizeof(text), "the server's answer to %s is not a JSON object", what);
		set_error(err, ERRCODE_PROTOCOL_VIOLATION, text);
		return false;
	}
	if (!r->has_error)
		return true;
	err->status = (int) NATS_ERR;
	err->js_code = r->err_code;
	err->sqlstate = map_status(NATS_ERR, (jsErrCode) r->err_code, &err->not_found);
	strlcpy(err->text, r->description[0] ? r->description : "JetStream API error",
			sizeof(err->text));
	return false;
}

/* ----------------------------------------------------------------
 * Publish
 * ----------------------------------------------------------------
 */

typedef struct PublishArgs
{
	const char *subject;
	const char *msg_id;
	const char *data;
	int			len;
	char	   *ack;			/* the PubAck's JSON, NUL-terminated */
	int			ack_len;
	uint64		token;			/* the last send's reply, 0 before the first */
} PublishArgs;

/*
 * publish_attempt
 *		Send the message by hand and wait one slice for its answer, whose
 *		body is copied out for agog_conn_publish to read.  A slice that ran
 *		out sends the message again (same message id), unless the last send
 *		is still being written.  "No responders" carries the code js_Publish
 *		gives it (JetStream not enabled for the subject), so its error reads
 *		as before.
 */
static natsStatus
publish_attempt(AgogConn *conn, int64 wait_ms, void *arg, AgogError *err)
{
	PublishArgs *a = (PublishArgs *) arg;
	sigset_t	saved;
	natsMsg    *reply = NULL;
	uint64		token = 0;
	natsStatus	s;

	NATS_BEGIN(saved);
	if (a->token != 0 && conn->threadless && conn->want_write)
	{
		/*
		 * The last send is not on the socket yet (a slow link or a frozen
		 * server): keep waiting for its answer rather than pile one more
		 * copy of the message behind it in nats.c's buffer.
		 */
		s = NATS_OK;
		token = a->token;
		if (conn->unsettled == token)
			conn->unsettled = 0;
	}
	else
		s = request_send(conn, a->subject, a->msg_id, a->data, a->len, &token);
	a->token = token;
	if (s == NATS_OK)
		s = request_wait(conn, token, wait_ms, &reply);
	if (s == NATS_OK)
	{
		a->ack_len = natsMsg_GetDataLength(reply);
		a->ack = copy_bytes_noerror(natsMsg_GetData(reply), a->ack_len);
	}
	else if (s != NATS_TIMEOUT)
		capture_error(err, s, s == NATS_NO_RESPONDERS ? JSNotEnabledErr : 0);
	natsMsg_Destroy(reply);
	NATS_END(saved);
	return s;
}

/*
 * agog_conn_publish
 *		Publish one message with Nats-Msg-Id = msg_id and wait for its PubAck,
 *		within agog_nats.timeout_ms.  A message larger than the server's
 *		max_payload (headers included) is refused before anything is sent.
 *		On success *stream (palloc'd), *seq and *duplicate describe the ack.
 *		A resend after a slice carries the same message id (deduplicated).
 */
bool
agog_conn_publish(AgogConn *conn, const char *subject, const char *msg_id,
				  const char *data, int len, char **stream, uint64 *seq,
				  bool *duplicate, AgogError *err)
{
	int64		max_payload = agog_conn_max_payload(conn);
	int64		header_len = strlen("NATS/1.0\r\nNats-Msg-Id: \r\n\r\n") + strlen(msg_id);
	PublishArgs a;
	ApiReply	r;

	if ((int64) len + header_len > max_payload)
	{
		char		text[256];

		snprintf(text, sizeof(text),
				 "the message is %lld bytes with its headers, and the server's max_payload is %lld bytes",
				 (long long) (len + header_len), (long long) max_payload);
		set_error(err, ERRCODE_PROGRAM_LIMIT_EXCEEDED, text);
		err->status = (int) NATS_MAX_PAYLOAD;
		return false;
	}

	memset(&a, 0, sizeof(a));
	a.subject = subject;
	a.msg_id = msg_id;
	a.data = data;
	a.len = len;
	if (run_sliced(conn, publish_attempt, &a, agog_stream_replicas > 1, err) != NATS_OK)
		return false;
	if (a.ack == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory"),
				 errdetail("Failed to copy a PubAck of %d bytes.", a.ack_len)));
	if (!api_reply_read(a.ack, a.ack_len, "a publish", &r, err))
		return false;
	if (!r.has_stream || !r.has_seq)
	{
		set_error(err, ERRCODE_PROTOCOL_VIOLATION,
				  "the server's answer to a publish is not a PubAck");
		return false;
	}
	*stream = pstrdup(r.stream);
	*seq = r.seq;
	*duplicate = r.duplicate;
	pfree(a.ack);
	return true;
}

/*
 * agog_conn_publish_send
 *		Send a batch asynchronously, each message with its Nats-Msg-Id, and
 *		return without waiting: the ack handler records each outcome in
 *		items as it arrives.  At most AGOG_MAX_BATCHES batches are in flight;
 *		each must be finished with agog_conn_publish_wait.  Runs in the
 *		worker, whose connection has the ack handler.
 */
void
agog_conn_publish_send(AgogConn *conn, AgogPubItem *items, int n)
{
	PubBatch   *b = NULL;
	sigset_t	saved;

	for (int i = 0; i < n; i++)
	{
		items[i].outcome = AGOG_PUB_UNKNOWN;
		items[i].answered = false;
		items[i].stream[0] = '\0';
		items[i].seq = 0;
		items[i].duplicate = false;
		memset(&items[i].err, 0, sizeof(items[i].err));
	}

	pthread_mutex_lock(&batch_mutex);
	for (int k = 0; k < AGOG_MAX_BATCHES && b == NULL; k++)
		if (batches[k].items == NULL)
			b = &batches[k];
	if (b != NULL)
	{
		b->items = items;
		b->n = n;
		b->unanswered = n;
		b->next = 0;
	}
	pthread_mutex_unlock(&batch_mutex);
	if (b == NULL)
		elog(ERROR, "more than %d asynchronous publish batches in flight", AGOG_MAX_BATCHES);

	NATS_BEGIN(saved);
	for (int i = 0; i < n; i++)
	{
		jsPubOptions popts;
		natsStatus	s;

		jsPubOptions_Init(&popts);
		popts.MsgId = items[i].msg_id;
		popts.MaxWait = agog_timeout_ms;
		s = js_PublishAsync(conn->js, items[i].subject, items[i].data,
							items[i].len, &popts);
		if (s != NATS_OK)
		{
			/* not sent; the server cannot have it */
			pthread_mutex_lock(&batch_mutex);
			capture_error(&items[i].err, s, 0);
			items[i].outcome = (s == NATS_MAX_PAYLOAD) ? AGOG_PUB_REFUSED : AGOG_PUB_UNKNOWN;
			items[i].answered = true;
			b->unanswered--;
			pthread_mutex_unlock(&batch_mutex);
		}
	}
	NATS_END(saved);
}

/*
 * agog_conn_publish_wait
 *		Wait until every message of a batch sent with agog_conn_publish_send
 *		has an answer: stored, refused, or unknown (no answer within
 *		agog_nats.timeout_ms: it may have been stored).  Returns false with
 *		*err set only when the wait was interrupted.  When the time is up,
 *		every message still unanswered, of any batch, is taken back from
 *		nats.c and stays unknown.  Runs in the worker.
 */
bool
agog_conn_publish_wait(AgogConn *conn, AgogPubItem *items, AgogError *err)
{
	WaitBudget	budget;
	bool		interrupted = false;
	bool		complete = false;
	PubBatch   *b = NULL;
	int			n;

	memset(err, 0, sizeof(*err));
	for (int k = 0; k < AGOG_MAX_BATCHES && b == NULL; k++)
		if (batches[k].items == items)
			b = &batches[k];
	if (b == NULL)
		elog(ERROR, "asynchronous publish batch not in flight");

	budget_start(&budget);
	for (;;)
	{
		int64		slice = budget_next_slice(&budget, wait_slices, nwait_slices, &interrupted);
		struct timespec until;

		pthread_mutex_lock(&batch_mutex);
		complete = (b->unanswered == 0);
		if (!complete && slice > 0)
		{
			clock_gettime(CLOCK_REALTIME, &until);
			until.tv_sec += slice / 1000;
			until.tv_nsec += (slice % 1000) * 1000000;
			if (until.tv_nsec >= 1000000000)
			{
				until.tv_sec++;
				until.tv_nsec -= 1000000000;
			}
			while (b->unanswered > 0 &&
				   pthread_cond_timedwait(&batch_cond, &batch_mutex, &until) == 0)
				;
			complete = (b->unanswered == 0);
		}
		pthread_mutex_unlock(&batch_mutex);
		if (complete || slice <= 0)
			break;
	}
	if (!complete)
	{
		sigset_t	saved;
		natsMsgList pending;

		/* take back what is still unanswered; it stays unknown */
		NATS_BEGIN(saved);
		if (js_PublishAsyncGetPendingList(&pending, conn->js) == NATS_OK)
			natsMsgList_Destroy(&pending);
		NATS_END(saved);
		pthread_mutex_lock(&batch_mutex);
		for (int k = 0; k < AGOG_MAX_BATCHES; k++)
			batches[k].unanswered = 0;
		pthread_mutex_unlock(&batch_mutex);
	}

	pthread_mutex_lock(&batch_mutex);
	n = b->n;
	b->items = NULL;
	b->n = 0;
	pthread_mutex_unlock(&batch_mutex);

	/* the batch is ours alone now: word its "no responders" on this thread */
	for (int i = 0; i < n; i++)
		if (items[i].answered && items[i].err.status == (int) NATS_NO_RESPONDERS)
			strlcpy(items[i].err.text, no_responders_text(), sizeof(items[i].err.text));

	if (interrupted)
	{
		set_timeout_error(err, true);
		return false;
	}
	return true;
}

/* ----------------------------------------------------------------
 * Get
 * ----------------------------------------------------------------
 */

/* Nanoseconds since the Unix epoch to TimestampTz. */
static TimestampTz
unix_nanos_to_timestamptz(int64 ns)
{
	return (TimestampTz) (ns / 1000) -
		((int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * USECS_PER_DAY);
}

/* palloc that never throws, for use inside a signal-blocked section. */
static char *
copy_bytes_noerror(const char *src, int len)
{
	char	   *dst = palloc_extended(len + 1, MCXT_ALLOC_NO_OOM);

	if (dst != NULL)
	{
		if (len > 0)
			memcpy(dst, src, len);
		dst[len] = '\0';
	}
	return dst;
}

/*
 * copy_msg
 *		Copy a stored message out of nats.c.  Runs inside a signal-blocked
 *		section; returns false when memory ran out.  The timestamp header is
 *		copied as text into time_text for parsing after the section.
 */
static bool
copy_msg(natsMsg *m, const char *stream, AgogMsg *out, char *time_text,
		 size_t time_len)
{
	const char *v = NULL;
	const char *subj = NULL;

	memset(out, 0, sizeof(*out));
	time_text[0] = '\0';

	if (natsMsgHeader_Get(m, "Nats-Subject", &subj) != NATS_OK || subj == NULL)
		subj = natsMsg_GetSubject(m);
	out->subject = copy_bytes_noerror(subj ? subj : "", subj ? strlen(subj) : 0);
	out->len = natsMsg_GetDataLength(m);
	out->data = copy_bytes_noerror(natsMsg_GetData(m), out->len);
	out->stream = copy_bytes_noerror(stream, strlen(stream));

	out->seq = natsMsg_GetSequence(m);
	if (out->seq == 0 && natsMsgHeader_Get(m, "Nats-Sequence", &v) == NATS_OK && v)
		out->seq = strtoull(v, NULL, 10);

	if (natsMsg_GetTime(m) > 0)
		out->time = unix_nanos_to_timestamptz(natsMsg_GetTime(m));
	else if (natsMsgHeader_Get(m, "Nats-Time-Stamp", &v) == NATS_OK && v &&
			 !agog_parse_nats_time(v, (int) strlen(v), &out->time))
		strlcpy(time_text, v, time_len);	/* parsed after the section */

	if (natsMsgHeader_Get(m, "Nats-Msg-Id", &v) == NATS_OK && v)
		out->msg_id = copy_bytes_noerror(v, strlen(v));

	return out->subject && out->data && out->stream;
}

typedef struct GetArgs
{
	const char *stream;
	const char *subject;		/* last on this subject, or NULL */
	uint64		seq;			/* else this sequence */
	bool		from_leader;
	AgogSentGet *sent;			/* a direct get already sent, or NULL */
	AgogMsg    *msg;
	bool		copied;
	char		time_text[64];
	int			unanswered;		/* direct gets that got no answer in their slice */
	bool		stream_seen;	/* the stream is known to exist */
} GetArgs;

/*
 * direct_get_send
 *		Send a direct get of the last message on subject, as
 *		$JS.API.DIRECT.GET.<stream>.<subject> with no body, or of sequence
 *		seq, as $JS.API.DIRECT.GET.<stream> with {"seq": n}.  The first form
 *		(nats-server 2.9, as direct gets themselves) spares the server a JSON
 *		request to decode, as the benchmark's floors ask (a few µs at most,
 *		docs/benchmarks.md, thirteenth round).  The subject's tokens
 *		were checked (no wildcard, no dot), so it names one subject.  Runs
 *		inside a signal-blocked section.
 */
static natsStatus
direct_get_send(AgogConn *conn, const char *stream, const char *subject,
				uint64 seq, uint64 *token)
{
	char		api[2 * AGOG_SERVER_LEN];
	char		payload[64];

	/* the API prefix, agog_features_<token>, a dot, agog.deliverables. and three tokens */
	StaticAssertStmt(sizeof(api) > 19 + 14 + 1 + 18 + 4 * (AGOG_TOKEN_MAX_LEN + 1),
					 "a direct get's subject must fit");
	if (subject != NULL)
	{
		snprintf(api, sizeof(api), "$JS.API.DIRECT.GET.%s.%s", stream, subject);
		return request_send(conn, api, NULL, NULL, 0, token);
	}
	snprintf(api, sizeof(api), "$JS.API.DIRECT.GET.%s", stream);
	snprintf(payload, sizeof(payload), "{\"seq\":" UINT64_FORMAT "}", seq);
	return request_send(conn, api, NULL, payload, (int) strlen(payload), token);
}

/*
 * direct_get_wait
 *		Wait for a direct get's reply: the message, NATS_TIMEOUT, or a failure
 *		described in *err (a status 404 is NATS_NOT_FOUND, another status
 *		NATS_ERR with its description).  Runs inside a signal-blocked section.
 */
static natsStatus
direct_get_wait(AgogConn *conn, uint64 token, int64 wait_ms, natsMsg **m,
				AgogError *err)
{
	natsStatus	s = request_wait(conn, token, wait_ms, m);
	const char *status = NULL;
	const char *text = NULL;

	if (s == NATS_OK && (status = request_status(*m, &text)) != NULL)
		s = strcmp(status, "404") == 0 ? NATS_NOT_FOUND : NATS_ERR;
	else if (s == NATS_OK &&
			 (natsMsgHeader_Get(*m, "Nats-Sequence", &text) != NATS_OK || text == NULL))
	{
		s = NATS_ERR;
		text = "a direct get returned a message without its sequence";
	}
	if (s != NATS_OK && s != NATS_TIMEOUT)
	{
		capture_error(err, s, 0);
		if (text != NULL && text[0] != '\0')
			strlcpy(err->text, text, sizeof(err->text));
	}
	if (s != NATS_OK)
	{
		natsMsg_Destroy(*m);
		*m = NULL;
	}
	return s;
}

/*
 * stream_probe_ask
 *		JetStream takes a direct get of a stream that does not exist and
 *		never answers it, so a get that went unanswered for a slice asks,
 *		once, whether the stream exists: this sends that stream info request
 *		and waits for its reply within wait_ms.  With a reply, *info is a
 *		copy of it (palloc'd; stream_probe_read frees it after the section)
 *		and the result is NATS_TIMEOUT: the get itself is still unanswered.
 *		Without one, *unanswered is raised so that it is not asked again.
 *		Runs inside a signal-blocked section: no ereport (the copy is a
 *		palloc that returns NULL instead of throwing).
 */
static natsStatus
stream_probe_ask(AgogConn *conn, const char *stream, int64 wait_ms,
				 char **info, int *info_len, int *unanswered, AgogError *err)
{
	char		api[AGOG_SERVER_LEN + 32];
	natsMsg    *reply = NULL;
	uint64		token = 0;
	natsStatus	s;

	snprintf(api, sizeof(api), "$JS.API.STREAM.INFO.%s", stream);
	s = request_send(conn, api, NULL, NULL, 0, &token);
	if (s == NATS_OK)
		s = request_wait(conn, token, wait_ms, &reply);
	if (s == NATS_OK)
	{
		*info_len = natsMsg_GetDataLength(reply);
		*info = copy_bytes_noerror(natsMsg_GetData(reply), *info_len);
		s = NATS_TIMEOUT;
		if (*info == NULL)
		{
			s = NATS_NO_MEMORY;
			set_error(err, ERRCODE_OUT_OF_MEMORY, "out of memory for a stream info reply");
		}
	}
	else if (s != NATS_TIMEOUT)
		capture_error(err, s, s == NATS_NO_RESPONDERS ? JSNotEnabledErr : 0);
	else
		(*unanswered)++;		/* no answer either: do not ask again */
	natsMsg_Destroy(reply);
	return s;
}

/*
 * stream_probe_read
 *		Read stream_probe_ask's reply, after the signal-blocked section, and
 *		free it.  The stream exists unless JetStream said otherwise: then
 *		*stream_seen is set and s (the attempt's result) is returned, so the
 *		next slice sends the get again.  A stream not found ends the wait as
 *		a missing message does (NATS_NOT_FOUND, err->not_found set).
 */
static natsStatus
stream_probe_read(char *info, int info_len, bool *stream_seen, natsStatus s,
				  AgogError *err)
{
	ApiReply	r;

	if (api_reply_read(info, info_len, "a stream info request", &r, err))
		*stream_seen = true;
	else
		s = err->not_found ? NATS_NOT_FOUND : NATS_ERR;
	pfree(info);
	return s;
}

/*
 * get_attempt
 *		One attempt of a direct get (or a leader's get), within wait_ms.
 *		Runs in a signal-blocked section: no palloc, no ereport.
 */
static natsStatus
get_attempt(AgogConn *conn, int64 wait_ms, void *arg, AgogError *err)
{
	GetArgs    *a = (GetArgs *) arg;
	sigset_t	saved;
	natsMsg    *m = NULL;
	char	   *info = NULL;	/* a stream info reply, read after the section */
	int			info_len = 0;
	natsStatus	s;

	NATS_BEGIN(saved);
	if (a->from_leader && conn->threadless)
	{
		/* agog_backend_conn opens a threaded connection for replicated streams */
		s = NATS_ILLEGAL_STATE;
		set_error(err, ERRCODE_INTERNAL_ERROR,
				  "a read through the stream leader needs a connection with nats.c's threads");
	}
	else if (a->from_leader)
	{
		jsOptions	jopts;
		jsErrCode	jerr = 0;

		jsOptions_Init(&jopts);
		jopts.Wait = wait_ms;
		if (a->subject != NULL)
			s = js_GetLastMsg(&m, conn->js, a->stream, a->subject, &jopts, &jerr);
		else
			s = js_GetMsg(&m, conn->js, a->stream, a->seq, &jopts, &jerr);
		if (s != NATS_OK && s != NATS_TIMEOUT)
			capture_error(err, s, jerr);
	}
	else if (a->unanswered == 1 && !a->stream_seen)
		s = stream_probe_ask(conn, a->stream, wait_ms, &info, &info_len,
							 &a->unanswered, err);
	else
	{
		uint64		token = 0;

		if (a->sent != NULL)
		{
			/* the first attempt waits for the request sent before */
			s = NATS_OK;
			token = a->sent->token;
			if (conn->unsettled == token)
				conn->unsettled = 0;
			a->sent = NULL;
		}
		else
			s = direct_get_send(conn, a->stream, a->subject, a->seq, &token);
		if (s == NATS_OK)
			s = direct_get_wait(conn, token, wait_ms, &m, err);
		else if (s != NATS_TIMEOUT)
			capture_error(err, s, 0);
		if (s == NATS_TIMEOUT)
			a->unanswered++;
		else
			a->stream_seen = true;	/* answered, message or not */
	}
	if (s == NATS_OK)
		a->copied = copy_msg(m, a->stream, a->msg, a->time_text, sizeof(a->time_text));
	natsMsg_Destroy(m);
	NATS_END(saved);

	if (info != NULL)
		s = stream_probe_read(info, info_len, &a->stream_seen, s, err);
	return s;
}

/*
 * get_msg
 *		Read one stored message, by last-on-subject or by sequence, within
 *		agog_nats.timeout_ms.  from_leader uses the JSON API through the
 *		stream leader (never stale on a replicated stream); otherwise a
 *		direct get that any replica may serve, whose first request may have
 *		been sent already (sent).  A missing message returns false with
 *		err->not_found set; so does a missing stream, through the leader at
 *		once, and with a direct get after one slice (see get_attempt).
 */
static bool
get_msg(AgogConn *conn, const char *stream, const char *subject, uint64 seq,
		bool from_leader, AgogSentGet *sent, AgogMsg *msg, AgogError *err)
{
	GetArgs		a;

	memset(&a, 0, sizeof(a));
	a.stream = stream;
	a.subject = subject;
	a.seq = seq;
	a.from_leader = from_leader;
	a.sent = (sent != NULL && sent->token != 0) ? sent : NULL;
	a.msg = msg;
	if (run_sliced(conn, get_attempt, &a, false, err) != NATS_OK)
		return false;
	if (!a.copied)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory"),
				 errdetail("Failed to copy a message of %d bytes read from NATS.", msg->len)));
	if (msg->time == 0 && a.time_text[0] != '\0')
		msg->time = agog_nats_time(a.time_text, (int) strlen(a.time_text));
	return true;
}

/*
 * agog_conn_get_last_send
 *		Send the direct get of the last message on subject and return without
 *		waiting, so the caller can do other work during the round trip;
 *		agog_conn_get_last with the same *sent collects the reply.  A caller
 *		that no longer wants it just does not collect it: the next wait on the
 *		connection drops it.  Never throws: after a failure to send,
 *		*sent names nothing, and the collecting call sends again.
 */
void
agog_conn_get_last_send(AgogConn *conn, const char *stream, const char *subject,
						AgogSentGet *sent)
{
	sigset_t	saved;
	uint64		token = 0;
	natsStatus	s;

	NATS_BEGIN(saved);
	s = direct_get_send(conn, stream, subject, 0, &token);
	if (s == NATS_OK)
	{
		/* dropped by the next request if the caller does not collect it */
		conn->unsettled = token;
	}
	NATS_END(saved);
	sent->token = (s == NATS_OK) ? token : 0;
}

/*
 * agog_conn_get_last
 *		The last message on subject in stream (see get_msg).
 */
bool
agog_conn_get_last(AgogConn *conn, const char *stream, const char *subject,
				   bool from_leader, AgogSentGet *sent, AgogMsg *msg,
				   AgogError *err)
{
	return get_msg(conn, stream, subject, 0, from_leader, sent, msg, err);
}

/*
 * agog_conn_get_seq
 *		The message at seq in stream (see get_msg).
 */
bool
agog_conn_get_seq(AgogConn *conn, const char *stream, uint64 seq,
				  bool from_leader, AgogMsg *msg, AgogError *err)
{
	return get_msg(conn, stream, NULL, seq, from_leader, NULL, msg, err);
}

typedef struct NextArgs
{
	const char *stream;
	const char *subject;
	const char *msg_id;
	uint64		next;			/* walk from this sequence */
	uint64		found;			/* the sequence of the message read */
	bool		match;			/* its Nats-Msg-Id is msg_id */
	int			unanswered;		/* gets that got no answer in their slice */
	bool		stream_seen;	/* the stream is known to exist */
} NextArgs;

/*
 * next_attempt
 *		One attempt of the resend check's walk: the next message on the
 *		subject from a->next.  A stream that does not exist would never
 *		answer: after one unanswered slice it is asked for, as get_attempt
 *		does.  Signal-blocked but for the probe's reply, read after the
 *		section.
 */
static natsStatus
next_attempt(AgogConn *conn, int64 wait_ms, void *arg, AgogError *err)
{
	NextArgs   *a = (NextArgs *) arg;
	sigset_t	saved;
	jsOptions	jopts;
	jsDirectGetMsgOptions dg;
	natsMsg    *m = NULL;
	char	   *info = NULL;
	int			info_len = 0;
	natsStatus	s;

	NATS_BEGIN(saved);
	if (a->unanswered == 1 && !a->stream_seen)
	{
		s = stream_probe_ask(conn, a->stream, wait_ms, &info, &info_len,
							 &a->unanswered, err);
		NATS_END(saved);
		if (info != NULL)
			s = stream_probe_read(info, info_len, &a->stream_seen, s, err);
		return s;
	}
	jsOptions_Init(&jopts);
	jopts.Wait = wait_ms;
	jsDirectGetMsgOptions_Init(&dg);
	dg.Sequence = a->next;
	dg.NextBySubject = a->subject;
	s = js_DirectGetMsg(&m, conn->js, a->stream, &jopts, &dg);
	if (s == NATS_TIMEOUT)
		a->unanswered++;
	else
		a->stream_seen = true;	/* answered, message or not */
	if (s == NATS_OK)
	{
		const char *v = NULL;

		a->found = natsMsg_GetSequence(m);
		if (a->found == 0 && natsMsgHeader_Get(m, "Nats-Sequence", &v) == NATS_OK && v)
			a->found = strtoull(v, NULL, 10);
		v = NULL;
		a->match = natsMsgHeader_Get(m, "Nats-Msg-Id", &v) == NATS_OK &&
			v != NULL && strcmp(v, a->msg_id) == 0;
	}
	else if (s != NATS_TIMEOUT)
		capture_error(err, s, 0);
	natsMsg_Destroy(m);
	NATS_END(saved);
	return s;
}

/*
 * agog_conn_find_msg_id
 *		Whether a message with this Nats-Msg-Id is stored on the subject, by
 *		walking the subject's messages with direct gets (next by subject).
 *		Used before resending a message whose first send has no known outcome
 *		and may be older than the duplicate window.  The walk is bounded by the
 *		stream's limits (10,000 messages by default).  *seq is 0 when absent.
 */
bool
agog_conn_find_msg_id(AgogConn *conn, const char *stream, const char *subject,
					  const char *msg_id, uint64 *seq, AgogError *err)
{
	NextArgs	a;

	*seq = 0;
	memset(&a, 0, sizeof(a));
	a.stream = stream;
	a.subject = subject;
	a.msg_id = msg_id;
	a.next = 1;
	for (;;)
	{
		natsStatus	s;

		/* a walk of many messages, each answered at once, still stops */
		if (a.next > 1 && interrupt_check())
		{
			set_timeout_error(err, true);
			return false;
		}
		a.found = 0;
		a.match = false;
		s = run_sliced(conn, next_attempt, &a, false, err);
		if (s == NATS_TIMEOUT)
			return false;
		if (s != NATS_OK)
			return err->not_found;	/* walked past the last message */
		if (a.match)
		{
			*seq = a.found;
			return true;
		}
		if (a.found < a.next)
		{
			set_error(err, ERRCODE_EXTERNAL_ROUTINE_EXCEPTION,
					  "a direct get returned a message without its sequence");
			return false;
		}
		a.next = a.found + 1;
	}
}

/* ----------------------------------------------------------------
 * Streams
 * ----------------------------------------------------------------
 */

typedef struct ApiArgs
{
	const char *subject;
	const char *payload;
	char	   *reply;
	int			len;
	bool		copied;
} ApiArgs;

/*
 * api_attempt
 *		One attempt of a JetStream API request sent by hand, within
 *		wait_ms.  Signal-blocked: no palloc, no ereport.
 */
static natsStatus
api_attempt(AgogConn *conn, int64 wait_ms, void *arg, AgogError *err)
{
	ApiArgs    *a = (ApiArgs *) arg;
	sigset_t	saved;
	natsMsg    *reply = NULL;
	uint64		token = 0;
	natsStatus	s;

	a->copied = true;
	NATS_BEGIN(saved);
	s = request_send(conn, a->subject, NULL, a->payload, (int) strlen(a->payload), &token);
	if (s == NATS_OK)
		s = request_wait(conn, token, wait_ms, &reply);
	if (s == NATS_OK)
	{
		a->len = natsMsg_GetDataLength(reply);
		a->reply = copy_bytes_noerror(natsMsg_GetData(reply), a->len);
		a->copied = (a->reply != NULL);
	}
	else if (s != NATS_TIMEOUT)
		capture_error(err, s, 0);
	natsMsg_Destroy(reply);
	NATS_END(saved);
	return s;
}

/*
 * agog_conn_api_request
 *		One request to the JetStream API (subject $JS.API.<api>), within
 *		agog_nats.timeout_ms; the reply's body, NUL-terminated, in the current
 *		memory context.  For the API calls whose nats.c wrapper parses more
 *		than the caller needs: the caller parses the JSON after this returns,
 *		and checks it for an "error" object.
 */
char *
agog_conn_api_request(AgogConn *conn, const char *api, const char *payload,
					  AgogError *err)
{
	ApiArgs		a;
	char		subject[256];

	memset(&a, 0, sizeof(a));
	snprintf(subject, sizeof(subject), "$JS.API.%s", api);
	a.subject = subject;
	a.payload = payload;
	if (run_sliced(conn, api_attempt, &a, false, err) != NATS_OK)
		return NULL;
	if (!a.copied)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory"),
				 errdetail("Failed to copy a JetStream API reply of %d bytes.", a.len)));
	return a.reply;
}

/*
 * description_matches
 *		Whether a stream's description, as nats.c decoded the server's JSON,
 *		is the wanted one.  nats-server writes U+2028 and U+2029 as \u
 *		escapes, and nats.c 3.4.1 keeps only the low byte of a \u escape
 *		('(' and ')'): either form counts as the character, or the stream
 *		would be updated at every reconcile (the one change this misses is
 *		a '(' or ')' replaced by U+2028 or U+2029).  Plain C: runs inside
 *		ensure_attempt's signal-blocked section.
 */
static bool
description_matches(const char *live, const char *want)
{
	while (*want != '\0')
	{
		const unsigned char *w = (const unsigned char *) want;

		if (w[0] == 0xE2 && w[1] == 0x80 && (w[2] == 0xA8 || w[2] == 0xA9))
		{
			if (strncmp(live, want, 3) == 0)
				live += 3;
			else if (*live == (w[2] == 0xA8 ? '(' : ')'))
				live++;
			else
				return false;
			want += 3;
			continue;
		}
		if (*live != *want)
			return false;
		live++;
		want++;
	}
	return *live == '\0';
}

/*
 * config_matches
 *		Whether a stream's live configuration already is the desired one.
 *		description is the wanted description as written (want's is
 *		escaped for the request; nats.c hands back the live one unescaped).
 *		Plain C over nats.c's structure; runs inside a blocked section.
 */
static bool
config_matches(const jsStreamConfig *live, const jsStreamConfig *want,
			   const char *description)
{
	if (live->SubjectsLen != 1 || strcmp(live->Subjects[0], want->Subjects[0]) != 0)
		return false;
	return live->Retention == want->Retention &&
		live->MaxMsgs == want->MaxMsgs &&
		live->MaxBytes == want->MaxBytes &&
		live->MaxAge == want->MaxAge &&
		live->MaxMsgSize == want->MaxMsgSize &&
		live->Discard == want->Discard &&
		live->Storage == want->Storage &&
		live->Replicas == want->Replicas &&
		live->Duplicates == want->Duplicates &&
		live->AllowDirect == want->AllowDirect &&
		description_matches(live->Description ? live->Description : "",
							description ? description : "");
}

/*
 * keep_larger
 *		Whether the live limit holds more than the wanted one (a limit of 0
 *		or less is no limit); if so, *want becomes the live limit.  Plain C:
 *		runs inside ensure_attempt's signal-blocked section.
 */
static bool
keep_larger(int64 live, int64 *want)
{
	if (live > 0 && live <= *want)
		return false;
	*want = live;
	return true;
}

/*
 * window_within_age
 *		JetStream refuses a duplicate window longer than the stream's max
 *		age, and an agent's max_age may be as short as a second.  A message
 *		older than its stream's max age is gone, so a resend later than that
 *		cannot make a second copy: the window may end at the max age.  Plain
 *		C; runs inside ensure_attempt's signal-blocked section.
 */
static void
window_within_age(jsStreamConfig *cfg)
{
	if (cfg->MaxAge > 0 && cfg->Duplicates > cfg->MaxAge)
		cfg->Duplicates = cfg->MaxAge;
}

typedef struct EnsureArgs
{
	const AgogStreamSpec *spec;
	const char *description_json;	/* spec's description, JSON-escaped */
	AgogEnsureResult result;
} EnsureArgs;

/*
 * json_string_body
 *		s escaped as the inside of a JSON string, without the quotes.
 *		nats.c writes a stream's description into the configuration's JSON
 *		as it is given: a quote in it would end the string there, and what
 *		follows would be read as fields of the configuration (sealed,
 *		sources, republish), sent with the worker's credentials by whoever
 *		may change agog_nats.agents.  Runs in the worker, before any blocked
 *		section; the result is palloc'd in the current memory context.
 */
static char *
json_string_body(const char *s)
{
	StringInfoData buf;
	char	   *body;

	initStringInfo(&buf);
	escape_json(&buf, s);
	body = pnstrdup(buf.data + 1, buf.len - 2);
	pfree(buf.data);
	return body;
}

/*
 * ensure_attempt
 *		One try of agog_conn_ensure_stream within wait_ms, for run_sliced:
 *		look the stream up, create it when missing, or update it when its
 *		configuration differs from the spec (keeping larger live limits
 *		unless the spec may lower them).  Runs in the worker, signals
 *		blocked: nats.c and plain C only.
 */
static natsStatus
ensure_attempt(AgogConn *conn, int64 wait_ms, void *arg, AgogError *err)
{
	EnsureArgs *a = (EnsureArgs *) arg;
	const AgogStreamSpec *spec = a->spec;
	const char *subjects[1] = {spec->subject};
	sigset_t	saved;
	jsOptions	jopts;
	jsStreamConfig cfg;
	jsStreamInfo *si = NULL;
	jsErrCode	jerr = 0;
	natsStatus	s;

	NATS_BEGIN(saved);
	jsOptions_Init(&jopts);
	jopts.Wait = wait_ms;
	jsStreamConfig_Init(&cfg);
	cfg.Name = spec->name;
	cfg.Description = a->description_json;
	cfg.Subjects = subjects;
	cfg.SubjectsLen = 1;
	cfg.Retention = js_LimitsPolicy;
	cfg.MaxMsgs = spec->max_msgs;
	cfg.MaxBytes = spec->max_bytes;
	cfg.MaxAge = spec->max_age_ms * 1000000;
	cfg.MaxMsgSize = spec->max_msg_size;
	cfg.Discard = js_DiscardOld;
	cfg.Storage = js_FileStorage;
	cfg.Replicas = spec->replicas;
	cfg.Duplicates = spec->duplicate_window_ms * 1000000;
	cfg.AllowDirect = true;

	s = js_GetStreamInfo(&si, conn->js, spec->name, &jopts, &jerr);
	if (s == NATS_NOT_FOUND || jerr == JSStreamNotFoundErr)
	{
		jerr = 0;
		window_within_age(&cfg);
		s = js_AddStream(NULL, conn->js, &cfg, &jopts, &jerr);
		a->result.created = (s == NATS_OK);
		a->result.create_refused = (s != NATS_OK && jerr != 0);
	}
	else if (s == NATS_OK)
	{
		/* a lower limit drops stored reports: only on the user's word */
		if (!spec->may_lower)
		{
			const jsStreamConfig *live = si->Config;
			bool		kept = false;

			kept |= keep_larger(live->MaxMsgs, &cfg.MaxMsgs);
			kept |= keep_larger(live->MaxBytes, &cfg.MaxBytes);
			kept |= keep_larger(live->MaxAge, &cfg.MaxAge);
			if (kept)
			{
				a->result.kept = true;
				a->result.live_max_msgs = live->MaxMsgs;
				a->result.live_max_bytes = live->MaxBytes;
				a->result.live_max_age_ms = live->MaxAge / 1000000;
			}
		}
		window_within_age(&cfg);	/* of the max age kept, if it was */
		if (!config_matches(si->Config, &cfg, spec->description))
		{
			s = js_UpdateStream(NULL, conn->js, &cfg, &jopts, &jerr);
			a->result.updated = (s == NATS_OK);
		}
	}
	if (s != NATS_OK && s != NATS_TIMEOUT)
		capture_error(err, s, jerr);
	jsStreamInfo_Destroy(si);
	NATS_END(saved);
	return s;
}

/*
 * agog_conn_ensure_stream
 *		Create the stream, or update it when its configuration differs from
 *		spec; unless spec->may_lower, a live message, byte or age limit
 *		larger than the spec's stays (result->kept says so).  Never deletes
 *		anything.  Runs in the worker.
 */
bool
agog_conn_ensure_stream(AgogConn *conn, const AgogStreamSpec *spec,
						AgogEnsureResult *result, AgogError *err)
{
	EnsureArgs	a;
	bool		ok;

	memset(&a, 0, sizeof(a));
	a.spec = spec;
	a.description_json = spec->description ? json_string_body(spec->description) : NULL;
	ok = run_sliced(conn, ensure_attempt, &a, false, err) == NATS_OK;
	*result = a.result;
	if (a.description_json)
		pfree((char *) a.description_json);
	return ok;
}

/* ----------------------------------------------------------------
 * Completion notices from NATS agents (worker only)
 * ----------------------------------------------------------------
 */

#define NOTICE_STREAM	"agog_notices"
#define NOTICE_SUBJECT	"agog.notices.>"
#define NOTICE_DURABLE	"agog_nats_worker"

/*
 * agog_conn_notices_open
 *		Bind the durable pull consumer on the notices stream (creating it on
 *		first use) and a plain subscription on the same subjects that only
 *		rings the worker's event pipe, so a notice wakes the worker instead
 *		of waiting for a poll.  Idempotent.
 */
bool
agog_conn_notices_open(AgogConn *conn, AgogError *err)
{
	sigset_t	saved;
	natsStatus	s = NATS_OK;
	jsErrCode	jerr = 0;

	memset(err, 0, sizeof(*err));
	if (conn->notice_sub != NULL)
		return true;

	NATS_BEGIN(saved);
	{
		jsOptions	jopts;
		jsSubOptions so;

		jsOptions_Init(&jopts);
		jopts.Wait = agog_timeout_ms;
		jsSubOptions_Init(&so);
		so.Stream = NOTICE_STREAM;
		so.ManualAck = true;
		so.Config.Durable = NOTICE_DURABLE;
		so.Config.AckPolicy = js_AckExplicit;
		/* a notice whose transaction failed comes again after this */
		so.Config.AckWait = (int64) 10 * 1000 * 1000 * 1000;
		so.Config.MaxDeliver = -1;
		so.Config.DeliverPolicy = js_DeliverAll;
		so.Config.FilterSubject = NOTICE_SUBJECT;
		s = js_PullSubscribe(&conn->notice_sub, conn->js, NOTICE_SUBJECT, NOTICE_DURABLE,
							 &jopts, &so, &jerr);
		if (s == NATS_OK && conn->bell_sub == NULL)
			s = natsConnection_Subscribe(&conn->bell_sub, conn->nc, NOTICE_SUBJECT,
										 on_bell, NULL);
		if (s != NATS_OK)
		{
			capture_error(err, s, jerr);
			natsSubscription_Destroy(conn->notice_sub);
			conn->notice_sub = NULL;
		}
	}
	NATS_END(saved);
	return s == NATS_OK;
}

/*
 * agog_conn_notices_bound
 *		Whether the consumer is bound (agog_conn_notices_open succeeded since
 *		the last reset).  Plain C.
 */
bool
agog_conn_notices_bound(AgogConn *conn)
{
	return conn->notice_sub != NULL;
}

/*
 * agog_conn_notices_reset
 *		Drop the consumer's subscriptions (after a reconnect, which may be to a
 *		server that lost the consumer) and anything fetched and not released:
 *		unacknowledged notices are delivered again.
 */
void
agog_conn_notices_reset(AgogConn *conn)
{
	sigset_t	saved;

	agog_conn_notices_release(conn);
	NATS_BEGIN(saved);
	natsSubscription_Destroy(conn->notice_sub);
	natsSubscription_Destroy(conn->bell_sub);
	NATS_END(saved);
	conn->notice_sub = NULL;
	conn->bell_sub = NULL;
}

/*
 * agog_conn_notices_waiting
 *		Whether the consumer has notices to fetch: not yet delivered, or
 *		delivered and not acknowledged (they come again after the ack wait).
 *		One quick request, where a fetch on an empty consumer would be held
 *		by the server until it expires.
 */
bool
agog_conn_notices_waiting(AgogConn *conn)
{
	sigset_t	saved;
	natsStatus	s;
	jsConsumerInfo *ci = NULL;
	jsOptions	jopts;
	jsErrCode	jerr = 0;
	bool		waiting = false;

	if (conn->notice_sub == NULL)
		return false;
	NATS_BEGIN(saved);
	jsOptions_Init(&jopts);
	jopts.Wait = Min(agog_timeout_ms, 900);
	s = natsSubscription_GetConsumerInfo(&ci, conn->notice_sub, &jopts, &jerr);
	if (s == NATS_OK && ci != NULL)
		waiting = ci->NumPending > 0 || ci->NumAckPending > 0;
	else
		waiting = true;			/* cannot tell: let the fetch find out */
	jsConsumerInfo_Destroy(ci);
	NATS_END(saved);
	return waiting;
}

/*
 * agog_conn_notices_fetch
 *		Take up to max notices that are waiting, without waiting for more.
 *		They are held until agog_conn_notices_release; each one acknowledged
 *		with agog_conn_notices_ack is not delivered again.  Returns how many,
 *		or -1 with *err set.
 */
int
agog_conn_notices_fetch(AgogConn *conn, AgogNotice *out, int max, AgogError *err)
{
	sigset_t	saved;
	natsStatus	s;
	jsFetchRequest req;
	bool		copied = true;
	int			n = 0;

	memset(err, 0, sizeof(*err));
	agog_conn_notices_release(conn);
	if (conn->notice_sub == NULL)
		return 0;

	NATS_BEGIN(saved);
	jsFetchRequest_Init(&req);
	req.Batch = max;
	req.NoWait = true;
	/* NoWait: the server answers at once; Expires only bounds a lost answer */
	req.Expires = (int64) Min(agog_timeout_ms, 250) * 1000 * 1000;
	s = natsSubscription_FetchRequest(&conn->held, conn->notice_sub, &req);
	if (s == NATS_OK)
	{
		conn->holding = true;
		n = conn->held.Count;
		for (int i = 0; i < n && copied; i++)
		{
			natsMsg    *m = conn->held.Msgs[i];
			const char *subj = natsMsg_GetSubject(m);
			jsMsgMetaData *meta = NULL;

			out[i].subject = copy_bytes_noerror(subj, strlen(subj));
			out[i].len = natsMsg_GetDataLength(m);
			out[i].body = copy_bytes_noerror(natsMsg_GetData(m), out[i].len);
			out[i].deliveries = 1;
			out[i].seq = 0;
			if (natsMsg_GetMetaData(&meta, m) == NATS_OK && meta != NULL)
			{
				out[i].deliveries = (int) Min(meta->NumDelivered, INT_MAX);
				out[i].seq = meta->Sequence.Stream;
			}
			jsMsgMetaData_Destroy(meta);
			copied = out[i].subject != NULL && out[i].body != NULL;
		}
	}
	else if (s != NATS_TIMEOUT && s != NATS_NOT_FOUND)
		capture_error(err, s, 0);
	NATS_END(saved);

	if (!copied)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory"),
				 errdetail("Failed to copy a completion notice read from NATS.")));
	if (s == NATS_OK)
		return n;
	if (s == NATS_TIMEOUT || s == NATS_NOT_FOUND)
		return 0;				/* nothing waiting */
	return -1;
}

/*
 * agog_conn_notices_ack
 *		Acknowledge the i-th notice of the last fetch: its transaction has
 *		committed.  A lost ack only means the notice comes again, and is then
 *		recognised as a duplicate.
 */
void
agog_conn_notices_ack(AgogConn *conn, int i)
{
	sigset_t	saved;

	if (!conn->holding || i < 0 || i >= conn->held.Count)
		return;
	NATS_BEGIN(saved);
	(void) natsMsg_Ack(conn->held.Msgs[i], NULL);
	NATS_END(saved);
}

/*
 * agog_conn_notices_nak
 *		Put the i-th notice of the last fetch back: the server delivers it
 *		again after delay_ms.  Fire and forget, like the ack: a lost nak
 *		only means the notice comes again after the consumer's ack wait.
 */
void
agog_conn_notices_nak(AgogConn *conn, int i, int delay_ms)
{
	sigset_t	saved;

	if (!conn->holding || i < 0 || i >= conn->held.Count)
		return;
	NATS_BEGIN(saved);
	(void) natsMsg_NakWithDelay(conn->held.Msgs[i], (int64_t) delay_ms, NULL);
	NATS_END(saved);
}

/*
 * agog_conn_notices_release
 *		Destroy the fetched notices.
 */
void
agog_conn_notices_release(AgogConn *conn)
{
	sigset_t	saved;

	if (!conn->holding)
		return;
	NATS_BEGIN(saved);
	natsMsgList_Destroy(&conn->held);
	NATS_END(saved);
	conn->holding = false;
}
