/*-------------------------------------------------------------------------
 *
 * agog_subject.c
 *		Subject tokens: validation, subjects, stream names and message ids.
 *
 * nats.c does not check subjects, so a token that holds a dot, a wildcard,
 * white space or a line break would change the subject, or inject protocol
 * text.  Every user-supplied token goes through agog_check_token first.
 *
 * Copyright (c) 2026, agog_nats developers
 *
 * src/agog_subject.c
 *
 *-------------------------------------------------------------------------
 */
#include "agog_nats.h"

#include "miscadmin.h"
#include "utils/timestamp.h"

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

		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
			  (c >= '0' && c <= '9') || c == '_' || c == '-'))
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
