/*-------------------------------------------------------------------------
 *
 * agog_bench.c
 *		Benchmarks of agog_nats against raw nats.c and plain PostgreSQL,
 *		measured in the same run (issue 4).  Run by test/bench.sh:
 *
 *	agog_bench NATS_URL CONNINFO
 *
 * Environment:
 *	AGOG_BENCH_ROUNDS	rounds per figure (default 5)
 *	AGOG_BENCH_QUICK	1: every count divided by 10 (a smoke run, not figures)
 *	AGOG_BENCH_PGLOG	the server's log file: the worker's memory contexts
 *						are read from it (pg_log_backend_memory_contexts)
 *	AGOG_BENCH_NATS_PID	nats-server's pid: its CPU time is shown per phase
 *	AGOG_BENCH_ONLY		for profiling: run only this phase, in a loop, for
 *						AGOG_BENCH_SECONDS (default 60), print no table; one
 *						of select1, publish_now, fetch, status, insert4,
 *						e2e4, drain, lag.  The pids to attach perf to are
 *						printed first.
 *
 * Every figure is measured for AGOG_BENCH_ROUNDS rounds after one warm-up
 * round; a figure is the median of the rounds, with their min and max.  Raw
 * and SQL rounds of a comparison are interleaved (raw, SELECT 1, SQL, raw,
 * ...), so slow phases of the machine hit both.  Ratios are ratios of
 * medians.  The SQL figures go through libpq's extended protocol with
 * prepared statements over the Unix socket, SELECT 1 included.
 *
 * Streams (created by the worker): raw and SQL publishes go to
 * agog_features_backend (agent roy); the fetch figures read
 * agog_features_research (agent cynthia), filled by this program with
 * 10,000 reports on 1,000 subjects and not written to afterwards.
 *
 * The workflow hand-off figure runs last: workflows of a two-stage pipeline
 * (bench_handoff: cynthia, then sylvia), one at a time; see round_handoff.
 *
 * Copyright (c) 2026, agog_nats developers
 *
 * test/bench/agog_bench.c
 *
 *-------------------------------------------------------------------------
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <libpq-fe.h>
#include <nats/nats.h>

#define MAX_ROUNDS		20
#define REPORT_BYTES	20480	/* size of the encoded seed JSON */
#define FETCH_SUBJECTS	1000
#define FETCH_MSGS		10000
#define DRAIN_SUBJECTS	100		/* the drain's fill: features drain0 .. drain99 */
#define STRINGIFY_(x)	#x
#define STRINGIFY(x)	STRINGIFY_(x)
#define MEMORY_OPS		100000
#define MEMORY_TARGET	(1024.0 * 1024.0)

static int	rounds = 5;
static int	scale_div = 1;		/* 10 in quick mode */
static const char *nats_url;
static const char *conninfo;
static const char *pglog_path;
static int	nats_pid;

static char *content;			/* markdown of a report */
static char *insert_body;		/* its seed JSON, for the plain INSERT */
static const char *metadata_json = "{\"files_analyzed\": 15}";
static const char *floor_body;	/* the encoded report, for the floor's publish */

/* ----------------------------------------------------------------
 * Utilities
 * ----------------------------------------------------------------
 */

static void
die(const char *fmt,...)
{
	va_list		ap;

	va_start(ap, fmt);
	fprintf(stderr, "agog_bench: ");
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, "\n");
	va_end(ap);
	exit(1);
}

static void
note(const char *fmt,...)
{
	va_list		ap;

	va_start(ap, fmt);
	fprintf(stderr, "[bench] ");
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, "\n");
	va_end(ap);
}

/* Monotonic time in microseconds. */
static double
now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

/* Wall-clock time in microseconds since the Unix epoch. */
static int64_t
wall_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t) ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void
sleep_us(double us)
{
	struct timespec ts;

	if (us <= 0)
		return;
	ts.tv_sec = (time_t) (us / 1e6);
	ts.tv_nsec = (long) ((us - ts.tv_sec * 1e6) * 1e3);
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

static void
sleep_until_us(double t)
{
	struct timespec ts;

	ts.tv_sec = (time_t) (t / 1e6);
	ts.tv_nsec = (long) ((t - ts.tv_sec * 1e6) * 1e3);
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
		;
}

static int
cmp_double(const void *a, const void *b)
{
	double		x = *(const double *) a;
	double		y = *(const double *) b;

	return x < y ? -1 : x > y ? 1 : 0;
}

/* The q-quantile (0..1) of n values; sorts them. */
static double
quantile(double *v, int n, double q)
{
	int			i;

	if (n <= 0)
		return NAN;
	qsort(v, n, sizeof(double), cmp_double);
	i = (int) ceil(q * n) - 1;
	if (i < 0)
		i = 0;
	if (i >= n)
		i = n - 1;
	return v[i];
}

/* A deterministic pseudo-random sequence (same for raw and SQL rounds). */
static uint64_t
lcg_next(uint64_t *state)
{
	*state = *state * 6364136223846793005ULL + 1442695040888963407ULL;
	return *state >> 33;
}

static int
scaled(int n)
{
	int			m = n / scale_div;

	return m < 1 ? 1 : m;
}

/* ----------------------------------------------------------------
 * Figures: one value per round; median, min, max
 * ----------------------------------------------------------------
 */
typedef struct Fig
{
	double		v[MAX_ROUNDS * 4];
	int			n;
} Fig;

static void
fig_add(Fig *f, double x)
{
	if (f->n < (int) (sizeof(f->v) / sizeof(f->v[0])))
		f->v[f->n++] = x;
}

static double
fig_med(const Fig *f)
{
	double		tmp[MAX_ROUNDS * 4];

	memcpy(tmp, f->v, sizeof(double) * f->n);
	if (f->n == 0)
		return NAN;
	qsort(tmp, f->n, sizeof(double), cmp_double);
	return f->n % 2 ? tmp[f->n / 2] : (tmp[f->n / 2 - 1] + tmp[f->n / 2]) / 2;
}

static double
fig_min(const Fig *f)
{
	double		m = INFINITY;

	for (int i = 0; i < f->n; i++)
		m = f->v[i] < m ? f->v[i] : m;
	return m;
}

static double
fig_max(const Fig *f)
{
	double		m = -INFINITY;

	for (int i = 0; i < f->n; i++)
		m = f->v[i] > m ? f->v[i] : m;
	return m;
}

/* ----------------------------------------------------------------
 * The report: seed-format JSON of REPORT_BYTES bytes
 * ----------------------------------------------------------------
 */

/* JSON string escape as PostgreSQL's escape_json does it. */
static void
json_escape(char **out, size_t *len, size_t *cap, const char *s)
{
#define PUT(c) do { if (*len + 8 >= *cap) { *cap *= 2; *out = realloc(*out, *cap); } (*out)[(*len)++] = (c); } while (0)
	PUT('"');
	for (; *s; s++)
	{
		switch (*s)
		{
			case '\n':
				PUT('\\');
				PUT('n');
				break;
			case '"':
				PUT('\\');
				PUT('"');
				break;
			case '\\':
				PUT('\\');
				PUT('\\');
				break;
			case '\t':
				PUT('\\');
				PUT('t');
				break;
			default:
				PUT(*s);
		}
	}
	PUT('"');
	(*out)[*len] = '\0';
#undef PUT
}

/*
 * seed_json
 *		{"content": ..., "metadata": {"agent", "taskType", "feature",
 *		"timestamp", "files_analyzed"}}, as agog_nats encodes it.  malloc'd.
 */
static char *
seed_json(const char *agent, const char *task_type, const char *feature,
		  int *len_out)
{
	size_t		cap = strlen(content) * 2 + 512;
	size_t		len = 0;
	char	   *out = malloc(cap);
	char		tail[512];
	time_t		t = time(NULL);
	struct tm	tm;
	int			n;

	memcpy(out, "{\"content\":", 11);
	len = 11;
	json_escape(&out, &len, &cap, content);
	gmtime_r(&t, &tm);
	n = snprintf(tail, sizeof(tail),
				 ",\"metadata\":{\"agent\":\"%s\",\"taskType\":\"%s\",\"feature\":\"%s\","
				 "\"timestamp\":\"%04d-%02d-%02dT%02d:%02d:%02d.000Z\",\"files_analyzed\": 15}}",
				 agent, task_type, feature, tm.tm_year + 1900, tm.tm_mon + 1,
				 tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
	if (len + n + 1 > cap)
		out = realloc(out, len + n + 1);
	memcpy(out + len, tail, n + 1);
	*len_out = (int) (len + n);
	return out;
}

/*
 * make_content
 *		A markdown report of words, numbers and headings, about as
 *		compressible as prose (pglz takes it to roughly half), sized so that
 *		the encoded seed JSON is REPORT_BYTES bytes.
 */
static void
make_content(void)
{
	static const char *const words[] = {
		"the", "customer", "search", "index", "query", "latency", "returns", "results",
		"within", "budget", "because", "cache", "hit", "ratio", "improves", "after",
		"warmup", "we", "measured", "p99", "across", "regions", "schema", "migration",
		"adds", "column", "backfill", "runs", "in", "batches", "risk", "low",
		"rollback", "plan", "tested", "feature", "flag", "gates", "rollout", "agents",
		"critique", "notes", "missing", "edge", "case", "unicode", "names", "sorting",
		"collation", "matters", "for", "ranking", "relevance", "score", "boost", "recent",
		"orders", "weights", "tuned", "offline", "evaluation", "shows", "gain", "of",
		"percent", "on", "click", "through", "rate", "while", "keeping", "cost", "flat",
		"frontend", "debounce", "keystrokes", "render", "list", "virtualized", "a11y",
		"labels", "present", "tests", "cover", "happy", "path", "and", "errors", "retry",
		"backoff", "timeout", "circuit", "breaker", "metrics", "dashboard", "alerts",
		"statistics", "confidence", "interval", "sample", "size", "power", "analysis",
		"variance", "reduction", "stratified", "by", "segment", "device", "country",
	};
	int			nwords = (int) (sizeof(words) / sizeof(words[0]));
	uint64_t	st = 42;
	size_t		cap = REPORT_BYTES * 2;
	size_t		len = 0;
	int			section = 1;
	int			line = 0;
	int			target = REPORT_BYTES - 200;	/* room for escapes and metadata */

	content = malloc(cap);
	len = (size_t) snprintf(content, cap, "# Research report: customer-search\n\n");
	while ((int) len < target - 120)
	{
		int			n;

		if (line % 12 == 0)
			len += snprintf(content + len, cap - len, "\n## Finding %d\n\n", section++);
		for (int w = 0; w < 12; w++)
		{
			const char *word = words[lcg_next(&st) % nwords];

			if (lcg_next(&st) % 9 == 0)
				n = snprintf(content + len, cap - len, "%" PRIu64 " ", lcg_next(&st) % 100000);
			else
				n = snprintf(content + len, cap - len, "%s ", word);
			len += n;
		}
		content[len - 1] = '\n';
		line++;
	}
	content[len] = '\0';

	/* trim or pad to the exact size of the encoded report */
	for (;;)
	{
		int			jl;
		char	   *j = seed_json("cynthia", "research", "customer-search", &jl);

		free(j);
		if (jl == REPORT_BYTES)
			break;
		if (jl > REPORT_BYTES)
			content[--len] = '\0';
		else
		{
			content[len++] = '.';
			content[len] = '\0';
		}
	}
}

/* ----------------------------------------------------------------
 * PostgreSQL helpers
 * ----------------------------------------------------------------
 */
static PGconn *
pg_open(void)
{
	PGconn	   *c = PQconnectdb(conninfo);

	if (PQstatus(c) != CONNECTION_OK)
		die("cannot connect to PostgreSQL: %s", PQerrorMessage(c));
	return c;
}

static void
pg_cmd(PGconn *c, const char *sql)
{
	PGresult   *r = PQexec(c, sql);

	if (PQresultStatus(r) != PGRES_COMMAND_OK && PQresultStatus(r) != PGRES_TUPLES_OK)
		die("%s: %s", sql, PQerrorMessage(c));
	PQclear(r);
}

static void
pg_prepare(PGconn *c, const char *name, const char *sql, int nparams)
{
	PGresult   *r = PQprepare(c, name, sql, nparams, NULL);

	if (PQresultStatus(r) != PGRES_COMMAND_OK)
		die("prepare %s: %s", sql, PQerrorMessage(c));
	PQclear(r);
}

static PGresult *
pg_run(PGconn *c, const char *name, int nparams, const char *const *params)
{
	PGresult   *r = PQexecPrepared(c, name, nparams, params, NULL, NULL, 0);

	if (PQresultStatus(r) != PGRES_TUPLES_OK && PQresultStatus(r) != PGRES_COMMAND_OK)
		die("execute %s: %s", name, PQerrorMessage(c));
	return r;
}

/* One bigint of a one-row query with no parameters. */
static int64_t
pg_int(PGconn *c, const char *sql)
{
	PGresult   *r = PQexec(c, sql);
	int64_t		v;

	if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1)
		die("%s: %s", sql, PQerrorMessage(c));
	v = PQgetisnull(r, 0, 0) ? -1 : strtoll(PQgetvalue(r, 0, 0), NULL, 10);
	PQclear(r);
	return v;
}

/* Prepare the statements every benchmark connection uses. */
static void
prepare_all(PGconn *c)
{
	pg_prepare(c, "select1", "SELECT 1", 0);
	pg_prepare(c, "carry_in",
			   "SELECT octet_length($1) + octet_length($2) + octet_length($3) + octet_length($4) "
			   "       + octet_length($5::jsonb::text)", 5);
	pg_prepare(c, "carry_out", "SELECT content FROM bench_carry", 0);
	pg_prepare(c, "floor_publish", "SELECT agog_bench_floor_publish($1, $2, $3)", 3);
	pg_prepare(c, "floor_publish_loop", "SELECT agog_bench_floor_publish_loop($1, $2, $3)", 3);
	pg_prepare(c, "floor_get_loop",
			   "SELECT agog_bench_floor_get_loop($1, 'agog_features_research', $2)", 2);
	pg_prepare(c, "floor_get",
			   "SELECT agog_bench_floor_get($1, 'agog_features_research', $2)", 2);
	pg_prepare(c, "insert_plain",
			   "INSERT INTO bench_plain (subject, body) VALUES ($1, $2)", 2);
	pg_prepare(c, "publish_now",
			   "SELECT agog_publish_report_now($1, $2, $3, $4, $5::jsonb)", 5);
	pg_prepare(c, "publish",
			   "SELECT agog_publish_report($1, $2, $3, $4, $5::jsonb)", 5);
	pg_prepare(c, "fetch",
			   "SELECT * FROM agog_fetch_report($1, $2, $3)", 3);
	pg_prepare(c, "status", "SELECT * FROM agog_stream_status()", 0);
	pg_prepare(c, "is_published",
			   "SELECT state = 'published' FROM agog_nats.outbox WHERE id = $1", 1);
	pg_prepare(c, "count_published",
			   "SELECT count(*) FROM agog_nats.outbox "
			   " WHERE id BETWEEN $1 AND $2 AND state = 'published'", 2);
}

/* ----------------------------------------------------------------
 * NATS helpers
 * ----------------------------------------------------------------
 */
static natsConnection *nc;
static jsCtx *js;
static volatile int async_errors;

/*
 * A second connection for the requests by hand (as the extension's backends
 * send them): SendAsap, and one synchronous subscription for the replies.
 */
static natsConnection *hand_nc;
static natsSubscription *hand_sub;
static char hand_prefix[64];
static uint64_t hand_seq;

static void
on_async_err(jsCtx *ctx, jsPubAckErr *pae, void *closure)
{
	(void) ctx;
	(void) closure;
	__atomic_add_fetch(&async_errors, 1, __ATOMIC_SEQ_CST);
	if (async_errors < 5)
		fprintf(stderr, "[bench] async publish error: %s\n",
				pae->ErrText ? pae->ErrText : natsStatus_GetText(pae->Err));
}

static void
nats_check(natsStatus s, const char *what)
{
	if (s != NATS_OK)
		die("%s: %s (%s)", what, natsStatus_GetText(s), nats_GetLastError(NULL));
}

static void
nats_setup(void)
{
	natsOptions *o = NULL;
	jsOptions	jo;

	nats_check(natsOptions_Create(&o), "natsOptions_Create");
	nats_check(natsOptions_SetURL(o, nats_url), "natsOptions_SetURL");
	nats_check(natsOptions_SetTimeout(o, 5000), "natsOptions_SetTimeout");
	nats_check(natsConnection_Connect(&nc, o), "connect to NATS");
	natsOptions_Destroy(o);
	jsOptions_Init(&jo);
	jo.Wait = 5000;
	jo.PublishAsync.MaxPending = 4096;
	jo.PublishAsync.ErrHandler = on_async_err;
	nats_check(natsConnection_JetStream(&js, nc, &jo), "JetStream context");

	{
		natsInbox  *inbox = NULL;
		char		wildcard[96];

		nats_check(natsOptions_Create(&o), "natsOptions_Create");
		nats_check(natsOptions_SetURL(o, nats_url), "natsOptions_SetURL");
		nats_check(natsOptions_SetSendAsap(o, true), "natsOptions_SetSendAsap");
		nats_check(natsConnection_Connect(&hand_nc, o), "connect to NATS");
		natsOptions_Destroy(o);
		nats_check(natsInbox_Create(&inbox), "natsInbox_Create");
		snprintf(hand_prefix, sizeof(hand_prefix), "%s", (const char *) inbox);
		natsInbox_Destroy(inbox);
		snprintf(wildcard, sizeof(wildcard), "%s.*", hand_prefix);
		nats_check(natsConnection_SubscribeSync(&hand_sub, hand_nc, wildcard),
				   "natsConnection_SubscribeSync");
	}
}

/* ----------------------------------------------------------------
 * /proc readers
 * ----------------------------------------------------------------
 */

/* A "Name:   N kB" field of /proc/PID/status, in bytes; -1 if absent. */
static double
proc_status_kb(int pid, const char *field)
{
	char		path[64];
	char		line[256];
	FILE	   *f;
	double		v = -1;
	size_t		flen = strlen(field);

	snprintf(path, sizeof(path), "/proc/%d/status", pid);
	f = fopen(path, "r");
	if (f == NULL)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (strncmp(line, field, flen) == 0 && line[flen] == ':')
		{
			v = strtod(line + flen + 1, NULL) * 1024.0;
			break;
		}
	fclose(f);
	return v;
}

/* utime + stime of a process, in milliseconds (all its threads). */
static double
proc_cpu_ms(int pid)
{
	char		path[64];
	char		buf[2048];
	FILE	   *f;
	char	   *p;
	unsigned long ut = 0,
				st = 0;
	size_t		n;

	if (pid <= 0)
		return -1;
	snprintf(path, sizeof(path), "/proc/%d/stat", pid);
	f = fopen(path, "r");
	if (f == NULL)
		return -1;
	n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	p = strrchr(buf, ')');
	if (p == NULL)
		return -1;
	/* fields after ") ": state(3) ... utime(14) stime(15) */
	if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) != 2)
		return -1;
	return (ut + st) * 1000.0 / sysconf(_SC_CLK_TCK);
}

