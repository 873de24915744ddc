/*-------------------------------------------------------------------------
 *
 * agog_report.c
 *		Reports: the seed's message format, publish and fetch functions.
 *
 * A report on the wire is the seed's JSON,
 *		{"content": "<markdown>",
 *		 "metadata": {"agent", "taskType", "feature", "timestamp", ...}}
 * on subject agog.deliverables.<agent>.<taskType>.<feature>, in the agent's
 * stream agog_features_<taskType>; its id is "<stream>.<seq>".
 *
 * Copyright (c) 2026, agog_nats developers
 *
 * src/agog_report.c
 *
 *-------------------------------------------------------------------------
 */
#include "agog_nats.h"

#ifdef __SSE2__
#include <emmintrin.h>
#endif

#include "catalog/pg_type.h"
#include "common/jsonapi.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "pgtime.h"
#include "port/pg_bitutils.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

PG_FUNCTION_INFO_V1(agog_publish_report_now);
PG_FUNCTION_INFO_V1(agog_publish_report);
PG_FUNCTION_INFO_V1(agog_fetch_report);
PG_FUNCTION_INFO_V1(agog_fetch_report_by_seq);

/* Metadata keys agog_nats fills itself. */
static const char *const reserved_keys[] = {"agent", "taskType", "feature", "timestamp"};

/* Columns of agog_fetch_report and agog_fetch_report_by_seq. */
#define FETCH_COLS 6

/*
 * text_arg_pp
 *		A text argument that must not be NULL, detoasted (short header kept).
 */
static text *
text_arg_pp(FunctionCallInfo fcinfo, int n, const char *name)
{
	if (PG_ARGISNULL(n))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", name)));
	return PG_GETARG_TEXT_PP(n);
}

/*
 * text_arg
 *		A text argument that must not be NULL, as a C string.
 */
static char *
text_arg(FunctionCallInfo fcinfo, int n, const char *name)
{
	return text_to_cstring(text_arg_pp(fcinfo, n, name));
}

/* What the functions need of an agent's row. */
typedef struct AgentInfo
{
	char	   *stream;
	int32		max_msg_size;	/* -1: the server's limit */
} AgentInfo;

/*
 * agent_info
 *		The stream and message size limit of a known agent, from the agents
 *		cache (agog_agents.c).  An unknown agent is refused with a hint.  Runs
 *		in a backend, in the caller's transaction.
 */
static AgentInfo
agent_info(const char *agent)
{
	const AgogAgent *a = agog_agent(agent);
	AgentInfo	info;

	if (a == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("unknown agent \"%s\"", agent),
				 errhint("The agents are the rows of agog_nats.agents; an administrator adds one with INSERT INTO agog_nats.agents (agent, task_type) VALUES (...).")));
	info.stream = pstrdup(a->stream);
	info.max_msg_size = a->max_msg_size;
	return info;
}

/*
 * check_report_size
 *		Refuse a report whose message (body and Nats-Msg-Id header, as nats.c
 *		frames them) exceeds the server's max_payload or the stream's maximum
 *		message size.  max_payload 0 means unknown (the worker has not
 *		connected yet): the worker then dead-letters an oversized report.
 */
static void
check_report_size(int64 body_len, const char *msg_id, int64 max_payload,
				  int32 max_msg_size)
{
	int64		total = body_len + strlen("NATS/1.0\r\nNats-Msg-Id: \r\n\r\n") + strlen(msg_id);

	if (max_payload > 0 && total > max_payload)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("report is too large for the NATS server"),
				 errdetail("The report is %lld bytes with its headers, and the server's max_payload is %lld bytes.",
						   (long long) total, (long long) max_payload),
				 errhint("Split the report, or raise max_payload in the NATS server's configuration.")));
	if (max_msg_size > 0 && total > max_msg_size)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("report is too large for the agent's stream"),
				 errdetail("The report is %lld bytes with its headers, and the stream takes messages of at most %d bytes.",
						   (long long) total, max_msg_size),
				 errhint("Split the report, or raise max_msg_size in agog_nats.agents.")));
}

/*
 * iso_timestamp
 *		ISO 8601 in UTC with milliseconds, as JavaScript's toISOString().
 */
static void
iso_timestamp(TimestampTz ts, char *buf, size_t len)
{
	pg_time_t	t = timestamptz_to_time_t(ts);
	int64		usec = ts % USECS_PER_SEC;
	struct pg_tm *tm;

	if (usec < 0)
		usec += USECS_PER_SEC;
	tm = pg_gmtime(&t);
	snprintf(buf, len, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ",
			 tm->tm_year + 1900, tm->tm_mon + 1, tm->tm_mday,
			 tm->tm_hour, tm->tm_min, tm->tm_sec, (int) (usec / 1000));
}

