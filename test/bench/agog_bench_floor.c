/*-------------------------------------------------------------------------
 *
 * agog_bench_floor.c
 *		The floor of a bridge, for the benchmarks only: bare C functions
 *		that do in a backend what the raw nats.c baselines do in the bench's
 *		own process, and nothing else.
 *
 * agog_bench_floor_publish(url, subject, data) publishes data as it is with
 * js_Publish (a unique Nats-Msg-Id, as the raw baseline and the extension
 * send) and returns the stream sequence; agog_bench_floor_get(url, stream,
 * subject) returns the data of the subject's last message (js_DirectGetMsg,
 * last by subject) as text.  No validation, no JSON, no outbox: what any
 * function in a backend pays to carry a report from its client to
 * JetStream or back, over the same client path as the SQL figures.  The
 * benchmark sets agog_publish_report_now and agog_fetch_report against
 * them, which separates what the extension adds from what a bridge in a
 * backend costs on the machine at all.
 *
 * agog_bench_floor_publish_loop and agog_bench_floor_get_loop do the same by
 * hand over a connection without nats.c's threads, the backend reading its
 * socket itself, as the extension's backends do since the tenth round (see
 * docs/benchmarks.md): the floor of that technique.  The publish returns the
 * PubAck's length, unparsed.
 *
 * Not part of the extension and not installed: test/bench.sh builds it into
 * its work directory and creates the functions from that file in the
 * throwaway cluster.  agog_bench_floor_get returns the message's bytes
 * unverified, which is fine for the benchmark's own reports and nowhere else.
 *
 * Copyright (c) 2026, the agog_nats authors
 *
 * IDENTIFICATION
 *		test/bench/agog_bench_floor.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <nats/nats.h>

#include "fmgr.h"
#include "utils/builtins.h"

PG_MODULE_MAGIC;

PG_FUNCTION_INFO_V1(agog_bench_floor_publish);
PG_FUNCTION_INFO_V1(agog_bench_floor_get);
PG_FUNCTION_INFO_V1(agog_bench_floor_get_loop);
PG_FUNCTION_INFO_V1(agog_bench_floor_publish_loop);

/* The backend's one connection, opened by the first call. */
static natsConnection *floor_nc;
static jsCtx *floor_js;
static uint64 floor_counter;

/*
 * floor_block / floor_unblock
 *		Every signal blocked while nats.c runs in this backend, so that the
 *		threads it starts never take PostgreSQL's signals.
 */
static void
floor_block(sigset_t *saved)
{
	sigset_t	all;

	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, saved);
}

static void
floor_unblock(const sigset_t *saved)
{
	pthread_sigmask(SIG_SETMASK, saved, NULL);
}

/* The thread-less connection's loop state; see the end of this file. */
typedef struct FloorLoop
{
	int			fd;
	volatile bool want_write;
	volatile bool detached;
} FloorLoop;

static FloorLoop loop_state;
static natsStatus loop_attach(void **userData, void *loop, natsConnection *nc,
							  natsSock socket);
static natsStatus loop_read(void *userData, bool add);
static natsStatus loop_write(void *userData, bool add);
static natsStatus loop_detach(void *userData);

/*
 * floor_open
 *		Connect to url, with nats.c's threads or (loop) attached to this
 *		backend as its event loop.  Runs inside a signal-blocked section.
 */
static natsStatus
floor_open(const char *url, bool loop, natsConnection **nc)
{
	natsOptions *opts = NULL;
	natsStatus	s;

	s = natsOptions_Create(&opts);
	if (s == NATS_OK)
		s = natsOptions_SetURL(opts, url);
	if (s == NATS_OK)
		s = natsOptions_SetTimeout(opts, 5000);
	if (s == NATS_OK && loop)
		s = natsOptions_SetSendAsap(opts, true);
	if (s == NATS_OK && loop)
		s = natsOptions_SetAllowReconnect(opts, false);
	if (s == NATS_OK && loop)
		s = natsOptions_SetPingInterval(opts, 0);	/* no timer thread on it */
	if (s == NATS_OK && loop)
		s = natsOptions_SetEventLoop(opts, &loop_state, loop_attach, loop_read,
									 loop_write, loop_detach);
	if (s == NATS_OK)
		s = natsConnection_Connect(nc, opts);
	natsOptions_Destroy(opts);
	return s;
}