/* ----------------------------------------------------------------
 * Rounds of the raw baselines
 * ----------------------------------------------------------------
 */
static int	msg_counter;

/*
 * The subject of the i-th raw publish: one subject of its own when nsubj is
 * 0, else the subjects the drain's fill publishes to (feature drain0 ..
 * drain<nsubj-1>), so that nats-server does the same work for both.  With
 * the stream at its message limit every publish discards the oldest message,
 * and on 100 subjects that costs nats-server 2.9 about twice the CPU of one.
 */
static const char *
raw_subject(char *buf, size_t size, const char *own, int nsubj, int i)
{
	if (nsubj <= 0)
		return own;
	snprintf(buf, size, "agog.deliverables.roy.backend.drain%d", i % nsubj);
	return buf;
}

/* js_Publish, one at a time: rate and per-call p50. */
static void
round_raw_sync(int n, int nsubj, const char *body, int len, Fig *rate, Fig *p50)
{
	char		subj[128];
	double	   *lat = malloc(sizeof(double) * n);
	double		t0 = now_us();
	char		id[64];

	for (int i = 0; i < n; i++)
	{
		jsPubOptions po;
		jsPubAck   *pa = NULL;
		jsErrCode	jerr = 0;
		double		a;
		natsStatus	s;

		jsPubOptions_Init(&po);
		snprintf(id, sizeof(id), "bench-sync-%d-%d", (int) getpid(), ++msg_counter);
		po.MsgId = id;
		a = now_us();
		s = js_Publish(&pa, js,
					   raw_subject(subj, sizeof(subj), "agog.deliverables.roy.backend.rawbench", nsubj, i),
					   body, len, &po, &jerr);
		lat[i] = now_us() - a;
		if (s != NATS_OK)
			die("js_Publish: %s (jerr %d)", natsStatus_GetText(s), (int) jerr);
		jsPubAck_Destroy(pa);
	}
	if (rate)
		fig_add(rate, n / ((now_us() - t0) / 1e6));
	if (p50)
		fig_add(p50, quantile(lat, n, 0.5) / 1000.0);
	free(lat);
}

/*
 * js_PublishAsync of n messages, then wait for every ack: rate, and
 * nats-server's CPU ms per 1,000 messages (to set against the drain's).
 */
static void
round_raw_async(int n, int nsubj, const char *body, int len, Fig *rate, Fig *nats_cpu_per_k)
{
	char		subj[128];
	double		t0 = now_us();
	double		ncpu0 = proc_cpu_ms(nats_pid);
	char		id[64];
	jsPubOptions po;
	int			errs = async_errors;

	for (int i = 0; i < n; i++)
	{
		jsPubOptions_Init(&po);
		snprintf(id, sizeof(id), "bench-async-%d-%d", (int) getpid(), ++msg_counter);
		po.MsgId = id;
		po.MaxWait = 10000;
		nats_check(js_PublishAsync(js,
								   raw_subject(subj, sizeof(subj), "agog.deliverables.roy.backend.rawasync", nsubj, i),
								   body, len, &po),
				   "js_PublishAsync");
	}
	jsPubOptions_Init(&po);
	po.MaxWait = 60000;
	nats_check(js_PublishAsyncComplete(js, &po), "js_PublishAsyncComplete");
	if (async_errors != errs)
		die("%d asynchronous publishes failed", async_errors - errs);
	if (rate)
		fig_add(rate, n / ((now_us() - t0) / 1e6));
	if (nats_cpu_per_k && ncpu0 >= 0)
		fig_add(nats_cpu_per_k, (proc_cpu_ms(nats_pid) - ncpu0) * 1000.0 / n);
}

/*
 * One request by hand on hand_nc, with a reply subject of its own, and its
 * reply taken from hand_sub (stale ones dropped), as the extension's backends
 * send their direct gets.  The reply is the caller's.
 */
static natsMsg *
hand_request(const char *subject, const char *data, int len)
{
	char		reply[96];

	snprintf(reply, sizeof(reply), "%s.%" PRIu64, hand_prefix, ++hand_seq);
	nats_check(natsConnection_PublishRequest(hand_nc, subject, reply, data, len),
			   "natsConnection_PublishRequest");
	for (;;)
	{
		natsMsg    *r = NULL;

		nats_check(natsSubscription_NextMsg(&r, hand_sub, 5000), "natsSubscription_NextMsg");
		if (strcmp(natsMsg_GetSubject(r), reply) == 0)
			return r;
		natsMsg_Destroy(r);
	}
}

/*
 * Direct gets, last by subject, over the fetch stream's subjects, or (drain)
 * over the drain's subjects of agog_features_backend: with js_DirectGetMsg,
 * or (by_hand) sent as the extension's backends send them.
 */
static void
round_raw_get(int n, bool drain, bool by_hand, Fig *p50, Fig *p99)
{
	double	   *lat = malloc(sizeof(double) * n);
	uint64_t	st = 7;
	char		subj[128];
	const char *stream = drain ? "agog_features_backend" : "agog_features_research";
	char		api[256];

	for (int i = 0; i < n; i++)
	{
		natsMsg    *m = NULL;
		double		a;
		natsStatus	s = NATS_OK;
		int			k = (int) (lcg_next(&st) % FETCH_SUBJECTS);

		if (drain)
			raw_subject(subj, sizeof(subj), NULL, DRAIN_SUBJECTS, k);
		else
			snprintf(subj, sizeof(subj), "agog.deliverables.cynthia.research.f%04d", k);
		if (by_hand)
		{
			/* as the extension asks: the subject in the API subject, no body */
			snprintf(api, sizeof(api), "$JS.API.DIRECT.GET.%s.%s", stream, subj);
			a = now_us();
			m = hand_request(api, NULL, 0);
		}
		else
		{
			jsDirectGetMsgOptions dg;

			jsDirectGetMsgOptions_Init(&dg);
			dg.LastBySubject = subj;
			a = now_us();
			s = js_DirectGetMsg(&m, js, stream, NULL, &dg);
		}
		lat[i] = now_us() - a;
		if (s != NATS_OK || natsMsg_GetDataLength(m) < REPORT_BYTES - 100)
			die("direct get%s %s: %s", by_hand ? " by hand" : "", subj, natsStatus_GetText(s));
		natsMsg_Destroy(m);
	}
	if (p99)
		fig_add(p99, quantile(lat, n, 0.99) / 1000.0);
	if (p50)
		fig_add(p50, quantile(lat, n, 0.5) / 1000.0);
	free(lat);
}

/* js_GetStreamInfo of one stream. */
static void
round_raw_info(int n, Fig *p50)
{
	double	   *lat = malloc(sizeof(double) * n);

	for (int i = 0; i < n; i++)
	{
		jsStreamInfo *si = NULL;
		jsErrCode	jerr = 0;
		double		a = now_us();
		natsStatus	s = js_GetStreamInfo(&si, js, "agog_features_research", NULL, &jerr);

		lat[i] = now_us() - a;
		if (s != NATS_OK)
			die("js_GetStreamInfo: %s", natsStatus_GetText(s));
		jsStreamInfo_Destroy(si);
	}
	if (p50)
		fig_add(p50, quantile(lat, n, 0.5) / 1000.0);
	free(lat);
}

/* ----------------------------------------------------------------
 * Rounds of single-connection SQL figures
 * ----------------------------------------------------------------
 */
typedef enum SqlKind
{
	SQL_SELECT1,
	SQL_CARRY_IN,				/* the report's bytes to the server, nothing else */
	SQL_CARRY_OUT,				/* the content's bytes to the client, nothing else */
	SQL_FLOOR_PUBLISH,			/* a bare C function: js_Publish of its argument */
	SQL_FLOOR_GET,				/* a bare C function: js_DirectGetMsg's data as text */
	SQL_FLOOR_PUBLISH_LOOP,		/* the same over a connection without nats.c's threads */
	SQL_FLOOR_GET_LOOP,			/* the same over a connection without nats.c's threads */
	SQL_PUBLISH_NOW,
	SQL_FETCH,
	SQL_FETCH_DRAIN,			/* agog_fetch_report on the drain's subjects */
	SQL_STATUS,
	SQL_PUBLISH,
	SQL_INSERT,
} SqlKind;

