/*-------------------------------------------------------------------------
 *
 * agog_auth.c
 *		Secrets for connecting to NATS: secret files, credentials files, and
 *		the NKey signature of the server's nonce.
 *
 * A server that lists NKeys, or that trusts an operator (JWT mode), sends a
 * nonce in its INFO, and the client signs it with the user's NKey seed.  The
 * extension signs it here, with nats_Sign, instead of letting nats.c read
 * the seed or credentials file itself: nats.c 3.4.1 leaves a signature whose
 * first byte is zero out of its CONNECT, so the server refused one connect in
 * 256 with "Authorization Violation" (a backend's call failed with 28000).
 * Signing here sees such a signature, and agog_conn.c connects again at once,
 * to a new nonce.
 *
 * The two callbacks run inside nats.c: on the connecting thread within a
 * signal-blocked section, or on nats.c's reconnect thread in the worker.
 * They call nats.c and plain C only, never palloc or ereport.  As nats.c
 * did, they read the file the setting names at every connect, so a file
 * replaced in place serves the next connect; every copy of the seed is wiped
 * before they return.  The path and what the file holds are copied for them
 * under a pthread mutex by agog_auth_set_options, on the process's own
 * thread.
 *
 * Copyright (c) 2026, agog_nats developers
 *
 * src/agog_auth.c
 *
 *-------------------------------------------------------------------------
 */
#include "agog_nats.h"
#include "agog_auth.h"

#include <fcntl.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

#include "access/xact.h"
#include "catalog/pg_authid.h"
#include "miscadmin.h"
#include "storage/fd.h"
#include "utils/acl.h"

/* A credentials file is a JWT of a few kB and a seed; refuse anything huge. */
#define KEY_FILE_MAX	(64 * 1024)

/* An NKey seed is 58 characters. */
#define SEED_MAX		128

/* The longest password or token a secret file's first line may hold. */
#define AGOG_SECRET_MAX	4095

typedef enum AuthFile
{
	AUTH_NONE,					/* no NKey: the callbacks are not set */
	AUTH_SEED,					/* agog_nats.nkey_seed_file: the seed's line */
	AUTH_CREDS					/* agog_nats.credentials_file: JWT and seed */
} AuthFile;

/* Section numbers of a credentials file's values. */
#define CREDS_JWT	0
#define CREDS_SEED	1

static pthread_mutex_t auth_mutex = PTHREAD_MUTEX_INITIALIZER;
static AuthFile auth_file = AUTH_NONE;
static char auth_path[MAXPGPATH];
static bool auth_dropped = false;	/* a signature nats.c would leave out */
static uintptr_t auth_generation = 0;	/* of the last agog_auth_set_options */

/*
 * next_line
 *		The line at *p, without its LF or CRLF and trailing blanks, and *p
 *		moved past it; false at the end of the text.  Plain C: runs on
 *		nats.c's threads too.
 */
static bool
next_line(const char **p, const char *end, const char **line, size_t *len)
{
	const char *nl;

	if (*p >= end)
		return false;
	nl = memchr(*p, '\n', end - *p);
	if (nl == NULL)
		nl = end;
	*line = *p;
	*len = nl - *p;
	while (*len > 0 && ((*line)[*len - 1] == '\r' || (*line)[*len - 1] == ' ' ||
						(*line)[*len - 1] == '\t'))
		(*len)--;
	*p = (nl < end) ? nl + 1 : end;
	return true;
}

/*
 * creds_value
 *		The value of a section of a credentials file's text (CREDS_JWT, the
 *		first; CREDS_SEED, the second): a marker line of dashes ("-----BEGIN
 *		NATS USER JWT-----"), the value on the next line that is not blank,
 *		and a marker line right after it.  Blank lines are skipped, LF or
 *		CRLF line ends; a value over two lines is no section.  Plain C.
 */
