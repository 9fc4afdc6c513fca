# shellcheck shell=bash
# Start a throwaway PostgreSQL server for the registry tests and export its URL.
#
#   . .ci/postgres.sh          # from .ci/run, as root, on Debian; sourced, not executed
#
# Exports DSFT_TEST_POSTGRES_URL=postgresql+psycopg://dsft:dsft@127.0.0.1:$PORT/dsft_test, which
# tests/registry picks up (each test gets its own schema in that database). Idempotent: a second
# run finds the package installed, the cluster initialised and the server up, and only re-exports.
# Never calls `exit` (it runs in the caller's shell): on failure it prints one line, leaves
# DSFT_TEST_POSTGRES_URL unset (the PostgreSQL tests then skip with a visible reason) and returns 1.
#
# Knobs: DSFT_CI_PG_PORT (default 54329: apart from a distro cluster on 5432),
#        DSFT_CI_PG_DATA (default /var/lib/postgresql/dsft-ci), DSFT_CI_PYTHON (if set, that
#        interpreter gets psycopg[binary] when it cannot import psycopg).

_dsft_ci_postgres() {
    local port="${DSFT_CI_PG_PORT:-54329}"
    local data="${DSFT_CI_PG_DATA:-/var/lib/postgresql/dsft-ci}"
    local bin
    local log="$data.log"
    local as_pg=(runuser -u postgres --)

    _pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

    bin="$(_pg_bin)"
    if [[ -z "$bin" || ! -x "$bin/pg_ctl" ]]; then
        echo "postgres.sh: installing postgresql (apt-get)" >&2
        # The package's own cluster (main, 5432) is not used; ours lives in $data on $port.
        export DEBIAN_FRONTEND=noninteractive
        if ! { apt-get install -y -qq --no-install-recommends postgresql >/dev/null 2>&1 \
               || { apt-get update -qq >/dev/null 2>&1 \
                    && apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }; }; then
            echo "postgres.sh: apt-get install postgresql failed; PostgreSQL tests will be skipped" >&2
            return 1
        fi
        bin="$(_pg_bin)"
    fi
    if ! id postgres >/dev/null 2>&1; then
        echo "postgres.sh: no 'postgres' user after installing postgresql; PostgreSQL tests will be skipped" >&2
        return 1
    fi

    if [[ ! -s "$data/PG_VERSION" ]]; then
        # A half-made data directory from an interrupted run is thrown away and made again.
        rm -rf "$data"
        install -d -o postgres -g postgres -m 700 "$data"
        if ! "${as_pg[@]}" "$bin/initdb" -D "$data" -U postgres -A trust -E UTF8 --no-sync >"$log" 2>&1; then
            echo "postgres.sh: initdb failed, see $log; PostgreSQL tests will be skipped" >&2
            return 1
        fi
        # Only 127.0.0.1 and a socket inside the data directory; durability is not wanted here.
        cat >>"$data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$data'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
EOF
    fi

    if ! "${as_pg[@]}" "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        touch "$log" && chown postgres:postgres "$log"
        if ! "${as_pg[@]}" "$bin/pg_ctl" -D "$data" -l "$log" -w -t 60 start >/dev/null; then
            echo "postgres.sh: PostgreSQL did not start, see $log; PostgreSQL tests will be skipped" >&2
            return 1
        fi
    fi

    local psql=("${as_pg[@]}" "$bin/psql" -h "$data" -p "$port" -U postgres -d postgres -qtAX -v ON_ERROR_STOP=1)
    if [[ "$("${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname = 'dsft'")" != 1 ]]; then
        "${psql[@]}" -c "CREATE ROLE dsft LOGIN PASSWORD 'dsft'" || return 1
    fi
    if [[ "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = 'dsft_test'")" != 1 ]]; then
        "${psql[@]}" -c "CREATE DATABASE dsft_test OWNER dsft" || return 1
    fi

    if [[ -n "${DSFT_CI_PYTHON:-}" ]] && ! "$DSFT_CI_PYTHON" -c "import psycopg" >/dev/null 2>&1; then
        "$DSFT_CI_PYTHON" -m pip install -q "psycopg[binary]>=3.2" || return 1
    fi

    export DSFT_TEST_POSTGRES_URL="postgresql+psycopg://dsft:dsft@127.0.0.1:$port/dsft_test"
    echo "postgres.sh: PostgreSQL $("$bin/postgres" -V | awk '{print $3}') up on 127.0.0.1:$port; DSFT_TEST_POSTGRES_URL exported" >&2
}

_dsft_ci_postgres
_dsft_ci_postgres_rc=$?
unset -f _dsft_ci_postgres _pg_bin
# `return` ends a sourced script with the outcome; `exit` covers `bash .ci/postgres.sh` (a check only).
eval "unset _dsft_ci_postgres_rc; return $_dsft_ci_postgres_rc 2>/dev/null || exit $_dsft_ci_postgres_rc"