/*
 * sql_call
 *		One statement of the given kind on c; returns the bigint result of
 *		agog_publish_report (else 0).  seq picks the subject.
 */
static int64_t
sql_call(PGconn *c, SqlKind kind, int seq, const char *feature)
{
	PGresult   *r = NULL;
	char		feat[80];
	int64_t		ret = 0;

	switch (kind)
	{
		case SQL_SELECT1:
			r = pg_run(c, "select1", 0, NULL);
			break;
		case SQL_CARRY_IN:
			{
				const char *p[5] = {"roy", "backend", feature, content, metadata_json};

				r = pg_run(c, "carry_in", 5, p);
				break;
			}
		case SQL_CARRY_OUT:
			r = pg_run(c, "carry_out", 0, NULL);
			if (PQntuples(r) != 1 || PQgetlength(r, 0, 0) < 20000)
				die("the carry-out statement returned no content");
			break;
		case SQL_FLOOR_PUBLISH:
		case SQL_FLOOR_PUBLISH_LOOP:
			{
				const char *p[3] = {nats_url, "agog.deliverables.roy.backend.floorbench", floor_body};
				const char *stmt = kind == SQL_FLOOR_PUBLISH ? "floor_publish" : "floor_publish_loop";

				r = pg_run(c, stmt, 3, p);
				if (PQntuples(r) != 1 || PQgetisnull(r, 0, 0))
					die("%s returned no answer", stmt);
				break;
			}
		case SQL_FLOOR_GET:
		case SQL_FLOOR_GET_LOOP:
			{
				const char *p[2] = {nats_url, feat};
				const char *stmt = kind == SQL_FLOOR_GET ? "floor_get" : "floor_get_loop";

				snprintf(feat, sizeof(feat), "agog.deliverables.cynthia.research.f%04d",
						 seq % FETCH_SUBJECTS);
				r = pg_run(c, stmt, 2, p);
				if (PQntuples(r) != 1 || PQgetlength(r, 0, 0) < REPORT_BYTES - 100)
					die("%s(%s) returned no report", stmt, feat);
				break;
			}
		case SQL_PUBLISH_NOW:
			{
				const char *p[5] = {"roy", "backend", feature, content, metadata_json};

				r = pg_run(c, "publish_now", 5, p);
				if (PQntuples(r) != 1 || PQgetisnull(r, 0, 0))
					die("agog_publish_report_now returned no message id");
				break;
			}
		case SQL_PUBLISH:
			{
				const char *p[5] = {"roy", "backend", feature, content, metadata_json};

				r = pg_run(c, "publish", 5, p);
				ret = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
				break;
			}
		case SQL_FETCH:
			{
				const char *p[3] = {"cynthia", "research", feat};

				snprintf(feat, sizeof(feat), "f%04d", seq % FETCH_SUBJECTS);
				r = pg_run(c, "fetch", 3, p);
				if (PQntuples(r) != 1)
					die("agog_fetch_report(%s) returned %d rows", feat, PQntuples(r));
				break;
			}
		case SQL_FETCH_DRAIN:
			{
				const char *p[3] = {"roy", "backend", feat};

				snprintf(feat, sizeof(feat), "drain%d", seq % DRAIN_SUBJECTS);
				r = pg_run(c, "fetch", 3, p);
				if (PQntuples(r) != 1 || PQgetlength(r, 0, 0) < 20000)
					die("agog_fetch_report(roy, backend, %s) returned no report", feat);
				break;
			}
		case SQL_STATUS:
			r = pg_run(c, "status", 0, NULL);
			if (PQntuples(r) != 6)
				die("agog_stream_status() returned %d rows", PQntuples(r));
			break;
		case SQL_INSERT:
			{
				const char *p[2] = {"agog.deliverables.roy.backend.plain", insert_body};

				r = pg_run(c, "insert_plain", 2, p);
				break;
			}
	}
	PQclear(r);
	return ret;
}

/* n calls of one kind on one connection: per-call p50 (and p99), rate. */
static void
round_sql(PGconn *c, SqlKind kind, int n, Fig *p50, Fig *p99, Fig *rate)
{
	double	   *lat = malloc(sizeof(double) * n);
	uint64_t	st = 7;
	double		t0 = now_us();

	for (int i = 0; i < n; i++)
	{
		int			seq = (int) (lcg_next(&st) % FETCH_SUBJECTS);
		double		a = now_us();

		sql_call(c, kind, seq, "nowbench");
		lat[i] = now_us() - a;
	}
	if (rate)
		fig_add(rate, n / ((now_us() - t0) / 1e6));
	if (p99)
		fig_add(p99, quantile(lat, n, 0.99) / 1000.0);
	if (p50)
		fig_add(p50, quantile(lat, n, 0.5) / 1000.0);
	free(lat);
}

/* ----------------------------------------------------------------
 * Concurrent clients (threads, one connection each)
 * ----------------------------------------------------------------
 */
typedef struct Client
{
	PGconn	   *conn;
	SqlKind		kind;
	int			n;				/* statements to run */
	double		interval_us;	/* > 0: paced, one statement per interval */
	double		start_offset_us;
	pthread_barrier_t *barrier;
	double		t_start;		/* shared start, set by main after barrier */
	char		feature[64];
	/* results */
	int64_t    *ids;			/* SQL_PUBLISH: outbox ids */
	int64_t    *commit_wall;	/* SQL_PUBLISH: wall time after commit, us */
	double		t_done;
} Client;

static void *
client_main(void *arg)
{
	Client	   *cl = arg;
	double		t0;

	pthread_barrier_wait(cl->barrier);
	t0 = now_us() + cl->start_offset_us;
	for (int i = 0; i < cl->n; i++)
	{
		int64_t		id;

		if (cl->interval_us > 0)
			sleep_until_us(t0 + i * cl->interval_us);
		id = sql_call(cl->conn, cl->kind, i, cl->feature);
		if (cl->ids)
		{
			cl->ids[i] = id;
			cl->commit_wall[i] = wall_us();
		}
	}
	cl->t_done = now_us();
	return NULL;
}

/*
 * run_clients
 *		nthreads clients of the kind, n statements each, started together.
 *		Returns the start time (monotonic, us); each client's results stay in
 *		cls.
 */
static double
run_clients(Client *cls, int nthreads, SqlKind kind, int n, double interval_us,
			const char *feature, bool keep_ids)
{
	pthread_t	th[16];
	pthread_barrier_t barrier;
	double		t0;

	pthread_barrier_init(&barrier, NULL, nthreads + 1);
	for (int i = 0; i < nthreads; i++)
	{
		Client	   *cl = &cls[i];

		cl->kind = kind;
		cl->n = n;
		cl->interval_us = interval_us;
		cl->start_offset_us = interval_us > 0 ? interval_us * i / nthreads : 0;
		cl->barrier = &barrier;
		snprintf(cl->feature, sizeof(cl->feature), "%s", feature);
		free(cl->ids);
		free(cl->commit_wall);
		cl->ids = keep_ids ? calloc(n, sizeof(int64_t)) : NULL;
		cl->commit_wall = keep_ids ? calloc(n, sizeof(int64_t)) : NULL;
		if (pthread_create(&th[i], NULL, client_main, cl) != 0)
			die("pthread_create failed");
	}
	pthread_barrier_wait(&barrier);
	t0 = now_us();
	for (int i = 0; i < nthreads; i++)
		pthread_join(th[i], NULL);
	pthread_barrier_destroy(&barrier);
	return t0;
}

/*
 * wait_published
 *		Poll (every 2 ms) until every outbox row with id in [lo, hi] is
 *		published; the rows are published in id order, so the last id is
 *		watched first, then the count is checked.  Returns the monotonic
 *		time at which it was seen.
 */
static double
wait_published(PGconn *mon, int64_t lo, int64_t hi, int64_t expected)
{
	char		slo[32],
				shi[32];
	const char *p1[1] = {shi};
	const char *p2[2] = {slo, shi};
	double		deadline = now_us() + 300e6;

	snprintf(slo, sizeof(slo), "%" PRId64, lo);
	snprintf(shi, sizeof(shi), "%" PRId64, hi);
	for (;;)
	{
		PGresult   *r = pg_run(mon, "is_published", 1, p1);
		bool		done = PQntuples(r) == 1 && strcmp(PQgetvalue(r, 0, 0), "t") == 0;

		PQclear(r);
		if (done)
			break;
		if (now_us() > deadline)
			die("outbox rows %s..%s not published within 300 s", slo, shi);
		sleep_us(2000);
	}
	for (;;)
	{
		PGresult   *r = pg_run(mon, "count_published", 2, p2);
		int64_t		n = strtoll(PQgetvalue(r, 0, 0), NULL, 10);

		PQclear(r);
		if (n >= expected)
			return now_us();
		if (now_us() > deadline)
			die("only %" PRId64 " of %" PRId64 " outbox rows published within 300 s", n, expected);
		sleep_us(2000);
	}
}

static void
ids_range(Client *cls, int nthreads, int64_t *lo, int64_t *hi)
{
	*lo = INT64_MAX;
	*hi = 0;
	for (int t = 0; t < nthreads; t++)
		for (int i = 0; i < cls[t].n; i++)
		{
			*lo = cls[t].ids[i] < *lo ? cls[t].ids[i] : *lo;
			*hi = cls[t].ids[i] > *hi ? cls[t].ids[i] : *hi;
		}
}

/* Wait until nothing is pending in the outbox (between phases). */
static void
wait_outbox_idle(PGconn *mon)
{
	double		deadline = now_us() + 300e6;

	while (pg_int(mon, "SELECT count(*) FROM agog_nats.outbox WHERE state = 'pending'") > 0)
	{
		if (now_us() > deadline)
			die("the outbox did not drain within 300 s");
		sleep_us(5000);
	}
}

/*
 * The CPU a 4-client round costs, per 1,000 rows: the clients' backends,
 * and for agog_publish_report the worker and nats-server as well (they
 * share the machine's cores with the clients; a plain INSERT has neither).
 */
typedef struct CpuSplit
{
	Fig			clients;
	Fig			worker;
	Fig			nats;
	Fig			total;
} CpuSplit;

/* utime + stime of the clients' backends, ms; -1 when one cannot be read */
static double
clients_cpu_ms(Client *cls, int nthreads)
{
	double		sum = 0;

	for (int t = 0; t < nthreads; t++)
	{
		double		ms = proc_cpu_ms(PQbackendPID(cls[t].conn));

		if (ms < 0)
			return -1;
		sum += ms;
	}
	return sum;
}

/*
 * round_e2e
 *		nthreads clients, n autocommit agog_publish_report calls each; the
 *		rate is rows / (time until every row of the round is published).
 *		*client_rate gets the rate at which the clients committed; *cpu the
 *		CPU per 1,000 reports of the clients' backends, the worker and
 *		nats-server from the start until the last one was published.
 */
static void
round_e2e(PGconn *mon, Client *cls, int nthreads, int n, int worker_pid, Fig *rate,
		  Fig *client_rate, CpuSplit *cpu)
{
	double		t0,
				t1,
				tc = 0;
	int64_t		lo,
				hi;
	double		ccpu0,
				wcpu0,
				ncpu0;
	double		rows = (double) nthreads * n;

	wait_outbox_idle(mon);
	ccpu0 = clients_cpu_ms(cls, nthreads);
	wcpu0 = proc_cpu_ms(worker_pid);
	ncpu0 = proc_cpu_ms(nats_pid);
	t0 = run_clients(cls, nthreads, SQL_PUBLISH, n, 0, "e2ebench", true);
	for (int t = 0; t < nthreads; t++)
		tc = cls[t].t_done > tc ? cls[t].t_done : tc;
	ids_range(cls, nthreads, &lo, &hi);
	t1 = wait_published(mon, lo, hi, (int64_t) nthreads * n);
	if (cpu && ccpu0 >= 0 && wcpu0 >= 0 && ncpu0 >= 0)
	{
		double		c = (clients_cpu_ms(cls, nthreads) - ccpu0) * 1000.0 / rows;
		double		w = (proc_cpu_ms(worker_pid) - wcpu0) * 1000.0 / rows;
		double		s = (proc_cpu_ms(nats_pid) - ncpu0) * 1000.0 / rows;

		fig_add(&cpu->clients, c);
		fig_add(&cpu->worker, w);
		fig_add(&cpu->nats, s);
		fig_add(&cpu->total, c + w + s);
	}
	if (rate)
		fig_add(rate, rows / ((t1 - t0) / 1e6));
	if (client_rate)
		fig_add(client_rate, rows / ((tc - t0) / 1e6));
}

/* nthreads clients of plain INSERTs: rows/s, and their backends' CPU per 1,000 rows. */
static void
round_insert(Client *cls, int nthreads, int n, Fig *rate, Fig *cpu_per_k)
{
	double		rows = (double) nthreads * n;
	double		cpu0 = clients_cpu_ms(cls, nthreads);
	double		t0 = run_clients(cls, nthreads, SQL_INSERT, n, 0, "plain", false);
	double		t1 = 0;

	for (int t = 0; t < nthreads; t++)
		t1 = cls[t].t_done > t1 ? cls[t].t_done : t1;
	if (rate)
		fig_add(rate, rows / ((t1 - t0) / 1e6));
	if (cpu_per_k && cpu0 >= 0)
		fig_add(cpu_per_k, (clients_cpu_ms(cls, nthreads) - cpu0) * 1000.0 / rows);
}

