#!/usr/bin/env bash
# Make sure PostgreSQL *server* binaries (initdb + postgres) are available for
# the test suite (tests/_postgres.py starts a private throw-away server).
#
# - Looks on PATH (initdb, postgres, pg_ctl) and in /usr/lib/postgresql/*/bin.
# - If nothing is found, installs Debian's `postgresql` package with apt-get
#   (as root, or through passwordless sudo). The package's post-install is told
#   not to create the default "main" cluster and is not allowed to start any
#   service, so nothing ends up listening on port 5432.
# - Idempotent; prints exactly one line on success. apt output goes to a log
#   file that is shown only if the install fails.
#
# Usage: bash scripts/ensure-postgres.sh
set -euo pipefail

# Prints the directory holding initdb + postgres, or nothing.
find_bindir() {
    local initdb dir
    if initdb=$(command -v initdb 2>/dev/null) && command -v postgres >/dev/null 2>&1; then
        dirname "$initdb"
        return 0
    fi
    # Highest major version first (sort -V handles 9.6 vs 15).
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5,5 -V -r); do
        if [ -x "$dir/initdb" ] && [ -x "$dir/postgres" ]; then
            echo "$dir"
            return 0
        fi
    done
    return 0
}

describe() {
    local dir=$1 version
    version=$("$dir/postgres" --version 2>/dev/null || echo "postgres (unknown version)")
    echo "$version in $dir"
}

bindir=$(find_bindir)
if [ -n "$bindir" ]; then
    echo "ensure-postgres: found $(describe "$bindir")"
    exit 0
fi

# ---- not found: install ----------------------------------------------------
if [ "$(id -u)" -eq 0 ]; then
    as_root() { "$@"; }
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root() { sudo -n "$@"; }
else
    echo "ensure-postgres: no PostgreSQL server binaries (initdb/postgres) found on PATH or in" \
         "/usr/lib/postgresql/*/bin, and cannot install them (not root, no passwordless sudo)." \
         "Install the Debian 'postgresql' package or put its bin directory on PATH." >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-postgres: no PostgreSQL server binaries found and apt-get is not available;" \
         "install PostgreSQL (initdb + postgres) manually and put it on PATH." >&2
    exit 1
fi

log=$(mktemp "${TMPDIR:-/tmp}/ensure-postgres.XXXXXX.log")
policy=/usr/sbin/policy-rc.d
created_policy=0
cleanup() {
    if [ "$created_policy" -eq 1 ]; then
        as_root rm -f "$policy" || true
    fi
}
trap cleanup EXIT

# 1. Do not let postgresql-NN's postinst create the default cluster
#    (/var/lib/postgresql/NN/main on port 5432). postgresql-common reads
#    create_main_cluster from createcluster.conf, which include_dir's this
#    directory; a drop-in there is not a dpkg conffile, so no conffile prompt.
as_root mkdir -p /etc/postgresql-common/createcluster.d
echo "create_main_cluster = false  # written by neve scripts/ensure-postgres.sh" |
    as_root tee /etc/postgresql-common/createcluster.d/00-neve-no-main-cluster.conf >/dev/null

# 2. Belt and braces: forbid service starts during the install (standard
#    Debian mechanism; Docker images usually ship this file already).
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# temporary, from neve scripts/ensure-postgres.sh\nexit 101\n' |
        as_root tee "$policy" >/dev/null
    as_root chmod 755 "$policy"
    created_policy=1
fi

export DEBIAN_FRONTEND=noninteractive
if ! { as_root env DEBIAN_FRONTEND=noninteractive apt-get update &&
       as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
           -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
           postgresql; } >"$log" 2>&1; then
    echo "ensure-postgres: apt-get failed; last lines of $log:" >&2
    tail -n 30 "$log" >&2
    exit 1
fi

bindir=$(find_bindir)
if [ -z "$bindir" ]; then
    echo "ensure-postgres: installed 'postgresql' but still cannot find initdb/postgres (see $log)" >&2
    exit 1
fi
rm -f "$log"
echo "ensure-postgres: installed Debian package postgresql: $(describe "$bindir")"
