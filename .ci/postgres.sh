#!/usr/bin/env bash
# A PostgreSQL server for the tests: installs the Debian package when missing, starts a
# throw-away cluster (as a non-root user, on a free port, fsync off: test data only) and
# prints its URL on stdout. The role may create databases: each test makes its own.
# Idempotent: a cluster this script started earlier (same data directory) is reused.
# Exit status non-zero when no server could be started; `make test` then fails, because it
# sets DSCINT_REQUIRE_POSTGRES=1 (the PostgreSQL tests would otherwise skip).
set -euo pipefail

DATA="${DSCINT_PG_DIR:-/tmp/dscint-ci-postgres}"
ROLE=dscint
PASSWORD=dscint

find_bin() {
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then
    SUDO="sudo"
fi
BIN="$(find_bin)"
if [ -z "$BIN" ]; then
    if ! command -v apt-get >/dev/null; then
        echo "postgres.sh: PostgreSQL is not installed and there is no apt-get" >&2
        exit 1
    fi
    $SUDO apt-get update -qq >&2
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        postgresql >/dev/null
    BIN="$(find_bin)"
fi

# initdb refuses to run as root: the package's 'postgres' user runs the cluster then
if [ "$(id -u)" -eq 0 ]; then
    AS=(runuser -u postgres --)
else
    AS=()
fi

if [ -f "$DATA/port" ] && "${AS[@]}" "$BIN/pg_ctl" -D "$DATA/cluster" status >/dev/null 2>&1; then
    PORT="$(cat "$DATA/port")"
else
    rm -rf "$DATA"
    mkdir -p "$DATA"
    if [ "$(id -u)" -eq 0 ]; then
        chown postgres: "$DATA"
    fi
    PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    "${AS[@]}" "$BIN/initdb" -D "$DATA/cluster" -A trust -U postgres >/dev/null
    "${AS[@]}" "$BIN/pg_ctl" -D "$DATA/cluster" -l "$DATA/server.log" -w start \
        -o "-p $PORT -k $DATA -c listen_addresses=127.0.0.1 -c fsync=off \
            -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" >/dev/null
    "${AS[@]}" "$BIN/psql" -h "$DATA" -p "$PORT" -U postgres -d postgres -q -v ON_ERROR_STOP=1 \
        -c "CREATE ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD'" >/dev/null
    echo "$PORT" | "${AS[@]}" tee "$DATA/port" >/dev/null
fi
echo "postgresql+psycopg://$ROLE:$PASSWORD@127.0.0.1:$PORT/postgres"
