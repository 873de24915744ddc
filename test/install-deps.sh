#!/usr/bin/env bash
# Install the Debian 12 packages that building and testing agog_nats needs,
# only those that are missing. Fast and silent when everything is present.
#
#   bash test/install-deps.sh
#
# Extra packages can be added with AGOG_EXTRA_PACKAGES="pkg1 pkg2".
set -euo pipefail

PACKAGES=(
    postgresql-15             # server, initdb, pg_ctl (/usr/lib/postgresql/15/bin)
    postgresql-server-dev-15  # PGXS, pg_config, pg_regress, PostgreSQL::Test::* perl modules
    libpq-dev
    libnats-dev               # nats.c
    nats-server               # /usr/sbin/nats-server
    libipc-run-perl           # needed by PostgreSQL::Test::Utils (TAP tests)
    make gcc perl             # build, prove, TAP
    procps                    # ps, used by the scripts' diagnostics
    iproute2                  # ss, used to find free ports
    util-linux                # runuser
    findutils coreutils
    openssl                   # certificates (050_tls), Ed25519 keys for .creds (045_creds)
)
# shellcheck disable=SC2206
PACKAGES+=(${AGOG_EXTRA_PACKAGES:-})

missing=()
for p in "${PACKAGES[@]}"; do
    # db:Status-Status is "installed" for a fully installed package; dpkg-query
    # fails for a package it has never heard of, which also means "missing".
    st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [ "$st" = installed ] || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing Debian packages: ${missing[*]}" >&2
    echo "install-deps: run as root (or: sudo apt-get install ${missing[*]})" >&2
    exit 1
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}" >/dev/null
echo "install-deps: done"
