# Makefile for agog_nats (PGXS)

EXTENSION = agog_nats
MODULE_big = agog_nats
OBJS = \
	src/agog_nats.o \
	src/agog_agents.o \
	src/agog_shmem.o \
	src/agog_conn.o \
	src/agog_auth.o \
	src/agog_subject.o \
	src/agog_report.o \
	src/agog_stream.o \
	src/agog_outbox.o \
	src/agog_workflow.o \
	src/agog_xact.o \
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
ISOLATION = outbox_claim task_claim agents_cache

PG_CONFIG ?= $(shell command -v pg_config15 2>/dev/null || echo /usr/lib/postgresql/15/bin/pg_config)
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# Every file includes the shared header: PGXS tracks no header dependencies.
$(OBJS): src/agog_nats.h
src/agog_conn.o src/agog_auth.o: src/agog_auth.h

# ---------------------------------------------------------------------------
# agog-agent, the agent runner (src/agent/*.c): a libpq program, built and
# installed with the extension.  PGXS cannot build a PROGRAM next to
# MODULE_big, so these are explicit rules.  `make install` also installs the
# example agents (examples/agents/) for the demo and the tutorial.
AGOG_AGENT_SRCS = $(sort $(wildcard src/agent/*.c))
AGOG_AGENT_HDRS = $(wildcard src/agent/*.h)
AGOG_AGENT_CFLAGS = -O2 -g -std=gnu11 -Wall -Wextra -Werror
AGOG_EXAMPLES = $(sort $(wildcard examples/agents/*))
AGOG_EXAMPLES_DIR = $(datadir)/agog_nats/examples/agents

all: agog-agent

agog-agent: $(AGOG_AGENT_SRCS) $(AGOG_AGENT_HDRS)
	$(CC) $(AGOG_AGENT_CFLAGS) -I$(shell $(PG_CONFIG) --includedir) -o $@ $(AGOG_AGENT_SRCS) \
		-L$(shell $(PG_CONFIG) --libdir) -lpq -lm

install: install-agog-agent
install-agog-agent: agog-agent
	$(MKDIR_P) '$(DESTDIR)$(bindir)' '$(DESTDIR)$(AGOG_EXAMPLES_DIR)'
	$(INSTALL_PROGRAM) agog-agent '$(DESTDIR)$(bindir)/agog-agent'
	$(if $(AGOG_EXAMPLES),$(INSTALL_SCRIPT) $(AGOG_EXAMPLES) '$(DESTDIR)$(AGOG_EXAMPLES_DIR)/')

uninstall: uninstall-agog-agent
uninstall-agog-agent:
	rm -f '$(DESTDIR)$(bindir)/agog-agent'
	rm -rf '$(DESTDIR)$(datadir)/agog_nats'

clean: clean-agog-agent
clean-agog-agent:
	rm -f agog-agent

.PHONY: install-agog-agent uninstall-agog-agent clean-agog-agent
