#!/usr/bin/env bash
# Drop-in compatibility, proven by the peers' own test suites:
#   - SQLAlchemy's tests (from the sdist of each installed release) with QueuePool and
#     AsyncAdaptedQueuePool replaced by our pools (scripts/compat_sqlalchemy.py), once per
#     Python given (default: .venv, SQLAlchemy 2.1.x, and .venv-sa20, 2.0.x);
#   - Django's tests (tests/runtests.py from the sdist of Django in .venv) on our
#     PostgreSQL and MySQL backends, against private PostgreSQL and MariaDB servers
#     (scripts/compat_django.py); on MariaDB with PyMySQL, and with mysqlclient as well
#     when it is installed.
# Each is compared with the same tests on the stock pool or backend. Every test that fails
# only with ours must be listed, with its reason, in compat/expected.txt; any other
# difference makes this script exit 1 (after running every suite). Prints the counts.
#
#   scripts/compat.sh                         # everything (about 6-7 minutes on 2 CPUs)
#   scripts/compat.sh .venv/bin/python        # SQLAlchemy suites for these Pythons only, + Django
#   COMPAT_SKIP_DJANGO=1 scripts/compat.sh    # SQLAlchemy only
#   COMPAT_DJANGO_DBS=postgresql scripts/compat.sh
set -uo pipefail
cd "$(dirname "$0")/.."

pythons=("$@")
if [ ${#pythons[@]} -eq 0 ]; then
  pythons=(.venv/bin/python .venv-sa20/bin/python)
fi
django_python=${COMPAT_DJANGO_PYTHON:-.venv/bin/python}
status=0
began=$SECONDS
rm -f .compat-cache/results/summary-*.json

for py in "${pythons[@]}"; do
  if [ ! -x "$py" ]; then
    echo "compat: $py not found (scripts/test.sh builds .venv and .venv-sa20)" >&2
    status=1
    continue
  fi
  printf '\n=== compat: SQLAlchemy suite with %s\n' "$py"
  "$py" scripts/compat_sqlalchemy.py || status=1
done

if [ -z "${COMPAT_SKIP_DJANGO:-}" ]; then
  db_args=()
  for db in ${COMPAT_DJANGO_DBS:-postgresql mysql}; do db_args+=(--db "$db"); done
  printf '\n=== compat: Django suite with %s\n' "$django_python"
  "$django_python" scripts/compat_django.py "${db_args[@]}" || status=1
  # mysqlclient too, where it is installed (PyMySQL is the test extra's MySQL driver).
  if [[ " ${COMPAT_DJANGO_DBS:-mysql} " == *" mysql "* ]] \
    && "$django_python" -c "import MySQLdb._mysql" 2>/dev/null; then
    printf '\n=== compat: Django suite on MariaDB with mysqlclient\n'
    "$django_python" scripts/compat_django.py --db mysql --mysql-driver mysqldb || status=1
  fi
fi

printf '\n=== compat: summary (%d s)\n' "$((SECONDS - began))"
python3 - <<'EOF' || status=1
import json, pathlib
cols = ("passed", "failed", "error", "skipped")
files = sorted(pathlib.Path(".compat-cache/results").glob("summary-*.json"))
print(f"{'suite':20} {'version':9} {'run':6}" + "".join(f"{c:>8}" for c in cols)
      + f"{'expected':>10}{'bugs':>6}{'unexpected':>12}{'secs':>6}")
for f in files:
    s = json.loads(f.read_text())
    for run in ("stock", "ours"):
        row = f"{s['suite'] if run == 'stock' else '':20} {s['version'] if run == 'stock' else '':9} {run:6}"
        row += "".join(f"{s[run][c]:>8}" for c in cols)
        if run == "ours":
            row += f"{s['expected']:>10}{s['bugs']:>6}{len(s['unexpected']) + len(s['problems']):>12}{s['seconds']:>6}"
        print(row)
if not files:
    raise SystemExit("no suite ran")
EOF
if [ "$status" -eq 0 ]; then
  echo "compat: no unexpected difference"
else
  echo "compat: FAILED (unexpected differences or runs that could not be compared; see above)"
fi
exit "$status"
