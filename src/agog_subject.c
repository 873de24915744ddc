/*-------------------------------------------------------------------------
 *
 * agog_subject.c
 *		Subject tokens: validation, subjects, stream names and message ids.
 *
 * nats.c does not check subjects, so a token that holds a dot, a wildcard,
 * white space or a line break would change the subject, or inject protocol
 * text.  Every user-supplied token goes through agog_check_token first (or,
 * for the workflow tables' tokens, through their own CHECKs), and every row
 * of agog_nats.outbox through agog_outbox_subject_ok, its subject's CHECK.
 *
 * Copyright (c) 2026, agog_nats developers
 *
 * src/agog_subject.c
 *
 *-------------------------------------------------------------------------
 */
#include "agog_nats.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "utils/timestamp.h"

PG_FUNCTION_INFO_V1(agog_outbox_subject_ok);

/*
 * A byte allowed in a subject token: [A-Za-z0-9_-].  Pure: runs in
 * agog_check_token and inside the outbox's CHECK.
 */
static inline bool
token_byte_ok(unsigned char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		(c >= '0' && c <= '9') || c == '_' || c == '-';
}

/*
 * agog_check_token
 *		Refuse a token that is not 1 to 64 of [A-Za-z0-9_-], naming the
 *		argument.  Runs in a backend before anything is written or sent.
 */
void
agog_check_token(const char *argname, const char *value)
{
	size_t		len = strlen(value);

	if (len == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must not be empty", argname),
				 errhint("Use 1 to %d characters from A-Z, a-z, 0-9, \"_\" and \"-\".",
						 AGOG_TOKEN_MAX_LEN)));
	if (len > AGOG_TOKEN_MAX_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s is too long", argname),
				 errdetail("It has %zu bytes; the limit is %d.", len, AGOG_TOKEN_MAX_LEN)));
	for (size_t i = 0; i < len; i++)
	{
		unsigned char c = (unsigned char) value[i];

		if (!token_byte_ok(c))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("%s contains a character that is not allowed in a subject token", argname),
					 errdetail("Byte %zu is 0x%02x.", i + 1, c),
					 errhint("Use 1 to %d characters from A-Z, a-z, 0-9, \"_\" and \"-\".",
							 AGOG_TOKEN_MAX_LEN)));
	}
}

/*
 * agog_report_subject
 *		agog.deliverables.<agent>.<taskType>.<feature>, for checked tokens.
 */
char *
agog_report_subject(const char *agent, const char *task_type,
					const char *feature)
{
	return psprintf("%s.%s.%s.%s", AGOG_SUBJECT_PREFIX, agent, task_type, feature);
}

/*
 * agog_stream_subjects
 *		The subject filter of an agent's stream: agog.deliverables.<agent>.>
 */
char *
agog_stream_subjects(const char *agent)
{
	return psprintf("%s.%s.>", AGOG_SUBJECT_PREFIX, agent);
}

/*
 * agog_stream_name
 *		agog_features_<taskType>
 */
char *
agog_stream_name(const char *task_type)
{
	return psprintf("%s%s", AGOG_STREAM_PREFIX, task_type);
}

/*
 * agog_unique_msg_id
 *		A Nats-Msg-Id unique across the cluster's life: the kind, the
 *		backend's start time (a pid alone repeats when it is reused), the pid
 *		and a counter.
 */
char *
agog_unique_msg_id(const char *kind)
{
	static uint64 counter = 0;

	return psprintf("agog-%s-" INT64_FORMAT "-%d-" UINT64_FORMAT,
					kind, (int64) MyStartTimestamp, MyProcPid, ++counter);
}

/*
 * token_ok
 *		True when len bytes at t are a token: 1 to AGOG_TOKEN_MAX_LEN allowed
 *		bytes.  Runs inside the outbox's CHECK: must not throw nor allocate.
 */
static bool
token_ok(const char *t, size_t len)
{
	if (len == 0 || len > AGOG_TOKEN_MAX_LEN)
		return false;
	for (size_t i = 0; i < len; i++)
	{
		if (!token_byte_ok((unsigned char) t[i]))
			return false;
	}
	return true;
}

/*
 * token_matches
 *		True when the subject at *p goes on with the token (see token_ok)
 *		and then the byte sep (none when sep is 0, the subject's end); moves
 *		*p past them.  Runs inside the outbox's CHECK: must not throw nor
 *		allocate.
 */
static bool
token_matches(const char **p, const char *end, const text *token, char sep)
{
	const char *t = VARDATA_ANY(token);
	size_t		len = VARSIZE_ANY_EXHDR(token);

	if (!token_ok(t, len) || (size_t) (end - *p) < len || memcmp(*p, t, len) != 0)
		return false;
	*p += len;
	if (sep == '\0')
		return *p == end;
	if (*p == end || **p != sep)
		return false;
	(*p)++;
	return true;
}

/*
 * agog_outbox_subject_ok
 *		The CHECK of agog_nats.outbox's subject (kind, subject, agent,
 *		task_type, feature): a report's subject is
 *		agog.deliverables.<agent>.<taskType>.<feature>, a task notice's
 *		agog.tasks.<agent>.<feature>, and every token, the task type
 *		included, is 1 to AGOG_TOKEN_MAX_LEN of [A-Za-z0-9_-].
 *
 *		Runs in any process that writes an outbox row, once a row: in the
 *		writer's INSERT, and in the worker's claim and record, which update
 *		every row they touch.  It must not throw (a false is the
 *		constraint's error) nor read anything but its arguments.  Written
 *		in C because PostgreSQL reads a CHECK back from its stored text in
 *		every statement that writes a row (at its first row): the same test
 *		as an SQL expression was a few times larger to read, and built the
 *		subject anew on each row.
 */
Datum
agog_outbox_subject_ok(PG_FUNCTION_ARGS)
{
	text	   *kind = PG_GETARG_TEXT_PP(0);
	text	   *subject = PG_GETARG_TEXT_PP(1);
	text	   *agent = PG_GETARG_TEXT_PP(2);
	text	   *task_type = PG_GETARG_TEXT_PP(3);
	text	   *feature = PG_GETARG_TEXT_PP(4);
	const char *k = VARDATA_ANY(kind);
	size_t		klen = VARSIZE_ANY_EXHDR(kind);
	const char *p = VARDATA_ANY(subject);
	const char *end = p + VARSIZE_ANY_EXHDR(subject);
	const char *prefix;
	size_t		plen;
	bool		report;

	if (klen == 6 && memcmp(k, "report", 6) == 0)
	{
		report = true;
		prefix = AGOG_SUBJECT_PREFIX ".";
	}
	else if (klen == 4 && memcmp(k, "task", 4) == 0)
	{
		report = false;
		prefix = AGOG_TASKS_SUBJECT_PREFIX ".";
	}
	else
		PG_RETURN_BOOL(false);

	plen = strlen(prefix);
	if ((size_t) (end - p) < plen || memcmp(p, prefix, plen) != 0)
		PG_RETURN_BOOL(false);
	p += plen;
	if (!token_matches(&p, end, agent, '.'))
		PG_RETURN_BOOL(false);
	/* a task notice's subject does not hold the task type: check it alone */
	if (report ? !token_matches(&p, end, task_type, '.') :
		!token_ok(VARDATA_ANY(task_type), VARSIZE_ANY_EXHDR(task_type)))
		PG_RETURN_BOOL(false);
	PG_RETURN_BOOL(token_matches(&p, end, feature, '\0'));
}
