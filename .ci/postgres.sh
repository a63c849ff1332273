#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests: 127.0.0.1 only, a random free port, trust auth,
# and no durability (fsync off...): its data is worth nothing once the tests end.
#
#   .ci/postgres.sh start DIR   make a cluster in DIR (absent or empty), start it, print its DSN:
#                               postgresql://postgres@127.0.0.1:PORT/postgres (the only line on stdout)
#   .ci/postgres.sh stop DIR    stop it and remove DIR (nothing to do if DIR is gone)
#   .ci/postgres.sh bin         print the directory of the binaries, or exit 1 if there are none
#
# `start` installs Debian's postgresql with apt-get when no binaries are found (a fresh CI machine;
# Debian keeps them in /usr/lib/postgresql/N/bin, off PATH). ORCH_PG_BIN=DIR uses the binaries in
# DIR and nothing else, and never installs (ORCH_PG_BIN=/nowhere: "no PostgreSQL here").
# initdb refuses to run as root, so as root the binaries run as the `postgres` user.
# Used by .ci/run and by the tests' pg_server fixture (tests/postgres.py).
set -euo pipefail

MARK=.orch-test-postgres  # in DIR: says DIR is ours to delete; holds the binaries' directory

die() { echo "postgres.sh: $*" >&2; exit 1; }

has_bin() { [[ -x $1/initdb && -x $1/pg_ctl ]]; }

find_bin() {
    if [[ -n "${ORCH_PG_BIN:-}" ]]; then
        has_bin "$ORCH_PG_BIN" && echo "$ORCH_PG_BIN"
        return
    fi
    local d
    # PATH first, then Debian's directories, newest version first
    for d in "$(dirname "$(command -v initdb || echo /nowhere/initdb)")" \
             $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -rV); do
        has_bin "$d" && { echo "$d"; return; }
    done
    return 1
}

install_postgres() {
    [[ -z "${ORCH_PG_BIN:-}" ]] || die "ORCH_PG_BIN=$ORCH_PG_BIN has no initdb and pg_ctl"
    command -v apt-get >/dev/null || die "no PostgreSQL binaries found, and no apt-get to install them"
    [[ $EUID -eq 0 ]] || die "no PostgreSQL binaries found; installing them needs root (apt-get install postgresql)"
    echo "postgres.sh: installing postgresql with apt-get" >&2
    # The package's own cluster (`main`) is made but not started where policy-rc.d forbids
    # services (containers); either way the tests never use it.
    export DEBIAN_FRONTEND=noninteractive
    { apt-get -qq update && apt-get -qq install -y --no-install-recommends postgresql; } >&2 \
        || die "apt-get install postgresql failed"
}

# Run a PostgreSQL binary: as the postgres user when we are root (initdb refuses root).
as_pg() {
    if [[ $EUID -ne 0 ]]; then
        "$@"
    elif command -v runuser >/dev/null; then
        runuser -u postgres -- "$@"
    else
        su postgres -s /bin/bash -c "$(printf '%q ' "$@")"
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    local dir=$1 bin port log
    if [[ -e $dir ]]; then
        [[ -d $dir && -z $(ls -A "$dir") ]] || die "$dir exists and is not an empty directory"
    fi
    mkdir -p "$dir"
    : >"$dir/$MARK"
    # From here on a failed start removes what it made, server included.
    # shellcheck disable=SC2064  # $dir expanded now
    trap "stop $(printf %q "$dir")" EXIT

    bin=$(find_bin) || { install_postgres; bin=$(find_bin) || die "still no initdb after installing postgresql"; }
    echo "$bin" >"$dir/$MARK"
    chmod 700 "$dir"
    if [[ $EUID -eq 0 ]]; then
        id postgres >/dev/null 2>&1 || die "running as root needs a 'postgres' user to run the server"
        chown postgres: "$dir"
        as_pg test -w "$dir" || die "the postgres user cannot write to $dir: choose a directory it can reach (/tmp)"
    fi
    cd "$dir"  # the postgres user may not be allowed into the caller's directory

    as_pg "$bin/initdb" -D "$dir/data" --auth=trust -U postgres -E UTF8 --locale=C --no-sync --no-instructions \
        >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
    # Only a test server may run like this: a crash can lose or corrupt anything.
    cat >>"$dir/data/postgresql.conf" <<EOF

# .ci/postgres.sh: a throwaway server for the tests
listen_addresses = '127.0.0.1'
unix_socket_directories = '${dir//\'/\'\'}'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
orch.test_server = on  # lets the tests tell this server from one ORCH_TEST_PG_DSN names
EOF

    # The free port can be taken before the server binds it: try another.
    log="$dir/postgres.log"
    for _ in 1 2 3 4 5; do
        port=$(free_port)
        rm -f "$log"
        if as_pg "$bin/pg_ctl" start -D "$dir/data" -l "$log" -o "-p $port" -w -t 60 -s >"$dir/pg_ctl.out" 2>&1; then
            trap - EXIT
            echo "postgresql://postgres@127.0.0.1:$port/postgres"
            return
        fi
        grep -q "could not bind" "$log" || break
    done
    cat "$dir/pg_ctl.out" >&2
    tail -n 20 "$log" >&2 || true
    die "the server did not start (log above)"
}

stop() {
    local dir=$1 bin
    [[ -e $dir ]] || return 0
    if [[ ! -e $dir/$MARK ]]; then
        # an empty directory made for a start that failed early; anything else is not ours
        rmdir "$dir" 2>/dev/null || die "$dir was not made by postgres.sh start: not removing it"
        return 0
    fi
    bin=$(<"$dir/$MARK")
    local status=0
    if [[ -n $bin && -e $dir/data/postmaster.pid ]]; then
        cd "$dir"
        as_pg "$bin/pg_ctl" stop -D "$dir/data" -m fast -w -t 60 -s >&2 \
            || as_pg "$bin/pg_ctl" stop -D "$dir/data" -m immediate -w -t 30 -s >&2 \
            || status=1
        cd /
    fi
    rm -rf "$dir"
    [[ $status -eq 0 ]] || die "could not stop the server of $dir (removed its directory all the same)"
}

case "${1:-}" in
    start | stop)
        [[ $# -eq 2 && -n $2 ]] || die "usage: $0 $1 DIR"
        "$1" "$(realpath -m "$2")"
        ;;
    bin)
        [[ $# -eq 1 ]] || die "usage: $0 bin"
        find_bin || die "no PostgreSQL binaries (initdb, pg_ctl) found"
        ;;
    *) die "usage: $0 start DIR | stop DIR | bin" ;;
esac
