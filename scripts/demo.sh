#!/usr/bin/env bash
# Set up a virtualenv and run the sqla-rebalance demo: a pool rotating its connections over
# several hosts (a 4th host added, one host down and back).
#
# Hosts: four local PostgreSQL servers (127.0.0.2-5) when the PostgreSQL server programs are
# already installed (scripts/install-system-deps.sh installs them; this script never does),
# otherwise SQLite files in temporary directories -- no server needed. PostgreSQL missing or
# unusable is never an error here: the demo then runs on SQLite files.
#
# Extra arguments go to the demo, e.g. scripts/demo.sh --duration 30;
# --sqlite, --postgres or --url URL choose the mode yourself.
set -euo pipefail
cd "$(dirname "$0")/.."

# pip install, quiet; drops this machine's harmless "Location ... is ignored" lines (as
# scripts/test.sh does; pip's own exit status still counts, through pipefail).
pip_install() {
  .venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location '" || true; }
}

[ -x .venv/bin/python ] || python3 -m venv .venv
pip_install -U pip
pip_install -e .

# Can this machine run the PostgreSQL demo? Server programs found (sqla_rebalance.devservers looks in
# the usual places), and, as root, a postgres account to run them as.
pg_usable() {
  .venv/bin/python - <<'EOF' 2>/dev/null
import os, pwd
from sqla_rebalance.devservers import find_pg_bindir
find_pg_bindir()
if os.geteuid() == 0:
    pwd.getpwnam("postgres")
EOF
}

mode=()
case " $* " in
  *" --sqlite "* | *" --url "* | *" --url="*) ;;  # chosen by the caller; nothing more to install
  *" --postgres "*)
    pip_install -e ".[postgresql]" ;;  # asked for: psycopg is needed
  *)
    if pg_usable; then
      if pip_install -e ".[postgresql]"; then
        mode=(--postgres)
      else
        echo "demo.sh: could not install psycopg; running the demo on SQLite files" >&2
        mode=(--sqlite)
      fi
    else
      echo "demo.sh: no usable PostgreSQL server programs found; running the demo on SQLite files" >&2
      mode=(--sqlite)
    fi ;;
esac

if [ "${mode[*]-}" = --postgres ]; then
  # Chosen here, not by the caller: if the servers cannot start (exit status 2, with the
  # reason), fall back to SQLite files rather than fail.
  status=0
  .venv/bin/python -m sqla_rebalance demo --postgres "$@" || status=$?
  [ "$status" -eq 2 ] || exit "$status"
  echo "demo.sh: the PostgreSQL demo could not start; running the demo on SQLite files" >&2
  mode=(--sqlite)
fi
exec .venv/bin/python -m sqla_rebalance demo ${mode[@]+"${mode[@]}"} "$@"