/*
 * round_drain
 *		Fill the outbox with n reports in one transaction (one statement), so
 *		the worker sees none of them before the commit; then time from the
 *		commit until all are published.  Returns the worker's CPU ms.
 */
static double
round_drain(PGconn *mon, int worker_pid, int n, Fig *rate, Fig *worker_cpu_per_k,
			Fig *nats_cpu_per_k)
{
	char		sn[32];
	const char *p[2] = {content, sn};
	PGresult   *r;
	int64_t		lo,
				hi;
	double		t0,
				t1,
				cpu0,
				cpu1,
				ncpu0,
				ncpu1;

	wait_outbox_idle(mon);
	snprintf(sn, sizeof(sn), "%d", n);
	r = pg_run(mon, "fill", 2, p);
	t0 = now_us();
	cpu0 = proc_cpu_ms(worker_pid);
	ncpu0 = proc_cpu_ms(nats_pid);
	lo = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
	hi = strtoll(PQgetvalue(r, 0, 1), NULL, 10);
	PQclear(r);
	t1 = wait_published(mon, lo, hi, n);
	cpu1 = proc_cpu_ms(worker_pid);
	ncpu1 = proc_cpu_ms(nats_pid);
	if (rate)
		fig_add(rate, n / ((t1 - t0) / 1e6));
	if (worker_cpu_per_k && cpu0 >= 0)
		fig_add(worker_cpu_per_k, (cpu1 - cpu0) * 1000.0 / n);
	if (nats_cpu_per_k && ncpu0 >= 0)
		fig_add(nats_cpu_per_k, (ncpu1 - ncpu0) * 1000.0 / n);
	return cpu1 - cpu0;
}

/*
 * The kernel's writeback during a lag round, sampled every 20 ms from
 * /proc/meminfo by a thread of its own: on a machine whose one disk holds
 * both nats-server's store (written without fsync) and PostgreSQL's WAL,
 * the kernel writes the dirty pages out in bursts, and every fsync waits
 * behind a burst, the claim's commit in the worker included.
 */
#define WB_MAX_SAMPLES	(20 * 60 * 50)	/* 20 minutes at one every 20 ms */
#define WB_BURST_KB		(16 * 1024)	/* "a burst": 16 MB or more under writeback */
#define WB_INTERVAL_US	20000		/* one sample every 20 ms */
#define TAIL_SHOWN		8			/* tail episodes printed per round */

typedef struct WbSample
{
	int64_t		wall;			/* us */
	int			kb;				/* Writeback: in /proc/meminfo */
} WbSample;

static struct
{
	pthread_t	thread;
	bool		stop;			/* __atomic: set by the main thread */
	bool		running;
	int			n;
	WbSample   *s;
}			wb;

static int
writeback_kb(void)
{
	FILE	   *f = fopen("/proc/meminfo", "r");
	char		line[128];
	int			kb = -1;

	if (f == NULL)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "Writeback: %d kB", &kb) == 1)
			break;
	fclose(f);
	return kb;
}

static void *
wb_main(void *arg)
{
	(void) arg;
	while (!__atomic_load_n(&wb.stop, __ATOMIC_RELAXED) && wb.n < WB_MAX_SAMPLES)
	{
		int			kb = writeback_kb();

		if (kb < 0)
			break;
		wb.s[wb.n].wall = wall_us();
		wb.s[wb.n].kb = kb;
		wb.n++;
		usleep(WB_INTERVAL_US);
	}
	return NULL;
}

/* Start sampling (a no-op where /proc/meminfo cannot be read). */
static void
wb_start(void)
{
	wb.n = 0;
	wb.stop = false;
	wb.running = false;
	if (writeback_kb() < 0)
		return;
	if (wb.s == NULL)
		wb.s = malloc(sizeof(WbSample) * WB_MAX_SAMPLES);
	if (wb.s == NULL)
		return;
	wb.running = pthread_create(&wb.thread, NULL, wb_main, NULL) == 0;
}

static void
wb_stop(void)
{
	if (!wb.running)
		return;
	__atomic_store_n(&wb.stop, true, __ATOMIC_RELAXED);
	pthread_join(wb.thread, NULL);
	wb.running = false;
}

/* The most kB under writeback sampled in [from, to] (wall us); -1: no samples. */
static int
wb_max(int64_t from, int64_t to)
{
	int			max = -1;

	for (int i = 0; i < wb.n; i++)
		if (wb.s[i].wall >= from && wb.s[i].wall <= to && wb.s[i].kb > max)
			max = wb.s[i].kb;
	return max;
}

/* The times of one report in the lag phase, wall clock in us */
typedef struct LagTimes
{
	int64_t		id;				/* the outbox row */
	int64_t		commit;			/* the client's commit returned */
	int64_t		sent;			/* first_sent_at: the claim's start */
	int64_t		acked;			/* published_at: the record's start */
	int64_t		recorded;		/* the record's commit timestamp */
	int64_t		stored;			/* the JetStream message's time (set by lag_tail for
								 * the episodes it prints) */
} LagTimes;

static int
cmp_lag_commit(const void *a, const void *b)
{
	int64_t		x = ((const LagTimes *) a)->commit;
	int64_t		y = ((const LagTimes *) b)->commit;

	return (x > y) - (x < y);
}

/* The JetStream time of outbox row id's message (wall us), or fallback. */
static int64_t
stored_at(PGconn *mon, int64_t id, int64_t fallback)
{
	char		sid[32];
	const char *p[1] = {sid};
	PGresult   *r;
	int64_t		t = fallback;

	snprintf(sid, sizeof(sid), "%" PRId64, id);
	r = pg_run(mon, "stored_at", 1, p);
	if (PQntuples(r) == 1 && !PQgetisnull(r, 0, 0))
		t = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
	PQclear(r);
	return t;
}

/*
 * lag_tail
 *		Where the slowest 1 % of a lag round spent their time, on stderr:
 *		the reports whose lag is at or over the round's p99, grouped into
 *		episodes (commits less than 200 ms apart), each with its wall time
 *		(to set beside the PostgreSQL log's autovacuum and checkpoint lines)
 *		and the mean of the lag's parts: commit to claim (the worker had
 *		not come to the report yet), claim to stored (the claim's commit,
 *		its WAL flush, and the send; "stored" is the time nats-server gave
 *		the message), stored to PubAck (the acks of the batch in), PubAck to
 *		the record's commit; and the most the kernel had under writeback.
 *		p99 is the round's, in ms.  Sorts t by commit.
 */
static void
lag_tail(PGconn *mon, LagTimes *t, int n, double p99)
{
	int			shown = 0;

	qsort(t, n, sizeof(LagTimes), cmp_lag_commit);
	for (int i = 0; i < n;)
	{
		bool		show = shown < TAIL_SHOWN;
		int			m = 0;
		double		wait = 0,
					send = 0,
					ack = 0,
					record = 0,
					worst = 0;
		int64_t		start = 0,
					last = 0;
		int			j;

		for (j = i; j < n; j++)
		{
			double		l = (t[j].recorded - t[j].commit) / 1000.0;

			if (l < p99)
				continue;
			if (m > 0 && t[j].commit - last > 200000)
				break;
			if (m == 0)
				start = t[j].commit;
			last = t[j].commit;
			m++;
			worst = l > worst ? l : worst;
			if (!show)
				continue;		/* counted, not printed: no look-up */
			t[j].stored = stored_at(mon, t[j].id, t[j].acked);
			wait += (t[j].sent - t[j].commit) / 1000.0;
			send += (t[j].stored - t[j].sent) / 1000.0;
			ack += (t[j].acked - t[j].stored) / 1000.0;
			record += (t[j].recorded - t[j].acked) / 1000.0;
		}
		if (m == 0)
			break;
		shown++;
		if (show)
		{
			time_t		secs = (time_t) (start / 1000000);
			struct tm	tm;
			char		hms[16];
			char		wbs[48];
			int			kb = wb_max(start - WB_INTERVAL_US, last + (int64_t) (worst * 1000));

			gmtime_r(&secs, &tm);
			strftime(hms, sizeof(hms), "%H:%M:%S", &tm);
			if (kb < 0)
				snprintf(wbs, sizeof(wbs), "not sampled");
			else
				snprintf(wbs, sizeof(wbs), "up to %.0f MB", kb / 1024.0);
			note("    lag tail at %s.%03d UTC: %d report(s) over %.0f ms, worst %.1f ms; "
				 "commit->claim %.1f, claim->stored %.1f, stored->PubAck %.1f, "
				 "PubAck->recorded %.1f ms (means); kernel writeback %s",
				 hms, (int) (start / 1000 % 1000), m, (last - start) / 1000.0, worst,
				 wait / m, send / m, ack / m, record / m, wbs);
		}
		i = j;
	}
	if (shown > TAIL_SHOWN)
		note("    (%d more tail episodes in this round)", shown - TAIL_SHOWN);
}

/*
 * round_lag
 *		4 clients paced at total_rate reports/s for about secs seconds; the
 *		lag of each report is measured from the client's wall clock after its
 *		commit returned to (a) the commit timestamp of the worker's
 *		transaction that recorded it published (track_commit_timestamp), and
 *		(b) its published_at (now() of that transaction, which starts once
 *		the PubAcks of the batch are in).
 */
static void
round_lag(PGconn *mon, Client *cls, int nthreads, double total_rate, double secs,
		  Fig *vis_p50, Fig *vis_p99, Fig *ack_p50, Fig *ack_p99, Fig *achieved,
		  Fig *quiet_p99, Fig *quiet_share)
{
	int			per = (int) (total_rate * secs / nthreads);
	double		interval = 1e6 * nthreads / total_rate;
	int64_t		lo,
				hi;
	double		t0,
				tc = 0;
	int			total;
	double	   *vis,
			   *ack;
	LagTimes   *tail;
	double		lag_p99;
	char		slo[32],
				shi[32];
	const char *p[2] = {slo, shi};
	PGresult   *r;
	int			k = 0;

	if (per < 10)
		per = 10;
	total = per * nthreads;
	wait_outbox_idle(mon);
	wb_start();
	t0 = run_clients(cls, nthreads, SQL_PUBLISH, per, interval, "lagbench", true);
	for (int t = 0; t < nthreads; t++)
		tc = cls[t].t_done > tc ? cls[t].t_done : tc;
	ids_range(cls, nthreads, &lo, &hi);
	wait_published(mon, lo, hi, total);
	wb_stop();
	if (achieved)
		fig_add(achieved, total / ((tc - t0) / 1e6));

	snprintf(slo, sizeof(slo), "%" PRId64, lo);
	snprintf(shi, sizeof(shi), "%" PRId64, hi);
	r = pg_run(mon, "lag_times", 2, p);
	vis = malloc(sizeof(double) * total);
	ack = malloc(sizeof(double) * total);
	tail = malloc(sizeof(LagTimes) * total);
	for (int t = 0; t < nthreads; t++)
		for (int i = 0; i < cls[t].n; i++)
		{
			int64_t		id = cls[t].ids[i];
			int			row = (int) (id - lo);

			/* rows come back ordered by id, one per id in [lo, hi] */
			if (row < 0 || row >= PQntuples(r) ||
				strtoll(PQgetvalue(r, row, 0), NULL, 10) != id)
			{
				/* ids of other sessions may sit in the range: search */
				row = -1;
				for (int j = 0; j < PQntuples(r); j++)
					if (strtoll(PQgetvalue(r, j, 0), NULL, 10) == id)
					{
						row = j;
						break;
					}
				if (row < 0)
					die("outbox row %" PRId64 " not found", id);
			}
			if (PQgetisnull(r, row, 2))
				die("no commit timestamp: is track_commit_timestamp on?");
			ack[k] = (strtoll(PQgetvalue(r, row, 1), NULL, 10) - cls[t].commit_wall[i]) / 1000.0;
			vis[k] = (strtoll(PQgetvalue(r, row, 2), NULL, 10) - cls[t].commit_wall[i]) / 1000.0;
			tail[k].id = id;
			tail[k].commit = cls[t].commit_wall[i];
			tail[k].sent = strtoll(PQgetvalue(r, row, 3), NULL, 10);
			tail[k].acked = strtoll(PQgetvalue(r, row, 1), NULL, 10);
			tail[k].recorded = strtoll(PQgetvalue(r, row, 2), NULL, 10);
			k++;
		}
	PQclear(r);
	lag_p99 = quantile(vis, k, 0.99);
	lag_tail(mon, tail, k, lag_p99);
	if (quiet_p99 != NULL && wb.n > 0)
	{
		/* the reports whose lag saw no writeback burst */
		double	   *quiet = malloc(sizeof(double) * k);
		int			q = 0;

		for (int i = 0; i < k; i++)
			if (wb_max(tail[i].commit - WB_INTERVAL_US, tail[i].recorded) < WB_BURST_KB)
				quiet[q++] = (tail[i].recorded - tail[i].commit) / 1000.0;
		if (q > 0)
			fig_add(quiet_p99, quantile(quiet, q, 0.99));
		if (quiet_share != NULL)
			fig_add(quiet_share, 100.0 * (k - q) / k);
		free(quiet);
	}
	free(tail);
	fig_add(vis_p99, lag_p99);
	fig_add(vis_p50, quantile(vis, k, 0.5));
	fig_add(ack_p99, quantile(ack, k, 0.99));
	fig_add(ack_p50, quantile(ack, k, 0.5));
	free(vis);
	free(ack);
}

/* ----------------------------------------------------------------
 * Workflow hand-off: completion commit to the next stage's dispatch
 * ----------------------------------------------------------------
 */