static bool
creds_value(const char *text, size_t size, int section,
			const char **value, size_t *value_len)
{
	const char *p = text;
	const char *end = text + size;
	const char *line;
	const char *candidate = NULL;
	size_t		len;
	size_t		candidate_len = 0;
	int			done = 0;
	enum
	{
		OUTSIDE, VALUE, CLOSING
	}			where = OUTSIDE;

	while (next_line(&p, end, &line, &len))
	{
		bool		marker;

		if (len == 0)
			continue;
		marker = len >= 6 && strncmp(line, "---", 3) == 0 &&
			strncmp(line + len - 3, "---", 3) == 0;
		if (where == VALUE && !marker)
		{
			candidate = line;
			candidate_len = len;
			where = CLOSING;
		}
		else if (where == CLOSING && marker)
		{
			if (done++ == section)
			{
				*value = candidate;
				*value_len = candidate_len;
				return true;
			}
			where = OUTSIDE;
		}
		else if (where == CLOSING)
			where = OUTSIDE;	/* a second line */
		else if (marker)
			where = (where == OUTSIDE) ? VALUE : OUTSIDE;
	}
	return false;
}

/*
 * key_value
 *		What a key file's text holds: a section of a credentials file, or a
 *		seed file's seed, its first line that starts with "SU" (an NKey user
 *		seed; lines before it, a comment for example, are passed over, as
 *		nats.c did).  A seed must start with "SU" and be shorter than
 *		SEED_MAX, a JWT start with "eyJ" (an encoded JSON header).  Plain C:
 *		the check and the callbacks read a file by the same rules.
 */
static bool
key_value(AuthFile file, const char *text, size_t size, int section,
		  const char **value, size_t *value_len)
{
	const char *p = text;
	const char *end = text + size;

	if (file == AUTH_CREDS)
	{
		if (!creds_value(text, size, section, value, value_len))
			return false;
	}
	else
	{
		bool		found = false;

		while (!found && next_line(&p, end, value, value_len))
			found = *value_len >= 2 && strncmp(*value, "SU", 2) == 0;
		if (!found)
			return false;
	}
	if (file == AUTH_CREDS && section == CREDS_JWT)
		return *value_len > 3 && strncmp(*value, "eyJ", 3) == 0;
	return *value_len > 2 && *value_len < SEED_MAX && strncmp(*value, "SU", 2) == 0;
}

/*
 * read_key_file
 *		The whole file at path in malloc'd memory, or NULL with *err set: an
 *		errno of open(2) or read(2), EFBIG when it is larger than
 *		KEY_FILE_MAX, EINVAL when it is not a regular file (a FIFO or a
 *		device could block a connect for ever).  Plain C with an unbuffered
 *		descriptor, closed before returning: runs on nats.c's threads, and in
 *		agog_auth_check_files.  The caller wipes and frees the text.
 */
static char *
read_key_file(const char *path, size_t *size, int *err)
{
	int			fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
	struct stat st;
	char	   *buf;
	size_t		n = 0;

	*size = 0;
	*err = 0;
	if (fd < 0)
	{
		*err = errno;
		return NULL;
	}
	if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
	{
		close(fd);
		*err = EINVAL;
		return NULL;
	}
	buf = malloc(KEY_FILE_MAX + 1);
	if (buf == NULL)
		*err = ENOMEM;
	while (buf != NULL && n <= KEY_FILE_MAX)
	{
		ssize_t		r = read(fd, buf + n, KEY_FILE_MAX + 1 - n);

		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			*err = errno;
		if (r <= 0)
			break;
		n += r;
	}
	close(fd);
	if (buf != NULL && *err == 0 && n > KEY_FILE_MAX)
		*err = EFBIG;
	if (buf != NULL && *err != 0)
	{
		explicit_bzero(buf, n);
		free(buf);
		buf = NULL;
	}
	*size = n;
	return buf;
}

/*
 * forget_key_file
 *		Wipe and free what read_key_file returned.  Plain C.
 */
static void
forget_key_file(char *text, size_t size)
{
	explicit_bzero(text, size);
	free(text);
}

/*
 * current_file
 *		The file the callbacks read, copied under the mutex.  Plain C.
 */
static AuthFile
current_file(char *path)
{
	AuthFile	file;

	pthread_mutex_lock(&auth_mutex);
	file = auth_file;
	memcpy(path, auth_path, MAXPGPATH);
	pthread_mutex_unlock(&auth_mutex);
	return file;
}

/*
 * current_value
 *		What the file the settings name holds for section (see key_value), in
 *		malloc'd memory, NUL-terminated; NULL with *errtxt set (malloc'd, for
 *		nats.c to free) when the file cannot be read or lacks it.  The file's
 *		text is wiped before returning; the caller wipes a seed.  Plain C:
 *		runs inside nats.c.
 */