/*
 * check_metadata
 *		The caller's metadata must be a JSON object that does not set the
 *		keys agog_nats fills itself.
 */
static void
check_metadata(Jsonb *metadata)
{
	if (!JB_ROOT_IS_OBJECT(metadata) || JB_ROOT_IS_SCALAR(metadata))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("metadata must be a JSON object")));
	for (int i = 0; i < lengthof(reserved_keys); i++)
	{
		if (getKeyJsonValueFromContainer(&metadata->root, reserved_keys[i],
										 strlen(reserved_keys[i]), NULL) != NULL)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("metadata must not set \"%s\"", reserved_keys[i]),
					 errdetail("The keys agent, taskType, feature and timestamp are set by agog_nats.")));
	}
}

/*
 * json_plain_run
 *		The first byte at or after p that a JSON string must escape (a quote,
 *		a backslash or a byte below 0x20), or end.  Runs when a report is
 *		encoded or decoded, over its whole content: sixteen bytes at a time
 *		with SSE2 (every x86-64 has it), else eight at a time in a word, where
 *		such a byte sets a high bit in one of the three zero-byte tests.
 */
static inline const unsigned char *
json_plain_run(const unsigned char *p, const unsigned char *end)
{
#ifdef __SSE2__
	const __m128i quote = _mm_set1_epi8('"');
	const __m128i bslash = _mm_set1_epi8('\\');
	const __m128i ctl_max = _mm_set1_epi8(0x1f);

	while (end - p >= 16)
	{
		__m128i		v = _mm_loadu_si128((const __m128i *) p);

		/* unsigned v <= 0x1f exactly when max(v, 0x1f) is 0x1f */
		__m128i		hit = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, quote),
													_mm_cmpeq_epi8(v, bslash)),
									   _mm_cmpeq_epi8(_mm_max_epu8(v, ctl_max), ctl_max));
		int			mask = _mm_movemask_epi8(hit);

		if (mask != 0)
			return p + pg_rightmost_one_pos32((uint32) mask);
		p += 16;
	}
#endif
	while (end - p >= 8)
	{
		uint64		w;
		uint64		quote;
		uint64		bslash;

		memcpy(&w, p, 8);
		quote = w ^ UINT64CONST(0x2222222222222222);
		bslash = w ^ UINT64CONST(0x5c5c5c5c5c5c5c5c);
		/* "& ~w" stands for "& ~quote" and "& ~bslash": same high bits */
		if (((w - UINT64CONST(0x2020202020202020)) |
			 (quote - UINT64CONST(0x0101010101010101)) |
			 (bslash - UINT64CONST(0x0101010101010101))) &
			~w & UINT64CONST(0x8080808080808080))
			break;
		p += 8;
	}
	while (p < end && *p >= 0x20 && *p != '"' && *p != '\\')
		p++;
	return p;
}

/*
 * append_json_string
 *		escape_json's output for len bytes at s (no NUL among them), written
 *		straight into buf: runs of bytes that need no escape are copied with
 *		one memcpy each (PostgreSQL 15's escape_json appends one character at
 *		a time).  Room for the text and its quotes is reserved first; before
 *		each escape (up to six bytes for one) the buffer grows if the escape
 *		and the rest of the text would not fit.
 */
static void
append_json_string(StringInfo buf, const char *s, size_t len)
{
	const unsigned char *p = (const unsigned char *) s;
	const unsigned char *end = p + len;
	char	   *o;

	enlargeStringInfo(buf, (int) len + 2);
	o = buf->data + buf->len;
	*o++ = '"';
	for (;;)
	{
		const unsigned char *q = json_plain_run(p, end);
		int			need;

		memcpy(o, p, q - p);
		o += q - p;
		if (q >= end)
			break;
		/* this escape, the bytes after it, the closing quote */
		need = 6 + (int) (end - q - 1) + 1;
		if (buf->maxlen - 1 - (o - buf->data) < need)
		{
			buf->len = o - buf->data;
			enlargeStringInfo(buf, need);
			o = buf->data + buf->len;
		}
		*o++ = '\\';
		switch (*q)
		{
			case '\b': *o++ = 'b'; break;
			case '\f': *o++ = 'f'; break;
			case '\n': *o++ = 'n'; break;
			case '\r': *o++ = 'r'; break;
			case '\t': *o++ = 't'; break;
			case '"': *o++ = '"'; break;
			case '\\': *o++ = '\\'; break;
			default: o += sprintf(o, "u%04x", (int) *q); break;
		}
		p = q + 1;
	}
	*o++ = '"';
	*o = '\0';
	buf->len = o - buf->data;
}