#define HANDOFF_PIPELINE	"bench_handoff"
#define HANDOFF_WAIT_MS		5000	/* per notification */
#define HANDOFF_BUDGET_S	45		/* no new round after this */

static int	handoff_timeouts;

/*
 * handoff_setup
 *		The two-stage pipeline (cynthia, then sylvia; no backoff), the
 *		statements of the phase on c and mon, and lis listening on both
 *		agents' channels.
 */
static void
handoff_setup(PGconn *c, PGconn *mon, PGconn *lis)
{
	pg_cmd(mon, "SELECT agog_define_pipeline('" HANDOFF_PIPELINE "', '["
		   "{\"stage\": \"first\", \"agent\": \"cynthia\", \"retry_backoff\": \"0 seconds\"},"
		   "{\"stage\": \"second\", \"agent\": \"sylvia\", \"depends_on\": [\"first\"],"
		   " \"retry_backoff\": \"0 seconds\"}]', 'agog_bench: workflow hand-off')");
	pg_prepare(c, "hf_start",
			   "SELECT agog_start_workflow($1, '" HANDOFF_PIPELINE "')", 1);
	pg_prepare(c, "hf_ids",
			   "SELECT (SELECT id FROM agog_nats.tasks WHERE workflow_id = $1 AND stage = 'first'), "
			   "(SELECT id FROM agog_nats.tasks WHERE workflow_id = $1 AND stage = 'second')", 1);
	pg_prepare(c, "hf_claim",
			   "SELECT task_id, feature, notice ->> 'taskType' FROM agog_claim_task('cynthia', 'agog_bench')", 0);
	pg_prepare(c, "hf_complete", "SELECT agog_complete_task($1, $2::jsonb)", 2);
	/* stage 2's dispatched_at and dispatch commit, stage 1's completion commit */
	pg_prepare(mon, "hf_times",
			   "SELECT (extract(epoch FROM t.dispatched_at) * 1000000)::bigint, "
			   "(extract(epoch FROM pg_xact_commit_timestamp(t.xmin)) * 1000000)::bigint, "
			   "(extract(epoch FROM pg_xact_commit_timestamp(n.xmin)) * 1000000)::bigint "
			   "FROM agog_nats.tasks t, agog_nats.notices n "
			   "WHERE t.id = $1 AND t.state = 'dispatched' AND n.task_id = $2", 2);
	pg_cmd(lis, "LISTEN agog_task_cynthia");
	pg_cmd(lis, "LISTEN agog_task_sylvia");
}

/*
 * wait_notify
 *		Wait (at most timeout_ms) for the notification channel/payload on lis;
 *		others are dropped.  Returns the monotonic time (us) at which poll()
 *		returned for the read that brought it; -1 on timeout.
 */
static double
wait_notify(PGconn *lis, const char *channel, const char *payload, double timeout_ms)
{
	double		deadline = now_us() + timeout_ms * 1000;
	double		t_read = now_us();

	for (;;)
	{
		PGnotify   *n;
		struct pollfd pfd;
		double		left;
		int			rc;

		while ((n = PQnotifies(lis)) != NULL)
		{
			bool		hit = strcmp(n->relname, channel) == 0 && strcmp(n->extra, payload) == 0;

			PQfreemem(n);
			if (hit)
				return t_read;
		}
		left = deadline - now_us();
		if (left <= 0)
			return -1;
		pfd.fd = PQsocket(lis);
		pfd.events = POLLIN;
		pfd.revents = 0;
		rc = poll(&pfd, 1, (int) (left / 1000) + 1);
		if (rc < 0 && errno != EINTR)
			die("poll on the LISTEN connection: %s", strerror(errno));
		t_read = now_us();
		if (rc > 0 && !PQconsumeInput(lis))
			die("LISTEN connection: %s", PQerrorMessage(lis));
	}
}

/*
 * round_handoff
 *		n workflows of the two-stage pipeline, one at a time: start one, wait
 *		for stage 1's NOTIFY, claim it, publish its report and complete it in
 *		one transaction, and wait on lis for stage 2's NOTIFY.  The hand-off
 *		is that NOTIFY's arrival minus the client's clock right after COMMIT
 *		returned; the cross-checks use the server's clocks: stage 2's
 *		dispatched_at, and the commit timestamps of the dispatching and the
 *		completing transactions.  Workflows are cancelled at the end.
 */
static void
round_handoff(PGconn *c, PGconn *mon, PGconn *lis, int n, const char *tag,
			  Fig *p50, Fig *p99, Fig *disp50, Fig *disp99, Fig *dcommit50, Fig *dcommit99)
{
	double	   *lat = malloc(sizeof(double) * n);
	double	   *disp = malloc(sizeof(double) * n);
	double	   *dcom = malloc(sizeof(double) * n);
	int			k = 0;

	wait_outbox_idle(mon);
	for (int i = 0; i < n; i++)
	{
		char		feature[64],
					wf[32],
					id1[32],
					id2[32],
					notice[1024];
		char	   *tt;
		const char *p1[1] = {feature};
		const char *pw[1] = {wf};
		const char *pt[2] = {id2, id1};
		const char *pc[2] = {id1, notice};
		const char *pp[5] = {"cynthia", NULL, feature, content, metadata_json};
		PGresult   *r;
		double		t_commit,
					t_recv;

		snprintf(feature, sizeof(feature), "handoff-%s-%d", tag, i);
		r = pg_run(c, "hf_start", 1, p1);
		snprintf(wf, sizeof(wf), "%s", PQgetvalue(r, 0, 0));
		PQclear(r);
		r = pg_run(c, "hf_ids", 1, pw);
		snprintf(id1, sizeof(id1), "%s", PQgetvalue(r, 0, 0));
		snprintf(id2, sizeof(id2), "%s", PQgetvalue(r, 0, 1));
		PQclear(r);

		/* stage 1 dispatched: claim it */
		if (wait_notify(lis, "agog_task_cynthia", id1, HANDOFF_WAIT_MS) < 0)
		{
			note("  hand-off: stage 1 of workflow %s not dispatched within %d ms; skipped",
				 wf, HANDOFF_WAIT_MS);
			handoff_timeouts++;
			continue;
		}
		r = pg_run(c, "hf_claim", 0, NULL);
		if (PQntuples(r) != 1 || strcmp(PQgetvalue(r, 0, 0), id1) != 0)
			die("agog_claim_task('cynthia') did not return task %s of workflow %s", id1, wf);
		tt = strdup(PQgetvalue(r, 0, 2));
		PQclear(r);

		/* the report and the completion notice, in one transaction */
		snprintf(notice, sizeof(notice),
				 "{\"status\": \"complete\", \"agent\": \"cynthia\", \"task\": \"%s\", "
				 "\"nats_channel\": \"agog.deliverables.cynthia.%s.%s\", "
				 "\"summary\": \"research done\", \"complexity\": \"Medium\", "
				 "\"blockers\": \"None\", \"ready_for_next_stage\": true, "
				 "\"completion_time\": \"2026-01-01T00:00:00.000Z\", \"files_modified\": 2, "
				 "\"metadata\": {\"by\": \"agog_bench\"}}", feature, tt, feature);
		pp[1] = tt;
		pg_cmd(c, "BEGIN");
		PQclear(pg_run(c, "publish", 5, pp));
		r = pg_run(c, "hf_complete", 2, pc);
		if (strcmp(PQgetvalue(r, 0, 0), "advanced") != 0)
			die("agog_complete_task(%s) returned %s", id1, PQgetvalue(r, 0, 0));
		PQclear(r);
		pg_cmd(c, "COMMIT");
		t_commit = now_us();
		free(tt);

		/* stage 2 dispatched: the hand-off */
		t_recv = wait_notify(lis, "agog_task_sylvia", id2, HANDOFF_WAIT_MS);
		if (t_recv < 0)
		{
			note("  hand-off: stage 2 of workflow %s not dispatched within %d ms of the completion; skipped",
				 wf, HANDOFF_WAIT_MS);
			handoff_timeouts++;
			continue;
		}
		r = pg_run(mon, "hf_times", 2, pt);
		if (PQntuples(r) != 1 || PQgetisnull(r, 0, 1) || PQgetisnull(r, 0, 2))
			die("no dispatch or commit timestamps for task %s (is track_commit_timestamp on?)", id2);
		lat[k] = (t_recv - t_commit) / 1000.0;
		disp[k] = (strtoll(PQgetvalue(r, 0, 0), NULL, 10) - strtoll(PQgetvalue(r, 0, 2), NULL, 10)) / 1000.0;
		dcom[k] = (strtoll(PQgetvalue(r, 0, 1), NULL, 10) - strtoll(PQgetvalue(r, 0, 2), NULL, 10)) / 1000.0;
		k++;
		PQclear(r);
	}
	pg_cmd(mon, "SELECT count(agog_cancel_workflow(id, 'agog_bench: hand-off measured')) "
		   "FROM agog_nats.workflows WHERE pipeline = '" HANDOFF_PIPELINE "' AND state = 'running'");
	if (k > 0)
	{
		if (p99)
			fig_add(p99, quantile(lat, k, 0.99));
		if (p50)
			fig_add(p50, quantile(lat, k, 0.5));
		if (disp99)
			fig_add(disp99, quantile(disp, k, 0.99));
		if (disp50)
			fig_add(disp50, quantile(disp, k, 0.5));
		if (dcommit99)
			fig_add(dcommit99, quantile(dcom, k, 0.99));
		if (dcommit50)
			fig_add(dcommit50, quantile(dcom, k, 0.5));
	}
	free(lat);
	free(disp);
	free(dcom);
}

/* ----------------------------------------------------------------
 * Memory
 * ----------------------------------------------------------------
 */
typedef struct MemSample
{
	double		contexts;		/* PostgreSQL memory contexts, bytes; -1 unknown */
	double		rss;			/* VmRSS */
	double		rss_anon;		/* RssAnon: private memory (malloc, palloc) */
} MemSample;

static MemSample
backend_memory(PGconn *c, int pid)
{
	MemSample	m;

	m.contexts = (double) pg_int(c, "SELECT sum(total_bytes)::bigint FROM pg_backend_memory_contexts");
	m.rss = proc_status_kb(pid, "VmRSS");
	m.rss_anon = proc_status_kb(pid, "RssAnon");
	return m;
}

/*
 * worker_contexts
 *		The worker's memory contexts' grand total, read from the server log
 *		after pg_log_backend_memory_contexts(); -1 when it cannot be read.
 */
static double
worker_contexts(PGconn *mon, int pid)
{
	FILE	   *f;
	long		start;
	char		sql[128];
	double		deadline;

	if (pglog_path == NULL || (f = fopen(pglog_path, "r")) == NULL)
		return -1;
	fseek(f, 0, SEEK_END);
	start = ftell(f);
	snprintf(sql, sizeof(sql), "SELECT pg_log_backend_memory_contexts(%d)::int", pid);
	pg_int(mon, sql);
	deadline = now_us() + 5e6;
	while (now_us() < deadline)
	{
		char		line[4096];
		char		tag[64];

		snprintf(tag, sizeof(tag), "[%d]", pid);
		fseek(f, start, SEEK_SET);
		while (fgets(line, sizeof(line), f))
		{
			char	   *g = strstr(line, "Grand total: ");

			if (g != NULL && strstr(line, tag) != NULL)
			{
				fclose(f);
				return strtod(g + 13, NULL);
			}
		}
		clearerr(f);
		sleep_us(20000);
	}
	fclose(f);
	return -1;
}

static MemSample
worker_memory(PGconn *mon, int pid)
{
	MemSample	m;

	m.contexts = worker_contexts(mon, pid);
	m.rss = proc_status_kb(pid, "VmRSS");
	m.rss_anon = proc_status_kb(pid, "RssAnon");
	return m;
}

/* ----------------------------------------------------------------
 * The table
 * ----------------------------------------------------------------
 */
static int	met_count,
			missed_count;

/* The 1-minute load average, as text. */
static void
loadavg(char *buf, size_t len)
{
	FILE	   *f = fopen("/proc/loadavg", "r");

	buf[0] = '\0';
	if (f != NULL)
	{
		if (fscanf(f, "%31s", buf) != 1)
			buf[0] = '\0';
		fclose(f);
	}
	if (len > 0 && buf[0] == '\0')
		strncpy(buf, "?", len);
}

static void
fmt_fig(char *buf, size_t len, const Fig *f, const char *unit, int decimals)
{
	snprintf(buf, len, "%.*f %s (%.*f..%.*f)", decimals, fig_med(f), unit,
			 decimals, fig_min(f), decimals, fig_max(f));
}

static void
row(const char *path, const char *measured, const char *baseline,
	const char *ratio, const char *target, const char *verdict)
{
	printf("| %s | %s | %s | %s | %s | %s |\n", path, measured, baseline, ratio,
		   target, verdict);
}

/*
 * The raw publishing rows of one set of subjects: sync rate, async rate
 * (against sync) and nats-server's CPU for the async publishes.
 */
static void
raw_publish_rows(const char *where, const char *async_count, Fig *sync, Fig *async, Fig *ncpu)
{
	char		m[160],
				label[200],
				r[64];

	fmt_fig(m, sizeof(m), sync, "msgs/s", 0);
	snprintf(label, sizeof(label), "raw nats.c `js_Publish` (sync)%s, rate", where);
	row(label, m, "", "", "", "baseline");
	fmt_fig(m, sizeof(m), async, "msgs/s", 0);
	snprintf(r, sizeof(r), "%.2fx sync", fig_med(async) / fig_med(sync));
	snprintf(label, sizeof(label), "raw nats.c `js_PublishAsync`%s%s, rate", async_count, where);
	row(label, m, "", r, "", "baseline");
	if (ncpu->n > 0)
	{
		fmt_fig(m, sizeof(m), ncpu, "CPU ms", 0);
		row("(nats-server CPU per 1,000 of those raw async publishes)", m, "", "", "", "info");
	}
}

