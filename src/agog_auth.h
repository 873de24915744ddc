/*-------------------------------------------------------------------------
 *
 * agog_auth.h
 *		NKey signatures for agog_conn.c: the one header besides agog_conn.c
 *		that sees nats.c's types.
 *
 * Copyright (c) 2026, agog_nats developers
 *
 * src/agog_auth.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef AGOG_AUTH_H
#define AGOG_AUTH_H

#include <nats/nats.h>

extern char *agog_auth_read_secret(const char *setting, const char *path);
extern void agog_auth_forget_secret(char *secret);
extern void agog_auth_check_files(void);
extern natsStatus agog_auth_set_options(natsOptions *opts);
extern bool agog_auth_take_dropped(void);
extern bool agog_auth_file_shown(void);

#endif							/* AGOG_AUTH_H */
