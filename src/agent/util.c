/*
 * util.c: logging, time, buffers and files for agog-agent.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"

int			verbosity = 1;
const char *log_agent = "";

static void
oom(void)
{
	static const char msg[] = "agog-agent: out of memory\n";

	if (write(2, msg, sizeof(msg) - 1) < 0)
	{
		/* nothing else to do */
	}
	exit(EXIT_RUNTIME);
}

void *
xmalloc(size_t n)
{
	void	   *p = malloc(n ? n : 1);

	if (!p)
		oom();
	return p;
}

char *
xstrdup(const char *s)
{
	char	   *p = strdup(s ? s : "");

	if (!p)
		oom();
	return p;
}

char *
xasprintf(const char *fmt,...)
{
	va_list		ap;
	char	   *p;

	va_start(ap, fmt);
	if (vasprintf(&p, fmt, ap) < 0)
		oom();
	va_end(ap);
	return p;
}

void
buf_append(Buf *b, const char *data, size_t len)
{
	if (b->len + len + 1 > b->cap)
	{
		size_t		cap = b->cap ? b->cap : 256;
		char	   *p;

		while (cap < b->len + len + 1)
			cap *= 2;
		p = realloc(b->data, cap);
		if (!p)
			oom();
		b->data = p;
		b->cap = cap;
	}
	if (len)
		memcpy(b->data + b->len, data, len);
	b->len += len;
	b->data[b->len] = '\0';
}

void
buf_printf(Buf *b, const char *fmt,...)
{
	va_list		ap;
	char	   *p;
	int			n;

	va_start(ap, fmt);
	n = vasprintf(&p, fmt, ap);
	va_end(ap);
	if (n < 0)
		oom();
	buf_append(b, p, (size_t) n);
	free(p);
}

void
buf_free(Buf *b)
{
	free(b->data);
	b->data = NULL;
	b->len = b->cap = 0;
}

static void
vlog(FILE *f, const char *kind, const char *fmt, va_list ap)
{
	char		ts[16];
	time_t		t = time(NULL);
	struct tm	tm;

	localtime_r(&t, &tm);
	strftime(ts, sizeof(ts), "%H:%M:%S", &tm);
	fprintf(f, "%s agog-agent[%s] %s", ts, log_agent, kind);
	vfprintf(f, fmt, ap);
	fputc('\n', f);
	fflush(f);
}

/* A line on stdout when verbosity >= level. */
void
log_line(int level, const char *fmt,...)
{
	va_list		ap;

	if (verbosity < level)
		return;
	va_start(ap, fmt);
	vlog(stdout, "", fmt, ap);
	va_end(ap);
}

void
log_warn(const char *fmt,...)
{
	va_list		ap;

	va_start(ap, fmt);
	vlog(stderr, "warning: ", fmt, ap);
	va_end(ap);
}

void
log_error(const char *fmt,...)
{
	va_list		ap;

	va_start(ap, fmt);
	vlog(stderr, "error: ", fmt, ap);
	va_end(ap);
}

double
now_mono(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

/* The subject token rule of agog_nats: [A-Za-z0-9_-]{1,64}. */
bool
valid_token(const char *s)
{
	size_t		n = 0;

	if (!s || !*s)
		return false;
	for (; *s; s++, n++)
	{
		char		c = *s;

		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
			  (c >= '0' && c <= '9') || c == '_' || c == '-'))
			return false;
	}
	return n <= 64;
}

/* Write a whole file, mode 0600; 0 or -1 with errno. */
int
write_file(const char *path, const char *data, size_t len)
{
	int			fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	size_t		off = 0;

	if (fd < 0)
		return -1;
	while (off < len)
	{
		ssize_t		n = write(fd, data + off, len - off);

		if (n < 0)
		{
			int			e = errno;

			if (e == EINTR)
				continue;
			close(fd);
			errno = e;
			return -1;
		}
		off += (size_t) n;
	}
	return close(fd);
}

/*
 * Read a file into out (replacing its contents).  Returns 0, or -1 with
 * errno (ENOENT for a missing file, EINVAL for one that is not a regular
 * file: a FIFO the command left there would block the runner for good, so
 * it is opened without waiting and refused).  A file over max bytes sets
 * *too_big and is not read.
 */