static const char *
verdict(bool met)
{
	if (met)
		met_count++;
	else
		missed_count++;
	return met ? "met" : "**missed**";
}

/*
 * A per-call latency row: the figure, its baseline (named by base_text, of
 * base ms) and their ratio; target "" with limit 0 makes it an info row.
 */
static void
latency_row(const char *label, const Fig *f, const char *base_text, double base,
			const char *target, double limit)
{
	char		m[160],
				b[200],
				r[64];

	fmt_fig(m, sizeof(m), f, "ms", 3);
	snprintf(b, sizeof(b), "%s = %.3f ms", base_text, base);
	snprintf(r, sizeof(r), "%.2fx", fig_med(f) / base);
	row(label, m, b, r, target, limit > 0 ? verdict(fig_med(f) / base <= limit) : "info");
}

static void
print_mem_row(const char *path, MemSample before, MemSample after, double ops,
			  const char *ops_what)
{
	char		m[256],
				b[256],
				r[64];
	double		g_ctx = after.contexts - before.contexts;
	double		g_anon = after.rss_anon - before.rss_anon;
	bool		ctx_known = before.contexts >= 0 && after.contexts >= 0;
	double		worst = ctx_known && g_ctx > g_anon ? g_ctx : g_anon;

	if (ctx_known)
		snprintf(m, sizeof(m), "contexts %+.0f KB, RssAnon %+.0f KB, VmRSS %+.0f KB after %.0f %s",
				 g_ctx / 1024, g_anon / 1024, (after.rss - before.rss) / 1024, ops, ops_what);
	else
		snprintf(m, sizeof(m), "RssAnon %+.0f KB, VmRSS %+.0f KB after %.0f %s",
				 g_anon / 1024, (after.rss - before.rss) / 1024, ops, ops_what);
	if (ctx_known)
		snprintf(b, sizeof(b), "before: contexts %.0f KB, RssAnon %.0f KB, VmRSS %.0f KB",
				 before.contexts / 1024, before.rss_anon / 1024, before.rss / 1024);
	else
		snprintf(b, sizeof(b), "before: RssAnon %.0f KB, VmRSS %.0f KB",
				 before.rss_anon / 1024, before.rss / 1024);
	snprintf(r, sizeof(r), "%+.2f MB", worst / MEMORY_TARGET);
	row(path, m, b, r, "growth <= 1 MB", verdict(worst <= MEMORY_TARGET));
}

/* ----------------------------------------------------------------
 * main
 * ----------------------------------------------------------------
 */