/*
 * parse_seed_fast
 *		The seed's exact shape, {"content":"...","metadata":{...}}, as both
 *		agog_nats and the seed's JSON.stringify write it: unescape content in
 *		runs and parse only the small metadata object.  False (nothing
 *		thrown) for anything else; the caller then takes the general path.
 */
static bool
parse_seed_fast(const char *data, int len, Datum *content, Datum *metadata)
{
	static const char head[] = "{\"content\":\"";
	static const char mid[] = ",\"metadata\":";
	const unsigned char *p = (const unsigned char *) data + sizeof(head) - 1;
	const unsigned char *end = (const unsigned char *) data + len;
	text	   *out;
	char	   *o;
	char	   *meta;
	Jsonb	   *mj;
	JsonLexContext *lex;

	if (len < (int) (sizeof(head) + sizeof(mid)) || memcmp(data, head, sizeof(head) - 1) != 0)
		return false;
	/* the unescaped content is never longer than the message */
	out = (text *) palloc(VARHDRSZ + len);
	o = VARDATA(out);
	for (;;)
	{
		const unsigned char *q = json_plain_run(p, end);

		if (q > p)
		{
			memcpy(o, p, q - p);
			o += q - p;
		}
		if (q >= end || *q < 0x20 || (*q == '\\' && q + 1 >= end))
			return false;
		if (*q == '"')
		{
			p = q + 1;
			break;
		}
		switch (q[1])
		{
			case '"': *o++ = '"'; break;
			case '\\': *o++ = '\\'; break;
			case '/': *o++ = '/'; break;
			case 'b': *o++ = '\b'; break;
			case 'f': *o++ = '\f'; break;
			case 'n': *o++ = '\n'; break;
			case 'r': *o++ = '\r'; break;
			case 't': *o++ = '\t'; break;
			default: return false;	/* \u escapes: the general path */
		}
		p = q + 2;
	}
	if (end - p < (long) sizeof(mid) || memcmp(p, mid, sizeof(mid) - 1) != 0)
		return false;
	p += sizeof(mid) - 1;
	if (p >= end - 1 || *p != '{' || end[-1] != '}')
		return false;
	meta = pnstrdup((const char *) p, end - 1 - p);
	lex = makeJsonLexContextCstringLen(meta, strlen(meta), GetDatabaseEncoding(), true);
	if (pg_parse_json(lex, &nullSemAction) != JSON_SUCCESS)
		return false;
	mj = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(meta)));
	if (!JB_ROOT_IS_OBJECT(mj) || JB_ROOT_IS_SCALAR(mj))
		return false;
	SET_VARSIZE(out, VARHDRSZ + (o - VARDATA(out)));
	*content = PointerGetDatum(out);
	*metadata = JsonbPGetDatum(mj);
	return true;
}

/*
 * agog_encode_report
 *		The seed's JSON for a report.  The tokens are already checked.
 */
static StringInfo
agog_encode_report(const char *agent, const char *task_type,
				   const char *feature, text *content, Jsonb *metadata)
{
	StringInfo	buf = makeStringInfo();
	char		ts[32];

	iso_timestamp(GetCurrentTimestamp(), ts, sizeof(ts));
	appendStringInfoString(buf, "{\"content\":");
	append_json_string(buf, VARDATA_ANY(content), VARSIZE_ANY_EXHDR(content));
	appendStringInfo(buf, ",\"metadata\":{\"agent\":\"%s\",\"taskType\":\"%s\",\"feature\":\"%s\",\"timestamp\":\"%s\"",
					 agent, task_type, feature, ts);
	if (JB_ROOT_COUNT(metadata) > 0)
	{
		char	   *extra = JsonbToCString(NULL, &metadata->root, VARSIZE(metadata));
		size_t		len = strlen(extra);

		/* splice the object's members, without its braces */
		Assert(len >= 2 && extra[0] == '{' && extra[len - 1] == '}');
		appendStringInfoChar(buf, ',');
		appendBinaryStringInfo(buf, extra + 1, (int) len - 2);
	}
	appendStringInfoString(buf, "}}");
	return buf;
}

/*
 * check_publish_args
 *		The checks agog_publish_report and agog_publish_report_now share.
 *		Returns the caller's metadata ({} for NULL).
 */