static char *
current_value(int section, char **errtxt)
{
	char		path[MAXPGPATH];
	AuthFile	file = current_file(path);
	size_t		size;
	int			err;
	char	   *text = read_key_file(path, &size, &err);
	const char *value;
	size_t		len;
	char	   *copy = NULL;

	if (text == NULL)
	{
		*errtxt = strdup(file == AUTH_CREDS ? "could not read the credentials file" :
						 "could not read the NKey seed file");
		return NULL;
	}
	if (file == AUTH_NONE || (section == CREDS_JWT && file != AUTH_CREDS) ||
		!key_value(file, text, size, section, &value, &len))
		*errtxt = strdup(section == CREDS_JWT ? "the credentials file holds no user JWT" :
						 "the file holds no NKey user seed");
	else if ((copy = strndup(value, len)) == NULL)
		*errtxt = strdup("out of memory");
	forget_key_file(text, size);
	return copy;
}

/*
 * sign_nonce
 *		nats.c's signature handler: sign the server's nonce with the seed of
 *		the file the settings name.  Runs inside nats.c (see the banner): it
 *		calls nats_Sign and plain C only.  A signature that starts with a zero
 *		byte fails the connect before its CONNECT is sent, and is marked for
 *		agog_conn.c, which connects again (closure: the generation of
 *		agog_auth_set_options the connect was made in; an older connection's
 *		reconnect marks nothing).
 */
static natsStatus
sign_nonce(char **errtxt, unsigned char **sig, int *sig_len,
		   const char *nonce, void *closure)
{
	char	   *seed = current_value(CREDS_SEED, errtxt);
	natsStatus	s;

	if (seed == NULL)
		return NATS_ERR;
	s = nats_Sign(seed, nonce, sig, sig_len);
	explicit_bzero(seed, strlen(seed));
	free(seed);
	if (s == NATS_OK && *sig_len > 0 && (*sig)[0] == 0)
	{
		/*
		 * nats.c would send the CONNECT without it and the server refuse it
		 * as a wrong key; fail here instead, before anything is sent.
		 */
		free(*sig);
		*sig = NULL;
		*sig_len = 0;
		pthread_mutex_lock(&auth_mutex);
		if ((uintptr_t) closure == auth_generation)
			auth_dropped = true;
		pthread_mutex_unlock(&auth_mutex);
		*errtxt = strdup("the NKey signature of the server's nonce starts with a zero byte, which this nats.c cannot send");
		return NATS_ERR;
	}
	return s;
}

/*
 * user_jwt
 *		nats.c's user JWT handler: the JWT of the credentials file, malloc'd
 *		(nats.c frees it).  Runs inside nats.c: plain C only.
 */
static natsStatus
user_jwt(char **jwt, char **errtxt, void *closure)
{
	*jwt = current_value(CREDS_JWT, errtxt);
	return (*jwt != NULL) ? NATS_OK : NATS_ERR;
}

/*
 * may_read_settings
 *		Whether role may read the superuser-only settings (SHOW).  Runs in
 *		a transaction.
 */
static bool
may_read_settings(Oid role)
{
	return superuser_arg(role) || has_privs_of_role(role, ROLE_PG_READ_ALL_SETTINGS);
}

/*
 * agog_auth_file_shown
 *		Whether an error may name the file a secret setting points at: to a
 *		session whose role may read the setting (a superuser or a member of
 *		pg_read_all_settings, as for SHOW), and only when the current role
 *		may too: the session's role counts inside a superuser's SECURITY
 *		DEFINER function (the extension's workflow functions are such), and
 *		the current role inside a lesser role's, whose code could catch the
 *		message.
 *		Anyone else learns the setting's name, and the server log the path
 *		(file_log).  Never in the worker: its errors end up in
 *		agog_worker_status().last_error, which readers see.  Runs in a
 *		backend or the worker before the file is opened.
 */
bool
agog_auth_file_shown(void)
{
	return !IsBackgroundWorker && IsTransactionState() &&
		may_read_settings(GetOuterUserId()) && may_read_settings(GetUserId());
}

/*
 * file_named
 *		How an error message names the file: with its path when shown.  Only
 *		inside an ereport, whose start has saved errno for %m.
 */
static const char *
file_named(const char *path, bool shown)
{
	return shown ? psprintf("file \"%s\"", path) : "the file";
}