int
read_file(const char *path, size_t max, Buf *out, bool *too_big)
{
	int			fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
	struct stat st;
	char		chunk[65536];

	out->len = 0;
	if (too_big)
		*too_big = false;
	if (fd < 0)
		return -1;
	if (fstat(fd, &st) != 0)
	{
		int			e = errno;

		close(fd);
		errno = e;
		return -1;
	}
	if (!S_ISREG(st.st_mode))
	{
		close(fd);
		errno = EINVAL;
		return -1;
	}
	if ((size_t) st.st_size > max)
	{
		close(fd);
		if (too_big)
			*too_big = true;
		return 0;
	}
	buf_append(out, "", 0);
	for (;;)
	{
		ssize_t		n = read(fd, chunk, sizeof(chunk));

		if (n < 0)
		{
			int			e = errno;

			if (e == EINTR)
				continue;
			close(fd);
			errno = e;
			return -1;
		}
		if (n == 0)
			break;
		buf_append(out, chunk, (size_t) n);
		if (out->len > max)
		{
			if (too_big)
				*too_big = true;
			break;
		}
	}
	close(fd);
	return 0;
}

static int
rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
	(void) sb;
	(void) ftw;
	if (flag == FTW_DP || flag == FTW_D)
		rmdir(path);
	else
		unlink(path);
	return 0;
}

/* rm -rf path (never follows symbolic links). */
int
remove_tree(const char *path)
{
	if (!path || !*path)
		return 0;
	return nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/*
 * Make text safe to send as a notice field: drop NUL bytes, replace bytes
 * that are not valid UTF-8 and control characters other than newline and
 * tab with '?', and drop a partial character at the start (a tail cut in
 * the middle of a character).
 */
void
sanitize_text(char *s, size_t *len)
{
	size_t		i = 0,
				o = 0,
				n = *len;

	while (i < n && ((unsigned char) s[i] & 0xC0) == 0x80)
		i++;
	while (i < n)
	{
		unsigned char c = (unsigned char) s[i];
		size_t		k = 0;

		if (c == 0)
		{
			i++;
			continue;
		}
		if (c < 0x80)
		{
			s[o++] = (c < 0x20 && c != '\n' && c != '\t') || c == 0x7F ? '?' : (char) c;
			i++;
			continue;
		}
		if ((c & 0xE0) == 0xC0 && c >= 0xC2)
			k = 1;
		else if ((c & 0xF0) == 0xE0)
			k = 2;
		else if ((c & 0xF8) == 0xF0 && c <= 0xF4)
			k = 3;
		if (k)
		{
			size_t		m;
			bool		ok = i + k < n;

			for (m = 1; ok && m <= k; m++)
				if (((unsigned char) s[i + m] & 0xC0) != 0x80)
					ok = false;
			/* overlong 3- and 4-byte forms, surrogates, over U+10FFFF */
			if (ok && k == 2 && c == 0xE0 && (unsigned char) s[i + 1] < 0xA0)
				ok = false;
			if (ok && k == 2 && c == 0xED && (unsigned char) s[i + 1] >= 0xA0)
				ok = false;
			if (ok && k == 3 && c == 0xF0 && (unsigned char) s[i + 1] < 0x90)
				ok = false;
			if (ok && k == 3 && c == 0xF4 && (unsigned char) s[i + 1] >= 0x90)
				ok = false;
			if (ok)
			{
				memmove(s + o, s + i, k + 1);
				o += k + 1;
				i += k + 1;
				continue;
			}
		}
		s[o++] = '?';
		i++;
	}
	s[o] = '\0';
	*len = o;
}

/* Turn newlines and tabs into spaces (for one-line log output). */
void
one_line(char *s)
{
	for (; *s; s++)
		if (*s == '\n' || *s == '\r' || *s == '\t')
			*s = ' ';
}

/*
 * The path execvp would run for name (searched in PATH when it has no
 * slash), or NULL when there is no such executable file.
 */
char *
resolve_command(const char *name)
{
	const char *path;
	const char *p;
	struct stat st;

	if (!name || !*name)
		return NULL;
	if (strchr(name, '/'))
	{
		if (stat(name, &st) == 0 && S_ISREG(st.st_mode) && access(name, X_OK) == 0)
			return xstrdup(name);
		return NULL;
	}
	path = getenv("PATH");
	if (!path || !*path)
		path = "/usr/local/bin:/usr/bin:/bin";
	for (p = path;;)
	{
		const char *colon = strchr(p, ':');
		size_t		dl = colon ? (size_t) (colon - p) : strlen(p);
		char	   *cand = xasprintf("%.*s/%s", (int) dl, dl ? p : ".", name);

		if (dl == 0)
		{
			free(cand);
			cand = xasprintf("./%s", name);
		}
		if (stat(cand, &st) == 0 && S_ISREG(st.st_mode) && access(cand, X_OK) == 0)
			return cand;
		free(cand);
		if (!colon)
			break;
		p = colon + 1;
	}
	return NULL;
}