/*
 * floor_connect
 *		Open the connection and JetStream context on the first call of the
 *		backend.  Runs inside a signal-blocked section; returns the status and
 *		leaves nothing open on failure.
 */
static natsStatus
floor_connect(const char *url)
{
	jsOptions	jo;
	natsStatus	s;

	if (floor_js != NULL)
		return NATS_OK;
	s = floor_open(url, false, &floor_nc);
	if (s == NATS_OK)
	{
		jsOptions_Init(&jo);
		jo.Wait = 5000;
		s = natsConnection_JetStream(&floor_js, floor_nc, &jo);
	}
	if (s != NATS_OK)
	{
		natsConnection_Destroy(floor_nc);
		floor_nc = NULL;
		floor_js = NULL;
	}
	return s;
}

/*
 * floor_fail
 *		Report a nats.c failure after the signal-blocked section.
 */
static void
floor_fail(const char *what, natsStatus s, const char *last)
{
	ereport(ERROR,
			(errcode(ERRCODE_CONNECTION_FAILURE),
			 errmsg_internal("agog_bench_floor: %s: %s", what, natsStatus_GetText(s)),
			 errdetail_internal("%s", last)));
}

/*
 * agog_bench_floor_publish(url text, subject text, data text) returns bigint
 *		js_Publish of data as it is, with a unique message id; waits for the
 *		PubAck (at most 5 s) and returns its sequence.
 */
Datum
agog_bench_floor_publish(PG_FUNCTION_ARGS)
{
	char	   *url = text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *subject = text_to_cstring(PG_GETARG_TEXT_PP(1));
	text	   *data = PG_GETARG_TEXT_PP(2);
	char		id[64];
	char		last[256] = "";
	jsPubOptions po;
	jsPubAck   *pa = NULL;
	jsErrCode	jerr = 0;
	uint64		seq = 0;
	sigset_t	saved;
	natsStatus	s;

	snprintf(id, sizeof(id), "bench-floor-%d-" UINT64_FORMAT, (int) getpid(), ++floor_counter);
	floor_block(&saved);
	s = floor_connect(url);
	if (s == NATS_OK)
	{
		jsPubOptions_Init(&po);
		po.MsgId = id;
		s = js_Publish(&pa, floor_js, subject, VARDATA_ANY(data),
					   (int) VARSIZE_ANY_EXHDR(data), &po, &jerr);
		if (s == NATS_OK)
			seq = pa->Sequence;
		jsPubAck_Destroy(pa);
	}
	if (s != NATS_OK)
		strlcpy(last, nats_GetLastError(NULL) ? nats_GetLastError(NULL) : "", sizeof(last));
	floor_unblock(&saved);
	if (s != NATS_OK)
		floor_fail("js_Publish", s, last);
	PG_RETURN_INT64((int64) seq);
}

/*
 * agog_bench_floor_get(url text, stream text, subject text) returns text
 *		The data of the subject's last message, as it is (NULL when there is
 *		none); js_DirectGetMsg, waiting at most 5 s.
 */