/*
 * file_log
 *		Inside an ereport: the path for the server log when the message
 *		does not show it.
 */
static int
file_log(const char *path, bool shown)
{
	if (!shown)
		errdetail_log("The file is \"%s\".", path);
	return 0;
}

/*
 * agog_auth_read_secret
 *		The first line of a secret file, without its line end, palloc'd; NULL
 *		when no file is set.  Runs in a backend or the worker, outside any
 *		signal-blocked section, never on nats.c's threads: it throws when the
 *		file cannot be read or is empty, after wiping its buffer.
 */
char *
agog_auth_read_secret(const char *setting, const char *path)
{
	FILE	   *f;
	char		buf[AGOG_SECRET_MAX + 2];
	char	   *secret;
	size_t		len;
	bool		too_long;
	bool		shown;

	if (!agog_setting_is_set(path))
		return NULL;
	shown = agog_auth_file_shown();
	f = AllocateFile(path, "r");
	if (f == NULL)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not open %s named by %s: %m",
						file_named(path, shown), setting),
				 file_log(path, shown)));
	/* no stdio buffer: it would keep a copy of the secret after fclose */
	setvbuf(f, NULL, _IONBF, 0);
	if (fgets(buf, sizeof(buf), f) == NULL)
		buf[0] = '\0';
	FreeFile(f);
	len = strcspn(buf, "\r\n");
	buf[len] = '\0';

	/*
	 * The buffer holds one byte more than a secret may have: a line that
	 * fills it would be cut short, and a cut secret must not be sent as if
	 * it were the whole one.
	 */
	too_long = len > AGOG_SECRET_MAX;
	secret = NULL;
	if (len > 0 && !too_long)
	{
		secret = MemoryContextAllocExtended(CurrentMemoryContext, len + 1,
											MCXT_ALLOC_NO_OOM);
		if (secret != NULL)
			memcpy(secret, buf, len + 1);
	}
	explicit_bzero(buf, sizeof(buf));
	if (len == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s named by %s is empty", file_named(path, shown), setting),
				 file_log(path, shown)));
	if (too_long)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("first line of %s named by %s is longer than %d bytes",
						file_named(path, shown), setting, AGOG_SECRET_MAX),
				 errdetail("The secret is the file's first line, without its line end."),
				 file_log(path, shown),
				 errhint("Put the password or token alone on the file's first line.")));
	if (secret == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory")));
	return secret;
}

/*
 * agog_auth_forget_secret
 *		Overwrite and free a secret read by agog_auth_read_secret.  Safe on
 *		NULL.  Runs where the secret was read; never on nats.c's threads.
 */
void
agog_auth_forget_secret(char *secret)
{
	if (secret != NULL)
	{
		explicit_bzero(secret, strlen(secret));
		pfree(secret);
	}
}

/*
 * check_key_file
 *		Throw unless the file the setting names holds what the callbacks will
 *		read from it, by the same reader and rules (read_key_file,
 *		key_value): an NKey user seed, or a credentials file's user JWT and
 *		seed.  The callbacks read the file again at every connect; this
 *		turns a wrong file into a clear error before any connect.  Runs in a
 *		backend or the worker outside any signal-blocked section, never on
 *		nats.c's threads; the text is wiped and freed before any throw.
 */
static void
check_key_file(const char *setting, const char *path, AuthFile file)
{
	bool		shown = agog_auth_file_shown();
	size_t		size;
	int			err;
	char	   *text = read_key_file(path, &size, &err);
	const char *value;
	size_t		len;
	bool		has_jwt = false;
	bool		has_seed = false;

	if (text != NULL)
	{
		has_jwt = file == AUTH_CREDS && key_value(file, text, size, CREDS_JWT, &value, &len);
		has_seed = key_value(file, text, size, CREDS_SEED, &value, &len);
		forget_key_file(text, size);
	}
	if (err == EFBIG)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s named by %s is larger than %d kB",
						file_named(path, shown), setting, KEY_FILE_MAX / 1024),
				 errdetail("An NKey seed is one line of 58 characters, and a credentials file holds a user JWT and a seed, a few kB."),
				 file_log(path, shown)));
	if (err == EINVAL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s named by %s is not a regular file", file_named(path, shown), setting),
				 file_log(path, shown)));
	if (err != 0)
	{
		errno = err;
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not open %s named by %s: %m", file_named(path, shown), setting),
				 file_log(path, shown)));
	}
	if (file == AUTH_SEED && !has_seed)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s named by %s holds no NKey user seed", file_named(path, shown), setting),
				 file_log(path, shown),
				 errdetail("The seed is the file's first line that starts with \"SU\"; %s.",
						   size == 0 ? "the file is empty" : "no line does")));
	if (file == AUTH_CREDS && (!has_jwt || !has_seed))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s named by %s holds no NATS user credentials",
						file_named(path, shown), setting),
				 file_log(path, shown),
				 errdetail("A credentials file holds a user JWT (eyJ...), then that user's NKey seed (SU...), each between a \"-----BEGIN\" and an \"------END\" line, as \"nsc generate creds\" writes them; this one has %s.",
						   has_jwt ? "no seed" : has_seed ? "no JWT" : "neither")));
}