int
main(int argc, char **argv)
{
	PGconn	   *c;				/* the single-client connection */
	PGconn	   *mon;			/* monitor: polls, fills, samples */
	PGconn	   *memc;			/* the memory benchmark's backend */
	Client		cls[4];
	int			worker_pid;
	int			mem_pid;
	int64_t		published_before;
	int64_t		published_after;
	char	   *raw_body;
	int			raw_len;
	double		t_begin = now_us();
	const char *e;
	char		load_begin[32];

	/* figures */
	Fig			sync_rate = {0}, sync_p50 = {0}, async_rate = {0}, async_ncpu = {0};
	Fig			get_p50 = {0}, get_p99 = {0}, info_p50 = {0}, sel_p50 = {0};
	Fig			ins1 = {0}, ins4 = {0}, ins4_cpu = {0};
	CpuSplit	e2e4_cpu = {0};
	Fig			now_p50 = {0}, now_rate = {0}, carry_in_p50 = {0}, carry_out_p50 = {0};
	Fig			floor_pub_p50 = {0}, floor_get_p50 = {0};
	Fig			loop_pub_p50 = {0}, loop_get_p50 = {0};
	Fig			hand_get_p50 = {0};
	Fig			e2e1 = {0}, e2e4 = {0}, e2e1_client = {0}, e2e4_client = {0};
	Fig			drain_rate = {0}, drain_wcpu = {0}, drain_ncpu = {0};
	Fig			dsync_rate = {0}, dasync_rate = {0}, dasync_ncpu = {0};
	Fig			lag_vis50 = {0}, lag_vis99 = {0}, lag_ack50 = {0}, lag_ack99 = {0}, lag_rate = {0},
				lag_quiet99 = {0}, lag_burst_share = {0};
	Fig			fetch_p50 = {0}, fetch_p99 = {0}, status_p50 = {0};
	Fig			hget_p50 = {0}, hsel_p50 = {0}, hfetch_p50 = {0};
	int64_t		hist_rows = 0;
	Fig			ho_p50 = {0}, ho_p99 = {0}, ho_disp50 = {0}, ho_disp99 = {0},
				ho_dcom50 = {0}, ho_dcom99 = {0};
	int			ho_rounds = 0;
	MemSample	be_before, be_after, wk_before, wk_after;

	if (argc != 3)
	{
		fprintf(stderr, "usage: agog_bench NATS_URL CONNINFO\n");
		return 2;
	}
	nats_url = argv[1];
	conninfo = argv[2];
	if ((e = getenv("AGOG_BENCH_ROUNDS")) != NULL && atoi(e) > 0)
		rounds = atoi(e) > MAX_ROUNDS ? MAX_ROUNDS : atoi(e);
	if ((e = getenv("AGOG_BENCH_QUICK")) != NULL && strcmp(e, "1") == 0)
		scale_div = 10;
	pglog_path = getenv("AGOG_BENCH_PGLOG");
	if ((e = getenv("AGOG_BENCH_NATS_PID")) != NULL)
		nats_pid = atoi(e);
	setvbuf(stdout, NULL, _IOLBF, 0);
	loadavg(load_begin, sizeof(load_begin));

	make_content();
	raw_body = seed_json("roy", "backend", "rawbench", &raw_len);
	floor_body = raw_body;
	{
		int			ilen;

		insert_body = seed_json("roy", "backend", "plain", &ilen);
	}
	note("report: %zu bytes of markdown, %d bytes encoded; %d rounds per figure%s",
		 strlen(content), raw_len, rounds, scale_div > 1 ? " (QUICK: counts / 10)" : "");

	nats_setup();
	c = pg_open();
	mon = pg_open();
	memc = pg_open();
	pg_cmd(mon, "SET client_min_messages = warning");
	pg_cmd(mon, "DROP TABLE IF EXISTS bench_plain");
	pg_cmd(mon, "CREATE TABLE bench_plain (id bigserial PRIMARY KEY, subject text NOT NULL, "
		   "body text NOT NULL, created_at timestamptz NOT NULL DEFAULT now())");
	/* the report's content, stored as it is (no compression) for carry_out */
	pg_cmd(mon, "DROP TABLE IF EXISTS bench_carry");
	pg_cmd(mon, "CREATE TABLE bench_carry (content text NOT NULL)");
	pg_cmd(mon, "ALTER TABLE bench_carry ALTER content SET STORAGE EXTERNAL");
	{
		const char *p[1] = {content};
		PGresult   *r = PQexecParams(mon, "INSERT INTO bench_carry VALUES ($1)", 1, NULL, p,
									 NULL, NULL, 0);

		if (PQresultStatus(r) != PGRES_COMMAND_OK)
			die("INSERT INTO bench_carry: %s", PQerrorMessage(mon));
		PQclear(r);
	}
	prepare_all(c);
	prepare_all(mon);
	prepare_all(memc);
	pg_prepare(mon, "fill",
			   "SELECT min(id), max(id) FROM (SELECT agog_publish_report('roy', 'backend', "
			   "'drain' || (i % " STRINGIFY(DRAIN_SUBJECTS) "), $1, '{\"files_analyzed\": 15}'::jsonb) AS id "
			   "FROM generate_series(1, $2::int) i) s", 2);
	pg_prepare(mon, "lag_times",
			   "SELECT id, (extract(epoch FROM published_at) * 1000000)::bigint, "
			   "(extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1000000)::bigint, "
			   "(extract(epoch FROM first_sent_at) * 1000000)::bigint "
			   "FROM agog_nats.outbox WHERE id BETWEEN $1 AND $2 ORDER BY id", 2);
	pg_prepare(mon, "stored_at",
			   "SELECT (extract(epoch FROM f.published_at) * 1000000)::bigint "
			   "FROM agog_nats.outbox o, agog_fetch_report_by_seq(o.agent, o.seq) f "
			   "WHERE o.id = $1", 1);
	for (int i = 0; i < 4; i++)
	{
		memset(&cls[i], 0, sizeof(cls[i]));
		cls[i].conn = pg_open();
		prepare_all(cls[i].conn);
	}
	worker_pid = (int) pg_int(mon, "SELECT pid FROM agog_worker_status()");
	mem_pid = (int) pg_int(memc, "SELECT pg_backend_pid()");
	if (worker_pid <= 0)
		die("the agog_nats worker is not running");
	note("worker pid %d, memory backend pid %d", worker_pid, mem_pid);

	/* ---- fill the fetch stream: 10,000 reports on 1,000 subjects ---- */
	{
		jsPubOptions po;
		char		id[64];
		char		subj[128];
		char		feat[16];
		double		t0 = now_us();

		for (int i = 0; i < FETCH_MSGS; i++)
		{
			int			blen;
			char	   *b;

			snprintf(feat, sizeof(feat), "f%04d", i % FETCH_SUBJECTS);
			snprintf(subj, sizeof(subj), "agog.deliverables.cynthia.research.%s", feat);
			b = seed_json("cynthia", "research", feat, &blen);
			jsPubOptions_Init(&po);
			snprintf(id, sizeof(id), "bench-fill-%d-%d", (int) getpid(), i);
			po.MsgId = id;
			po.MaxWait = 10000;
			nats_check(js_PublishAsync(js, subj, b, blen, &po), "js_PublishAsync (fill)");
			free(b);
		}
		jsPubOptions_Init(&po);
		po.MaxWait = 60000;
		nats_check(js_PublishAsyncComplete(js, &po), "js_PublishAsyncComplete (fill)");
		{
			jsStreamInfo *si = NULL;
			jsErrCode	jerr = 0;

			nats_check(js_GetStreamInfo(&si, js, "agog_features_research", NULL, &jerr),
					   "js_GetStreamInfo");
			note("fetch stream filled in %.1f s: %" PRIu64 " messages on %d subjects",
				 (now_us() - t0) / 1e6, si->State.Msgs, FETCH_SUBJECTS);
			jsStreamInfo_Destroy(si);
		}
	}

	/* ---- warm-up of every path (not measured) ---- */
	note("warm-up");
	round_raw_sync(scaled(500), 0, raw_body, raw_len, NULL, NULL);
	round_raw_async(scaled(1000), 0, raw_body, raw_len, NULL, NULL);
	round_raw_get(scaled(500), false, false, NULL, NULL);
	round_raw_info(scaled(200), NULL);
	round_sql(c, SQL_SELECT1, scaled(500), NULL, NULL, NULL);
	round_sql(c, SQL_PUBLISH_NOW, scaled(300), NULL, NULL, NULL);
	round_sql(c, SQL_FETCH, scaled(300), NULL, NULL, NULL);
	round_sql(c, SQL_FLOOR_PUBLISH, scaled(300), NULL, NULL, NULL);
	round_sql(c, SQL_FLOOR_GET, scaled(300), NULL, NULL, NULL);
	round_sql(c, SQL_FLOOR_PUBLISH_LOOP, scaled(300), NULL, NULL, NULL);
	round_sql(c, SQL_FLOOR_GET_LOOP, scaled(300), NULL, NULL, NULL);
	round_sql(c, SQL_STATUS, scaled(100), NULL, NULL, NULL);
	round_insert(cls, 4, scaled(200), NULL, NULL);
	round_e2e(mon, cls, 4, scaled(200), worker_pid, NULL, NULL, NULL);
	round_drain(mon, worker_pid, scaled(2000), NULL, NULL, NULL);

	if (getenv("AGOG_BENCH_ONLY") != NULL)
	{
		const char *only = getenv("AGOG_BENCH_ONLY");
		double		secs = getenv("AGOG_BENCH_SECONDS") ? atof(getenv("AGOG_BENCH_SECONDS")) : 60;
		double		end;
		int			client_pid = (int) pg_int(c, "SELECT pg_backend_pid()");
		Fig			f1 = {0}, f2 = {0}, f3 = {0}, f4 = {0}, f5 = {0}, f6 = {0};
		CpuSplit	split = {0};

		note("profile: phase %s for %.0f s; single-client backend pid %d, worker pid %d, "
			 "4-client backend pids %d %d %d %d",
			 only, secs, client_pid, worker_pid,
			 PQbackendPID(cls[0].conn), PQbackendPID(cls[1].conn),
			 PQbackendPID(cls[2].conn), PQbackendPID(cls[3].conn));
		sleep_us(2e6);
		end = now_us() + secs * 1e6;
		while (now_us() < end)
		{
			double		base = NAN;

			if (strcmp(only, "select1") == 0)
				round_sql(c, SQL_SELECT1, 1000, &f1, NULL, NULL);
			else if (strcmp(only, "publish_now") == 0)
			{
				round_raw_sync(500, 0, raw_body, raw_len, NULL, &f3);
				round_sql(c, SQL_SELECT1, 500, &f4, NULL, NULL);
				round_sql(c, SQL_PUBLISH_NOW, 500, &f1, NULL, NULL);
				round_sql(c, SQL_FLOOR_PUBLISH, 500, &f5, NULL, NULL);
				round_sql(c, SQL_FLOOR_PUBLISH_LOOP, 500, &f6, NULL, NULL);
			}
			else if (strcmp(only, "fetch") == 0)
			{
				round_raw_get(1000, false, false, &f3, NULL);
				round_sql(c, SQL_SELECT1, 1000, &f4, NULL, NULL);
				round_sql(c, SQL_FETCH, 1000, &f1, NULL, NULL);
				round_sql(c, SQL_FLOOR_GET, 1000, &f5, NULL, NULL);
				round_sql(c, SQL_FLOOR_GET_LOOP, 1000, &f6, NULL, NULL);
			}
			else if (strcmp(only, "status") == 0)
			{
				round_raw_info(300, &f3);
				round_sql(c, SQL_SELECT1, 1000, &f4, NULL, NULL);
				round_sql(c, SQL_STATUS, 300, &f1, NULL, NULL);
			}
			else if (strcmp(only, "insert4") == 0)
				round_insert(cls, 4, 500, &f1, &f2);
			else if (strcmp(only, "e2e4") == 0)
				round_e2e(mon, cls, 4, 500, worker_pid, &f1, NULL, &split);
			else if (strcmp(only, "drain") == 0)
				round_drain(mon, worker_pid, 10000, &f1, &f2, &f3);
			else if (strcmp(only, "async") == 0)
				round_raw_async(10000, DRAIN_SUBJECTS, raw_body, raw_len, &f1, &f3);
			else if (strcmp(only, "lag") == 0)
				round_lag(mon, cls, 4, atof(getenv("AGOG_BENCH_LAG_RATE") ? getenv("AGOG_BENCH_LAG_RATE") : "400"),
						  3.0, &f1, &f2, &f3, &f4, &f5, NULL, NULL);
			else
				die("unknown AGOG_BENCH_ONLY phase \"%s\"", only);
			/* publish_now, fetch and status: their raw baseline + SELECT 1 */
			if (strcmp(only, "publish_now") == 0 || strcmp(only, "fetch") == 0 ||
				strcmp(only, "status") == 0)
				base = f3.v[f3.n - 1] + f4.v[f4.n - 1];
			if (strcmp(only, "insert4") == 0 && f2.n)
				note("  insert4: %.0f rows/s; CPU ms per 1,000: the clients' backends %.0f",
					 f1.v[f1.n - 1], f2.v[f2.n - 1]);
			else if (strcmp(only, "e2e4") == 0 && split.total.n)
				note("  e2e4: %.0f reports/s; CPU ms per 1,000: the clients' backends %.0f, "
					 "worker %.0f, nats-server %.0f, together %.0f",
					 f1.v[f1.n - 1], split.clients.v[split.clients.n - 1],
					 split.worker.v[split.worker.n - 1], split.nats.v[split.nats.n - 1],
					 split.total.v[split.total.n - 1]);
			else if (strcmp(only, "drain") == 0 || strcmp(only, "async") == 0)
				note("  %s: %.0f msgs/s; CPU ms per 1,000: worker %.0f, nats-server %.0f",
					 only, f1.v[f1.n - 1], f2.n ? f2.v[f2.n - 1] : NAN,
					 f3.n ? f3.v[f3.n - 1] : NAN);
			else if (strcmp(only, "publish_now") == 0 || strcmp(only, "fetch") == 0)
				note("  %s: %.3f (baseline %.3f, ratio %.2f; floor %.3f, ratio %.2f to the "
					 "baseline; %.2f to the floor)", only, f1.v[f1.n - 1], base,
					 f1.v[f1.n - 1] / base, f5.v[f5.n - 1], f5.v[f5.n - 1] / base,
					 f1.v[f1.n - 1] / f5.v[f5.n - 1]);
			if (f6.n)
				note("  thread-less floor %.3f, ratio %.2f to the baseline, %.2f to the floor",
					 f6.v[f6.n - 1], f6.v[f6.n - 1] / base, f6.v[f6.n - 1] / f5.v[f5.n - 1]);
			else
				note("  %s: %.3f (p99 / lag p99: %.3f; baseline %.3f, ratio %.2f)", only,
					 f1.v[f1.n - 1], f2.n ? f2.v[f2.n - 1] : NAN, base, f1.v[f1.n - 1] / base);
			if (f1.n >= (int) (sizeof(f1.v) / sizeof(f1.v[0])))
			{
				f1.n = f2.n = f3.n = f4.n = f5.n = f6.n = 0;
				split.clients.n = split.worker.n = split.nats.n = split.total.n = 0;
			}
		}
		return 0;
	}

	/* ---- memory: the worker's "before", after its warm-up ---- */
	wait_outbox_idle(mon);
	wk_before = worker_memory(mon, worker_pid);
	published_before = pg_int(mon, "SELECT reports_published FROM agog_outbox_stats()");

	/* ---- publish: raw sync, SELECT 1, publish_now, raw async ---- */
	note("publish: js_Publish, js_PublishAsync, SELECT 1, agog_publish_report_now");
	for (int r = 0; r < rounds; r++)
	{
		round_raw_sync(scaled(1000), 0, raw_body, raw_len, &sync_rate, &sync_p50);
		round_sql(c, SQL_SELECT1, scaled(1000), &sel_p50, NULL, NULL);
		round_sql(c, SQL_PUBLISH_NOW, scaled(500), &now_p50, NULL, &now_rate);
		round_sql(c, SQL_CARRY_IN, scaled(500), &carry_in_p50, NULL, NULL);
		round_sql(c, SQL_FLOOR_PUBLISH, scaled(500), &floor_pub_p50, NULL, NULL);
		round_sql(c, SQL_FLOOR_PUBLISH_LOOP, scaled(500), &loop_pub_p50, NULL, NULL);
		round_raw_async(scaled(2000), 0, raw_body, raw_len, &async_rate, &async_ncpu);
	}

	/* ---- fetch: raw direct get, SELECT 1, agog_fetch_report ---- */
	note("fetch: js_DirectGetMsg, SELECT 1, agog_fetch_report");
	for (int r = 0; r < rounds; r++)
	{
		round_raw_get(scaled(1000), false, false, &get_p50, &get_p99);
		round_raw_get(scaled(1000), false, true, &hand_get_p50, NULL);
		round_sql(c, SQL_SELECT1, scaled(1000), &sel_p50, NULL, NULL);
		round_sql(c, SQL_FETCH, scaled(1000), &fetch_p50, &fetch_p99, NULL);
		round_sql(c, SQL_CARRY_OUT, scaled(1000), &carry_out_p50, NULL, NULL);
		round_sql(c, SQL_FLOOR_GET, scaled(1000), &floor_get_p50, NULL, NULL);
		round_sql(c, SQL_FLOOR_GET_LOOP, scaled(1000), &loop_get_p50, NULL, NULL);
	}

	/* ---- status: raw stream info, SELECT 1, agog_stream_status ---- */
	note("status: js_GetStreamInfo, SELECT 1, agog_stream_status");
	for (int r = 0; r < rounds; r++)
	{
		round_raw_info(scaled(300), &info_p50);
		round_sql(c, SQL_SELECT1, scaled(1000), &sel_p50, NULL, NULL);
		round_sql(c, SQL_STATUS, scaled(300), &status_p50, NULL, NULL);
	}

	/* ---- transactional publish against plain INSERT, 1 and 4 clients ---- */
	note("agog_publish_report end to end and plain INSERT, 1 and 4 clients");
	for (int r = 0; r < rounds; r++)
	{
		round_insert(cls, 1, scaled(1000), &ins1, NULL);
		round_e2e(mon, cls, 1, scaled(1000), worker_pid, &e2e1, &e2e1_client, NULL);
		round_insert(cls, 4, scaled(500), &ins4, &ins4_cpu);
		round_e2e(mon, cls, 4, scaled(500), worker_pid, &e2e4, &e2e4_client, &e2e4_cpu);
	}

	/* ---- drain of a pre-filled outbox ---- */
	note("outbox drain of %d reports; raw sync and async publishes on its %d subjects",
		 scaled(10000), DRAIN_SUBJECTS);
	for (int r = 0; r < rounds; r++)
	{
		round_raw_sync(scaled(1000), DRAIN_SUBJECTS, raw_body, raw_len, &dsync_rate, NULL);
		round_raw_async(scaled(10000), DRAIN_SUBJECTS, raw_body, raw_len, &dasync_rate, &dasync_ncpu);
		round_drain(mon, worker_pid, scaled(10000), &drain_rate, &drain_wcpu, &drain_ncpu);
	}

	/*
	 * ---- fetch on subjects with a history in the outbox ----
	 * The drain's subjects now hold every report drained on them, published
	 * and kept in the outbox (agog_nats.published_retention): what a subject
	 * that agents publish to again and again looks like.
	 */
	hist_rows = pg_int(c, "SELECT count(*) FROM agog_nats.outbox WHERE feature LIKE 'drain%'");
	note("fetch on the drain's %d subjects, %" PRId64 " outbox rows on them",
		 DRAIN_SUBJECTS, hist_rows);
	for (int r = 0; r < rounds; r++)
	{
		round_raw_get(scaled(1000), true, false, &hget_p50, NULL);
		round_sql(c, SQL_SELECT1, scaled(1000), &hsel_p50, NULL, NULL);
		round_sql(c, SQL_FETCH_DRAIN, scaled(1000), &hfetch_p50, NULL, NULL);
	}

	/* ---- lag at half the sustainable rate ---- */
	{
		double		half = fig_med(&e2e4) / 2;

		note("commit-to-published lag at %.0f reports/s (half of the 4-client end-to-end rate)", half);
		for (int r = 0; r < rounds; r++)
			round_lag(mon, cls, 4, half, scale_div > 1 ? 1.0 : 3.0,
					  &lag_vis50, &lag_vis99, &lag_ack50, &lag_ack99, &lag_rate,
					  &lag_quiet99, &lag_burst_share);
	}

	/* ---- backend memory over 100,000 operations ---- */
	{
		int			ops = scaled(MEMORY_OPS);
		double		t0;

		note("backend memory: %d operations (publish_now, fetch, publish) on pid %d", ops, mem_pid);
		for (int i = 0; i < scaled(3000); i++)
			sql_call(memc, (SqlKind[]) {SQL_PUBLISH_NOW, SQL_FETCH, SQL_PUBLISH}[i % 3], i, "membench");
		wait_outbox_idle(mon);
		be_before = backend_memory(memc, mem_pid);
		t0 = now_us();
		for (int i = 0; i < ops; i++)
		{
			sql_call(memc, (SqlKind[]) {SQL_PUBLISH_NOW, SQL_FETCH, SQL_PUBLISH}[i % 3], i, "membench");
			if (i > 0 && i % 20000 == 0)
				note("  %d operations, %.0f s", i, (now_us() - t0) / 1e6);
		}
		be_after = backend_memory(memc, mem_pid);
		wait_outbox_idle(mon);
	}

	/* ---- worker memory: at least 100,000 reports drained since "before" ---- */
	for (;;)
	{
		int64_t		done = pg_int(mon, "SELECT reports_published FROM agog_outbox_stats()") - published_before;

		if (done >= scaled(MEMORY_OPS))
			break;
		note("worker memory: %" PRId64 " reports drained so far; filling %d more",
			 done, scaled(10000));
		round_drain(mon, worker_pid, scaled(10000), NULL, NULL, NULL);
	}
	wait_outbox_idle(mon);
	published_after = pg_int(mon, "SELECT reports_published FROM agog_outbox_stats()");
	wk_after = worker_memory(mon, worker_pid);

	/*
	 * ---- workflow hand-off: completion commit to the next dispatch ----
	 * Last, after the memory samples, so its workflows touch no other figure.
	 */
	{
		PGconn	   *lis = pg_open();
		double		t0 = now_us();

		note("workflow hand-off: %d workflows per round of a 2-stage pipeline, one at a time",
			 scaled(100));
		handoff_setup(c, mon, lis);
		round_handoff(c, mon, lis, scaled(10), "warm", NULL, NULL, NULL, NULL, NULL, NULL);
		for (int r = 0; r < rounds; r++)
		{
			char		tag[16];

			if (now_us() - t0 > HANDOFF_BUDGET_S * 1e6)
			{
				note("  hand-off: %d s budget spent; %d of %d rounds measured",
					 HANDOFF_BUDGET_S, ho_rounds, rounds);
				break;
			}
			snprintf(tag, sizeof(tag), "r%d", r);
			round_handoff(c, mon, lis, scaled(100), tag, &ho_p50, &ho_p99,
						  &ho_disp50, &ho_disp99, &ho_dcom50, &ho_dcom99);
			ho_rounds++;
		}
		note("  hand-off: %.1f s, %d notifications timed out", (now_us() - t0) / 1e6,
			 handoff_timeouts);
		PQfinish(lis);
	}

	/* ---- the table ---- */
	{
		char		m[256],
					b[256],
					r[64],
					t[64],
					label[160];
		double		sel = fig_med(&sel_p50);
		char		load_end[32];

		loadavg(load_end, sizeof(load_end));
		printf("\nagog_nats benchmarks: %d rounds per figure, median (min..max); "
			   "%d-byte seed-format reports; %.0f s in all; %ld CPUs, load average %s at the start, %s at the end\n\n",
			   rounds, raw_len, (now_us() - t_begin) / 1e6, sysconf(_SC_NPROCESSORS_ONLN),
			   load_begin, load_end);
		printf("| path | measured (median, min..max) | baseline (same run) | ratio | target | met/missed |\n");
		printf("|---|---|---|---|---|---|\n");

		raw_publish_rows("", "", &sync_rate, &async_rate, &async_ncpu);
		fmt_fig(m, sizeof(m), &sync_p50, "ms", 3);
		row("raw nats.c `js_Publish` (sync), p50 per call", m, "", "", "", "baseline");
		fmt_fig(m, sizeof(m), &get_p50, "ms", 3);
		row("raw nats.c `js_DirectGetMsg` last by subject, p50", m, "", "", "", "baseline");
		fmt_fig(m, sizeof(m), &get_p99, "ms", 3);
		row("raw nats.c `js_DirectGetMsg` last by subject, p99", m, "", "", "", "baseline");
		fmt_fig(m, sizeof(m), &info_p50, "ms", 3);
		row("raw nats.c `js_GetStreamInfo`, p50", m, "", "", "", "baseline");
		fmt_fig(m, sizeof(m), &sel_p50, "ms", 3);
		row("`SELECT 1` over libpq (prepared), p50", m, "", "", "", "baseline");
		fmt_fig(m, sizeof(m), &ins1, "rows/s", 0);
		row("plain INSERT of the report, synchronous commit, 1 client", m, "", "", "", "baseline");
		fmt_fig(m, sizeof(m), &ins4, "rows/s", 0);
		row("plain INSERT of the report, synchronous commit, 4 clients", m, "", "", "", "baseline");

		latency_row("`agog_publish_report_now`, 1 client, p50 per call", &now_p50,
					"sync publish p50 + SELECT 1 p50", fig_med(&sync_p50) + sel, "<= 1.1x", 1.1);
		fmt_fig(m, sizeof(m), &carry_in_p50, "ms", 3);
		row("(carry-in: a statement that only carries the same five arguments to the server, p50)",
			m, "", "", "", "info");
		latency_row("(`agog_publish_report_now` against sync publish + carry-in)", &now_p50,
					"sync publish p50 + carry-in p50", fig_med(&sync_p50) + fig_med(&carry_in_p50),
					"", 0);
		latency_row("(floor: a bare C function in the backend that `js_Publish`-es the encoded "
					"report it is given, p50)", &floor_pub_p50,
					"sync publish p50 + SELECT 1 p50", fig_med(&sync_p50) + sel, "", 0);
		latency_row("(`agog_publish_report_now` against the floor)", &now_p50,
					"floor p50", fig_med(&floor_pub_p50), "", 0);
		latency_row("(thread-less floor: the same publish by hand over a connection without "
					"nats.c's threads, the backend reading its socket itself, p50)", &loop_pub_p50,
					"sync publish p50 + SELECT 1 p50", fig_med(&sync_p50) + sel, "", 0);
		latency_row("(`agog_publish_report_now` against the thread-less floor)", &now_p50,
					"thread-less floor p50", fig_med(&loop_pub_p50), "", 0);

		fmt_fig(m, sizeof(m), &e2e1, "reports/s", 0);
		snprintf(b, sizeof(b), "plain INSERT, 1 client: %.0f rows/s", fig_med(&ins1));
		snprintf(r, sizeof(r), "%.2fx", fig_med(&e2e1) / fig_med(&ins1));
		row("`agog_publish_report` end to end (commit to PubAck recorded), 1 client", m, b, r, "", "info");
		fmt_fig(m, sizeof(m), &e2e4, "reports/s", 0);
		snprintf(b, sizeof(b), "plain INSERT, 4 clients: %.0f rows/s", fig_med(&ins4));
		snprintf(r, sizeof(r), "%.2fx", fig_med(&e2e4) / fig_med(&ins4));
		row("`agog_publish_report` end to end (commit to PubAck recorded), 4 clients", m, b, r,
			">= 0.9x", verdict(fig_med(&e2e4) / fig_med(&ins4) >= 0.9));
		fmt_fig(m, sizeof(m), &e2e4_client, "reports/s", 0);
		snprintf(r, sizeof(r), "%.2fx", fig_med(&e2e4_client) / fig_med(&ins4));
		row("(the same, commits only: rate at which the 4 clients' calls returned)", m, b, r, "", "info");
		if (ins4_cpu.n > 0 && e2e4_cpu.total.n > 0)
		{
			fmt_fig(m, sizeof(m), &ins4_cpu, "CPU ms", 0);
			row("(plain INSERT, 4 clients: their backends' CPU per 1,000 rows)", m, "", "", "", "info");
			fmt_fig(m, sizeof(m), &e2e4_cpu.clients, "CPU ms", 0);
			row("(end to end, 4 clients: the clients' backends' CPU per 1,000 reports)", m, "", "", "", "info");
			fmt_fig(m, sizeof(m), &e2e4_cpu.worker, "CPU ms", 0);
			row("(end to end, 4 clients: the worker's CPU per 1,000 reports)", m, "", "", "", "info");
			fmt_fig(m, sizeof(m), &e2e4_cpu.nats, "CPU ms", 0);
			row("(end to end, 4 clients: nats-server's CPU per 1,000 reports)", m, "", "", "", "info");
			fmt_fig(m, sizeof(m), &e2e4_cpu.total, "CPU ms", 0);
			snprintf(b, sizeof(b), "plain INSERT's backends: %.0f CPU ms per 1,000 rows", fig_med(&ins4_cpu));
			snprintf(r, sizeof(r), "%.2fx", fig_med(&e2e4_cpu.total) / fig_med(&ins4_cpu));
			row("(end to end, 4 clients: the three together, per 1,000 reports)", m, b, r, "", "info");
		}

		raw_publish_rows(" on the drain's 100 subjects", " of 10,000", &dsync_rate, &dasync_rate,
						 &dasync_ncpu);
		fmt_fig(m, sizeof(m), &drain_rate, "reports/s", 0);
		snprintf(b, sizeof(b), "raw sync publish on the same subjects: %.0f msgs/s", fig_med(&dsync_rate));
		snprintf(r, sizeof(r), "%.2fx", fig_med(&drain_rate) / fig_med(&dsync_rate));
		row("outbox drain of 10,000 pre-filled reports on 100 subjects (commit of the fill to all published)",
			m, b, r, ">= 1.5x", verdict(fig_med(&drain_rate) / fig_med(&dsync_rate) >= 1.5));
		snprintf(b, sizeof(b), "raw async publish on the same subjects: %.0f msgs/s", fig_med(&dasync_rate));
		snprintf(r, sizeof(r), "%.2fx", fig_med(&drain_rate) / fig_med(&dasync_rate));
		row("(the drain against raw async publishing on its subjects)", "", b, r, "", "info");
		snprintf(b, sizeof(b), "raw sync publish on one subject: %.0f msgs/s", fig_med(&sync_rate));
		snprintf(r, sizeof(r), "%.2fx", fig_med(&drain_rate) / fig_med(&sync_rate));
		row("(the drain against raw sync publishing on one subject)", "", b, r, "", "info");
		if (drain_wcpu.n > 0)
		{
			fmt_fig(m, sizeof(m), &drain_wcpu, "CPU ms", 0);
			row("(worker CPU per 1,000 reports drained)", m, "", "", "", "info");
		}
		if (drain_ncpu.n > 0)
		{
			fmt_fig(m, sizeof(m), &drain_ncpu, "CPU ms", 0);
			row("(nats-server CPU per 1,000 reports drained)", m, "", "", "", "info");
		}

		fmt_fig(m, sizeof(m), &lag_rate, "reports/s", 0);
		snprintf(b, sizeof(b), "half of %.0f reports/s", fig_med(&e2e4));
		row("lag test: offered load, 4 paced clients", m, b, "", "", "info");
		fmt_fig(m, sizeof(m), &lag_vis50, "ms", 2);
		row("commit-to-published lag at half load, p50 (client commit -> worker's record commit)",
			m, "", "", "", "info");
		fmt_fig(m, sizeof(m), &lag_vis99, "ms", 2);
		snprintf(t, sizeof(t), "<= 20 ms");
		row("commit-to-published lag at half load, p99 (client commit -> worker's record commit)",
			m, "", "", t, verdict(fig_med(&lag_vis99) <= 20.0));
		fmt_fig(m, sizeof(m), &lag_ack50, "ms", 2);
		row("(lag to `published_at`, the start of the record transaction after the PubAcks, p50)",
			m, "", "", "", "info");
		fmt_fig(m, sizeof(m), &lag_ack99, "ms", 2);
		row("(lag to `published_at`, p99)", m, "", "", "", "info");
		if (lag_quiet99.n > 0)
		{
			fmt_fig(m, sizeof(m), &lag_quiet99, "ms", 2);
			row("(lag p99 of the reports whose lag saw no kernel writeback burst of 16 MB or more)",
				m, "", "", "", "info");
			fmt_fig(m, sizeof(m), &lag_burst_share, "%", 1);
			row("(share of the reports whose lag saw such a burst)", m, "", "", "", "info");
		}

		latency_row("`agog_fetch_report`, p50 (10,000 msgs on 1,000 subjects)", &fetch_p50,
					"direct get p50 + SELECT 1 p50", fig_med(&get_p50) + sel, "<= 1.1x", 1.1);
		fmt_fig(m, sizeof(m), &carry_out_p50, "ms", 3);
		row("(carry-out: a statement that only returns the report's 20 KB content, stored "
			"uncompressed, p50)", m, "", "", "", "info");
		latency_row("(`agog_fetch_report` against direct get + carry-out)", &fetch_p50,
					"direct get p50 + carry-out p50", fig_med(&get_p50) + fig_med(&carry_out_p50),
					"", 0);
		latency_row("(floor: a bare C function in the backend that returns `js_DirectGetMsg`'s "
					"data as text, p50)", &floor_get_p50,
					"direct get p50 + SELECT 1 p50", fig_med(&get_p50) + sel, "", 0);
		latency_row("(`agog_fetch_report` against the floor)", &fetch_p50,
					"floor p50", fig_med(&floor_get_p50), "", 0);
		latency_row("(thread-less floor: the same direct get by hand over a connection without "
					"nats.c's threads, p50)", &loop_get_p50,
					"direct get p50 + SELECT 1 p50", fig_med(&get_p50) + sel, "", 0);
		latency_row("(`agog_fetch_report` against the thread-less floor)", &fetch_p50,
					"thread-less floor p50", fig_med(&loop_get_p50), "", 0);
		fmt_fig(m, sizeof(m), &hand_get_p50, "ms", 3);
		row("(raw nats.c direct get by hand, as the extension sends it: `natsConnection_PublishRequest`, "
			"reply from a synchronous subscription, p50)", m, "", "", "", "info");
		latency_row("(`agog_fetch_report` against direct get by hand + SELECT 1)", &fetch_p50,
					"direct get by hand p50 + SELECT 1 p50", fig_med(&hand_get_p50) + sel, "", 0);
		fmt_fig(m, sizeof(m), &fetch_p99, "ms", 3);
		snprintf(b, sizeof(b), "direct get p99: %.3f ms", fig_med(&get_p99));
		snprintf(r, sizeof(r), "%.2fx", fig_med(&fetch_p99) / fig_med(&get_p99));
		row("`agog_fetch_report`, p99", m, b, r, "", "info");
		snprintf(label, sizeof(label), "(`agog_fetch_report` on the drain's %d subjects, with their %"
				 PRId64 " published reports in the outbox, p50)", DRAIN_SUBJECTS, hist_rows);
		latency_row(label, &hfetch_p50, "direct get p50 on them + SELECT 1 p50 (same rounds)",
					fig_med(&hget_p50) + fig_med(&hsel_p50), "", 0);

		latency_row("`agog_stream_status()`, six streams, p50", &status_p50,
					"stream info p50 + SELECT 1 p50", fig_med(&info_p50) + sel, "<= 2x", 2.0);

		if (ho_p50.n > 0)
		{
			snprintf(b, sizeof(b), "%d rounds of %d workflows%s", ho_p50.n, scaled(100),
					 handoff_timeouts ? " (some timed out: see stderr)" : "");
			fmt_fig(m, sizeof(m), &ho_p50, "ms", 2);
			row("workflow hand-off, p50 (completion commit returned -> next stage's NOTIFY received)",
				m, b, "", "", "info");
			fmt_fig(m, sizeof(m), &ho_p99, "ms", 2);
			row("workflow hand-off, p99 (completion commit returned -> next stage's NOTIFY received)",
				m, b, "", "", "info");
			snprintf(m, sizeof(m), "`dispatched_at`: p50 %.2f ms, p99 %.2f ms; dispatch commit: p50 %.2f ms, p99 %.2f ms",
					 fig_med(&ho_disp50), fig_med(&ho_disp99), fig_med(&ho_dcom50), fig_med(&ho_dcom99));
			row("(hand-off on the server's clock, from the completion's commit timestamp)",
				m, "", "", "", "info");
		}

		print_mem_row("backend memory (publish_now + fetch + publish)", be_before, be_after,
					  scaled(MEMORY_OPS), "operations");
		print_mem_row("worker memory (outbox drain)", wk_before, wk_after,
					  (double) (published_after - published_before), "reports drained");

		printf("\n%d targets met, %d missed\n", met_count, missed_count);
	}

	for (int i = 0; i < 4; i++)
	{
		free(cls[i].ids);
		free(cls[i].commit_wall);
		PQfinish(cls[i].conn);
	}
	PQfinish(c);
	PQfinish(mon);
	PQfinish(memc);
	jsCtx_Destroy(js);
	natsConnection_Destroy(nc);
	nats_CloseAndWait(1000);
	free(raw_body);
	free(content);
	return 0;
}
