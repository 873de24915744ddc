# Makefile for agog_nats (PGXS)

EXTENSION = agog_nats
MODULE_big = agog_nats
OBJS = \
	src/agog_nats.o \
	src/agog_shmem.o \
	src/agog_conn.o \
	src/agog_subject.o \
	src/agog_report.o \
	src/agog_stream.o \
	src/agog_outbox.o \
	src/agog_workflow.o \
	src/agog_worker.o

# Every released script and every upgrade script of the chain.
DATA = $(wildcard sql/$(EXTENSION)--*.sql)

PG_CPPFLAGS = -I$(srcdir)/src
PG_CFLAGS = -Wall -Wextra -Werror -Wno-unused-parameter -Wno-missing-field-initializers -Wno-sign-compare
SHLIB_LINK = -lnats

# pg_regress suites: sql/<name>.sql against expected/<name>.out.
REGRESS = setup validate publish_fetch stream_status outbox workflow privileges upgrade
REGRESS_OPTS = --inputdir=. --outputdir=$(REGRESS_OUTPUTDIR)
REGRESS_OUTPUTDIR ?= .

# Isolation specs: specs/<name>.spec against expected/<name>.out.
ISOLATION = outbox_claim task_claim

PG_CONFIG ?= $(shell command -v pg_config15 2>/dev/null || echo /usr/lib/postgresql/15/bin/pg_config)
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)