Datum
agog_bench_floor_get(PG_FUNCTION_ARGS)
{
	char	   *url = text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *stream = text_to_cstring(PG_GETARG_TEXT_PP(1));
	char	   *subject = text_to_cstring(PG_GETARG_TEXT_PP(2));
	char		last[256] = "";
	jsDirectGetMsgOptions dg;
	natsMsg    *m = NULL;
	text	   *result = NULL;
	sigset_t	saved;
	natsStatus	s;

	floor_block(&saved);
	s = floor_connect(url);
	if (s == NATS_OK)
	{
		jsDirectGetMsgOptions_Init(&dg);
		dg.LastBySubject = subject;
		s = js_DirectGetMsg(&m, floor_js, stream, NULL, &dg);
	}
	if (s != NATS_OK && s != NATS_NOT_FOUND)
		strlcpy(last, nats_GetLastError(NULL) ? nats_GetLastError(NULL) : "", sizeof(last));
	floor_unblock(&saved);
	if (s == NATS_NOT_FOUND)
		PG_RETURN_NULL();
	if (s != NATS_OK)
		floor_fail("js_DirectGetMsg", s, last);

	/* palloc outside the signal-blocked section; the message is freed either way */
	PG_TRY();
	{
		result = (text *) palloc(VARHDRSZ + natsMsg_GetDataLength(m));
		SET_VARSIZE(result, VARHDRSZ + natsMsg_GetDataLength(m));
		memcpy(VARDATA(result), natsMsg_GetData(m), natsMsg_GetDataLength(m));
	}
	PG_FINALLY();
	{
		floor_block(&saved);
		natsMsg_Destroy(m);
		floor_unblock(&saved);
	}
	PG_END_TRY();
	PG_RETURN_TEXT_P(result);
}

/* ----------------------------------------------------------------
 * The same two functions over a connection without nats.c's threads
 *
 * The connection is attached to an "event loop" that is the calling
 * backend itself: nats.c starts no reader and no flusher thread for it, the
 * backend writes its request and reads the reply on its own thread
 * (poll, then natsConnection_ProcessWriteEvent / ProcessReadEvent), so no
 * thread has to wake the backend when the reply arrives.  A floor only: no
 * PING is answered between calls and a closed connection is not reopened.
 * ----------------------------------------------------------------
 */
static natsConnection *loop_nc;
static natsSubscription *loop_sub;
static char loop_prefix[64];
static uint64 loop_seq;

/* nats.c's event-loop callbacks: flags only (the connection has no thread) */
static natsStatus
loop_attach(void **userData, void *loop, natsConnection *nc, natsSock socket)
{
	FloorLoop  *l = (FloorLoop *) loop;

	l->fd = (int) socket;
	l->detached = false;
	*userData = l;
	return NATS_OK;
}

static natsStatus
loop_read(void *userData, bool add)
{
	return NATS_OK;
}

static natsStatus
loop_write(void *userData, bool add)
{
	((FloorLoop *) userData)->want_write = add;
	return NATS_OK;
}

static natsStatus
loop_detach(void *userData)
{
	((FloorLoop *) userData)->detached = true;
	return NATS_OK;
}

/*
 * loop_pump
 *		Write what nats.c has buffered, then wait for the next reply on
 *		loop_sub, reading the socket on this thread.  Runs inside a
 *		signal-blocked section.
 */
static natsStatus
loop_pump(const char *want, natsMsg **reply, int timeout_ms)
{
	natsStatus	s;
	struct pollfd p;

	while (loop_state.want_write && !loop_state.detached)
	{
		p.fd = loop_state.fd;
		p.events = POLLOUT;
		if (poll(&p, 1, timeout_ms) <= 0)
			return NATS_TIMEOUT;
		natsConnection_ProcessWriteEvent(loop_nc);
	}
	for (;;)
	{
		s = natsSubscription_NextMsg(reply, loop_sub, 0);
		if (s == NATS_OK && strcmp(natsMsg_GetSubject(*reply), want) != 0)
		{
			natsMsg_Destroy(*reply);	/* a late reply to an earlier call */
			*reply = NULL;
			continue;
		}
		if (s != NATS_TIMEOUT)
			return s;
		if (loop_state.detached)
			return NATS_CONNECTION_CLOSED;
		p.fd = loop_state.fd;
		p.events = POLLIN;
		if (poll(&p, 1, timeout_ms) <= 0)
			return NATS_TIMEOUT;
		natsConnection_ProcessReadEvent(loop_nc);
	}
}

/*
 * loop_connect
 *		Open the thread-less connection and its reply subscription on the
 *		first call of the backend.  Runs inside a signal-blocked section.
 */