/*
 * agog_auth_check_files
 *		Throw unless the NKey settings go together and their files can be
 *		read and hold what they must.  Runs in a backend or the worker before
 *		a connect, outside any signal-blocked section; never on nats.c's
 *		threads (it throws).
 */
void
agog_auth_check_files(void)
{
	if (agog_setting_is_set(agog_credentials_file) && agog_setting_is_set(agog_nkey))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("agog_nats.credentials_file and agog_nats.nkey cannot both be set"),
				 errhint("A credentials file holds its own NKey seed: set agog_nats.credentials_file for a server in operator (JWT) mode, or agog_nats.nkey and agog_nats.nkey_seed_file for one that lists NKeys.")));
	if (agog_setting_is_set(agog_nkey) != agog_setting_is_set(agog_nkey_seed_file))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("agog_nats.nkey and agog_nats.nkey_seed_file must be set together"),
				 errhint("Set agog_nats.nkey to the public key (U...) and agog_nats.nkey_seed_file to the file that holds its seed (SU...).")));
	if (agog_setting_is_set(agog_nkey_seed_file))
		check_key_file("agog_nats.nkey_seed_file", agog_nkey_seed_file, AUTH_SEED);
	if (agog_setting_is_set(agog_credentials_file))
		check_key_file("agog_nats.credentials_file", agog_credentials_file, AUTH_CREDS);
}

/*
 * agog_auth_set_options
 *		Before each connect attempt: copy the file the callbacks read from
 *		the settings, start a new generation (forgetting any dropped
 *		signature), and sign with the callbacks above when the settings name
 *		an NKey or a credentials file.  Runs on the process's own thread
 *		inside a signal-blocked section: nats.c and plain C only.
 */
natsStatus
agog_auth_set_options(natsOptions *opts)
{
	AuthFile	file = AUTH_NONE;
	void	   *generation;

	pthread_mutex_lock(&auth_mutex);
	auth_path[0] = '\0';
	if (agog_setting_is_set(agog_nkey))
	{
		file = AUTH_SEED;
		strlcpy(auth_path, agog_nkey_seed_file ? agog_nkey_seed_file : "", MAXPGPATH);
	}
	else if (agog_setting_is_set(agog_credentials_file))
	{
		file = AUTH_CREDS;
		strlcpy(auth_path, agog_credentials_file, MAXPGPATH);
	}
	auth_file = file;
	auth_dropped = false;
	generation = (void *) ++auth_generation;
	pthread_mutex_unlock(&auth_mutex);

	if (file == AUTH_SEED)
		return natsOptions_SetNKey(opts, agog_nkey, sign_nonce, generation);
	if (file == AUTH_CREDS)
		return natsOptions_SetUserCredentialsCallbacks(opts, user_jwt, NULL,
													   sign_nonce, generation);
	return NATS_OK;
}

/*
 * agog_auth_take_dropped
 *		Whether a signature made since agog_auth_set_options started with a zero
 *		byte, which nats.c 3.4.1 leaves out of its CONNECT: a connect that
 *		failed then is worth a new attempt at once.  Clears the mark.  Runs
 *		on the process's own thread.
 */
bool
agog_auth_take_dropped(void)
{
	bool		dropped;

	pthread_mutex_lock(&auth_mutex);
	dropped = auth_dropped;
	auth_dropped = false;
	pthread_mutex_unlock(&auth_mutex);
	return dropped;
}