static Jsonb *
check_publish_args(FunctionCallInfo fcinfo, char **agent, char **task_type,
				   char **feature, text **content)
{
	Jsonb	   *metadata;

	agog_shmem_attach();
	*agent = text_arg(fcinfo, 0, "agent");
	*task_type = text_arg(fcinfo, 1, "task_type");
	*feature = text_arg(fcinfo, 2, "feature");
	*content = text_arg_pp(fcinfo, 3, "content");
	agog_check_token("agent", *agent);
	agog_check_token("task_type", *task_type);
	agog_check_token("feature", *feature);
	if (PG_ARGISNULL(4))
		metadata = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum("{}")));
	else
		metadata = PG_GETARG_JSONB_P(4);
	check_metadata(metadata);
	return metadata;
}

/*
 * agog_publish_report_now
 *		Publish a report now over the backend's cached connection and return
 *		"<stream>.<seq>".  Not transactional: it is in JetStream even if the
 *		caller's transaction rolls back.
 */
Datum
agog_publish_report_now(PG_FUNCTION_ARGS)
{
	char	   *agent;
	char	   *task_type;
	char	   *feature;
	text	   *content;
	Jsonb	   *metadata = check_publish_args(fcinfo, &agent, &task_type, &feature, &content);
	AgentInfo	info = agent_info(agent);
	StringInfo	body = agog_encode_report(agent, task_type, feature, content, metadata);
	char	   *msg_id = agog_unique_msg_id("now");
	AgogConn   *conn = agog_backend_conn();
	char	   *stream;
	uint64		seq;
	bool		duplicate;
	AgogError	err;

	check_report_size(body->len, msg_id, agog_conn_max_payload(conn), info.max_msg_size);
	if (!agog_conn_publish(conn, agog_report_subject(agent, task_type, feature),
						   msg_id, body->data, body->len,
						   &stream, &seq, &duplicate, &err))
		agog_raise(&err, gettext_noop("could not publish the report to NATS JetStream"));
	PG_RETURN_TEXT_P(cstring_to_text(psprintf("%s." UINT64_FORMAT, stream, seq)));
}

/*
 * agog_publish_report
 *		Write the report to the outbox in the caller's transaction and return
 *		its id; the worker publishes it after commit, exactly once.  Checks
 *		exactly what agog_publish_report_now checks, before commit, without
 *		talking to NATS (the worker's view of max_payload is used).
 */
Datum
agog_publish_report(PG_FUNCTION_ARGS)
{
	char	   *agent;
	char	   *task_type;
	char	   *feature;
	text	   *content;
	Jsonb	   *metadata = check_publish_args(fcinfo, &agent, &task_type, &feature, &content);
	AgentInfo	info = agent_info(agent);
	StringInfo	body = agog_encode_report(agent, task_type, feature, content, metadata);
	char	   *msg_id;
	int64		id;

	agog_shmem_attach();
	agog_outbox_check_database();
	agog_outbox_check_depth();
	id = agog_outbox_next_id(&msg_id);
	check_report_size(body->len, msg_id, agog_shared->max_payload, info.max_msg_size);
	agog_outbox_insert(id, msg_id, agent, task_type, feature,
					   agog_report_subject(agent, task_type, feature), info.stream,
					   body->data);
	PG_RETURN_INT64(id);
}

/*
 * put_report_row
 *		Decode a stored message into one row of the fetch functions: seed JSON
 *		gives content and metadata; any other body comes back whole as
 *		content with NULL metadata.
 */
static void
put_report_row(ReturnSetInfo *rsinfo, AgogMsg *msg)
{
	Datum		values[FETCH_COLS];
	bool		nulls[FETCH_COLS] = {false};
	bool		seed = false;

	if (memchr(msg->data, '\0', msg->len) != NULL ||
		!pg_verifymbstr(msg->data, msg->len, true))
		ereport(ERROR,
				(errcode(ERRCODE_CHARACTER_NOT_IN_REPERTOIRE),
				 errmsg("report is not valid text in the database encoding"),
				 errdetail_internal("The message on subject \"%s\" holds a NUL byte or bytes that are not %s.",
									msg->subject, GetDatabaseEncodingName())));

	if (parse_seed_fast(msg->data, msg->len, &values[0], &values[1]))
		seed = true;
	else
	{
		JsonLexContext *lex = makeJsonLexContextCstringLen(msg->data, msg->len,
														   GetDatabaseEncoding(), true);

		if (pg_parse_json(lex, &nullSemAction) == JSON_SUCCESS)
		{
			Jsonb	   *doc = DatumGetJsonbP(DirectFunctionCall1(jsonb_in,
																 CStringGetDatum(msg->data)));
			JsonbValue *content = NULL;
			JsonbValue *meta = NULL;

			if (JB_ROOT_IS_OBJECT(doc) && !JB_ROOT_IS_SCALAR(doc))
			{
				content = getKeyJsonValueFromContainer(&doc->root, "content", 7, NULL);
				meta = getKeyJsonValueFromContainer(&doc->root, "metadata", 8, NULL);
			}
			if (content != NULL && content->type == jbvString &&
				meta != NULL && meta->type == jbvBinary &&
				JsonContainerIsObject(meta->val.binary.data))
			{
				values[0] = PointerGetDatum(cstring_to_text_with_len(content->val.string.val,
																	 content->val.string.len));
				values[1] = JsonbPGetDatum(JsonbValueToJsonb(meta));
				seed = true;
			}
		}
	}
	if (!seed)
	{
		values[0] = PointerGetDatum(cstring_to_text_with_len(msg->data, msg->len));
		nulls[1] = true;
	}
	if (msg->stream != NULL)
	{
		values[2] = CStringGetTextDatum(psprintf("%s." UINT64_FORMAT, msg->stream, msg->seq));
		values[3] = Int64GetDatum((int64) msg->seq);
	}
	else
		nulls[2] = nulls[3] = true;	/* not yet in JetStream */
	values[4] = CStringGetTextDatum(msg->subject);
	if (msg->time != 0)
		values[5] = TimestampTzGetDatum(msg->time);
	else
		nulls[5] = true;
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
}