static natsStatus
loop_connect(const char *url)
{
	natsInbox  *inbox = NULL;
	char		wildcard[96];
	natsStatus	s;

	if (loop_sub != NULL)
		return NATS_OK;
	s = floor_open(url, true, &loop_nc);
	if (s == NATS_OK)
		s = natsInbox_Create(&inbox);
	if (s == NATS_OK)
	{
		snprintf(loop_prefix, sizeof(loop_prefix), "%s", (const char *) inbox);
		natsInbox_Destroy(inbox);
		snprintf(wildcard, sizeof(wildcard), "%s.*", loop_prefix);
		s = natsConnection_SubscribeSync(&loop_sub, loop_nc, wildcard);
	}
	if (s != NATS_OK)
	{
		natsSubscription_Destroy(loop_sub);
		natsConnection_Destroy(loop_nc);
		loop_sub = NULL;
		loop_nc = NULL;
	}
	return s;
}

/*
 * agog_bench_floor_get_loop(url text, stream text, subject text) returns text
 *		As agog_bench_floor_get, over the thread-less connection.
 */
Datum
agog_bench_floor_get_loop(PG_FUNCTION_ARGS)
{
	char	   *url = text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *stream = text_to_cstring(PG_GETARG_TEXT_PP(1));
	char	   *subject = text_to_cstring(PG_GETARG_TEXT_PP(2));
	char		api[512];
	char		reply[96];
	natsMsg    *m = NULL;
	text	   *result = NULL;
	sigset_t	saved;
	natsStatus	s;

	snprintf(api, sizeof(api), "$JS.API.DIRECT.GET.%s.%s", stream, subject);
	floor_block(&saved);
	s = loop_connect(url);
	if (s == NATS_OK)
	{
		snprintf(reply, sizeof(reply), "%s." UINT64_FORMAT, loop_prefix, ++loop_seq);
		s = natsConnection_PublishRequest(loop_nc, api, reply, NULL, 0);
	}
	if (s == NATS_OK)
		s = loop_pump(reply, &m, 5000);
	floor_unblock(&saved);
	if (s != NATS_OK)
		floor_fail("direct get", s, "");
	result = (text *) palloc(VARHDRSZ + natsMsg_GetDataLength(m));
	SET_VARSIZE(result, VARHDRSZ + natsMsg_GetDataLength(m));
	memcpy(VARDATA(result), natsMsg_GetData(m), natsMsg_GetDataLength(m));
	floor_block(&saved);
	natsMsg_Destroy(m);
	floor_unblock(&saved);
	PG_RETURN_TEXT_P(result);
}

/*
 * agog_bench_floor_publish_loop(url text, subject text, data text) returns bigint
 *		As agog_bench_floor_publish, over the thread-less connection; returns
 *		the PubAck's length (the experiment does not parse it).
 */
Datum
agog_bench_floor_publish_loop(PG_FUNCTION_ARGS)
{
	char	   *url = text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *subject = text_to_cstring(PG_GETARG_TEXT_PP(1));
	text	   *data = PG_GETARG_TEXT_PP(2);
	char		id[64];
	char		reply[96];
	natsMsg    *m = NULL;
	natsMsg    *msg = NULL;
	int64		len = 0;
	sigset_t	saved;
	natsStatus	s;

	snprintf(id, sizeof(id), "bench-floor-loop-%d-" UINT64_FORMAT, (int) getpid(), ++floor_counter);
	floor_block(&saved);
	s = loop_connect(url);
	if (s == NATS_OK)
	{
		snprintf(reply, sizeof(reply), "%s." UINT64_FORMAT, loop_prefix, ++loop_seq);
		s = natsMsg_Create(&msg, subject, reply, VARDATA_ANY(data), (int) VARSIZE_ANY_EXHDR(data));
	}
	if (s == NATS_OK)
		s = natsMsgHeader_Set(msg, "Nats-Msg-Id", id);
	if (s == NATS_OK)
		s = natsConnection_PublishMsg(loop_nc, msg);
	natsMsg_Destroy(msg);
	if (s == NATS_OK)
		s = loop_pump(reply, &m, 5000);
	if (s == NATS_OK)
		len = natsMsg_GetDataLength(m);
	natsMsg_Destroy(m);
	floor_unblock(&saved);
	if (s != NATS_OK)
		floor_fail("publish", s, "");
	PG_RETURN_INT64(len);
}