/*
 * agog_fetch_report
 *		The latest report on agog.deliverables.<agent>.<taskType>.<feature>,
 *		or no row.  A direct get on a single-replica stream; through the
 *		stream leader when streams are replicated (a follower may serve an
 *		older message right after a publish).
 */
Datum
agog_fetch_report(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	char	   *agent = text_arg(fcinfo, 0, "agent");
	char	   *task_type = text_arg(fcinfo, 1, "task_type");
	char	   *feature = text_arg(fcinfo, 2, "feature");
	char	   *stream;
	char	   *subject;
	char	   *pending;
	AgogConn   *conn;
	AgogSentGet sent = {0};
	AgogMsg		msg;
	AgogError	err;

	agog_check_token("agent", agent);
	agog_check_token("task_type", task_type);
	agog_check_token("feature", feature);
	stream = agent_info(agent).stream;
	subject = agog_report_subject(agent, task_type, feature);

	InitMaterializedSRF(fcinfo, MAT_SRF_USE_EXPECTED_DESC);

	/*
	 * With the connection open, the direct get goes out first and the outbox
	 * is read during its round trip.  The order does not change the answer:
	 * the outbox is read in the caller's active snapshot (the statement's,
	 * or an older one), taken before the get was sent, so a report it does
	 * not show as pending was in JetStream before the get reached the
	 * server.  A closed connection is not opened here: a pending report is
	 * served without NATS.
	 */
	conn = (agog_stream_replicas > 1) ? NULL : agog_backend_conn_if_open();
	if (conn != NULL)
		agog_conn_get_last_send(conn, stream, subject, &sent);
	pending = agog_outbox_latest_pending(subject);
	if (pending != NULL)
	{
		/* committed or ours, not yet in JetStream: newer than what is there */
		memset(&msg, 0, sizeof(msg));
		msg.subject = subject;
		msg.data = pending;
		msg.len = strlen(pending);
		put_report_row(rsinfo, &msg);
	}
	else if (agog_conn_get_last(sent.token != 0 ? conn : agog_backend_conn(), stream, subject,
								agog_stream_replicas > 1, &sent, &msg, &err))
		put_report_row(rsinfo, &msg);
	else if (!err.not_found)
		agog_raise(&err, gettext_noop("could not fetch the report from NATS JetStream"));
	return (Datum) 0;
}

/*
 * agog_fetch_report_by_seq
 *		The message at a sequence of an agent's stream, or no row.
 */
Datum
agog_fetch_report_by_seq(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	char	   *agent = text_arg(fcinfo, 0, "agent");
	int64		seq;
	char	   *stream;
	AgogMsg		msg;
	AgogError	err;

	if (PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("sequence must not be null")));
	seq = PG_GETARG_INT64(1);
	agog_check_token("agent", agent);
	if (seq <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("sequence must be positive"),
				 errdetail("Stream sequences start at 1; got %lld.", (long long) seq)));
	stream = agent_info(agent).stream;

	InitMaterializedSRF(fcinfo, MAT_SRF_USE_EXPECTED_DESC);
	if (agog_conn_get_seq(agog_backend_conn(), stream, (uint64) seq,
						  agog_stream_replicas > 1, &msg, &err))
		put_report_row(rsinfo, &msg);
	else if (!err.not_found)
		agog_raise(&err, gettext_noop("could not fetch the report from NATS JetStream"));
	return (Datum) 0;
}
