"""``sqla-rebalance demo``: host rotation over SQLite files, and over local PostgreSQL servers.

The demo is run for real (short timelines); the assertions use what it returns
(``stats["demo"]``) and what it prints. The package (demo and development servers included)
must work without the repository: it never imports ``tests``.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

import sqla_rebalance
from sqla_rebalance import cli, devservers
from sqla_rebalance.demo import backends, min_moves, run_demo

PACKAGE = Path(sqla_rebalance.__file__).resolve().parent
ROOT = PACKAGE.parent

HOSTS = 4


def _leftovers(parent: str, prefix: str) -> set[Path]:
    return set(Path(parent).glob(f"{prefix}*"))


def _event_time(summary, event, host):
    times = [e["t"] for e in summary["events"] if e["event"] == event and e["host"] == host]
    assert times, f"no {event} of {host}: {summary['events']}"
    return times[0]


def _phase(summary, name):
    return next(p for p in summary["phases"] if p["name"] == name)


def _check_timeline(stats, output: str) -> dict:
    """What every mode must show: the 4th host used, the down/up cycle, minimal moves."""
    summary = stats["demo"]
    assert summary["errors"] == 0
    assert summary["transactions"] > 0
    assert "0 errors" in output

    # Every open/retire line names its host (h1..h4).
    lines = re.findall(r"\] (open|retire) +(\S+)", output)
    assert {kind for kind, _ in lines} == {"open", "retire"}
    assert {host for _, host in lines} <= {"h1", "h2", "h3", "h4"}

    # h4 was added and got connections; the rebalance moved no more than needed.
    added = summary["added"]
    assert added["opened"] > 0
    assert stats["hosts"][summary["hosts"]["h4"]]["open"] > 0
    assert added["minimum"] is not None
    assert added["moved"] <= added["minimum"] + HOSTS
    assert "h4" not in added["moved_off"]
    assert "hosts_changed added=h4" in output

    # h2 went down, then up again, each within its phase.
    down, back = _phase(summary, "h2 down"), _phase(summary, "h2 back")
    t_down = _event_time(summary, "host_down", "h2")
    t_up = _event_time(summary, "host_up", "h2")
    assert down["start"] <= t_down < back["start"] <= t_up
    assert "host_down h2" in output
    assert "host_up  h2" in output
    # Nothing opened on h2 once it was marked down; its connections left.
    assert summary["down"]["opened_while_down"] == 0
    assert sum(summary["down"]["retired"].values()) >= 1
    # Failback: h2 got connections again, with no more moves than needed.
    up = summary["up"]
    assert up["opened"] > 0
    assert up["moved"] <= up["minimum"] + HOSTS
    assert summary["final_health"] == dict.fromkeys(["h1", "h2", "h3", "h4"], "up")
    # The cluster-wide recycle, sent by the real CLI from another process over the embedded bus.
    cluster = summary["cluster"]
    assert cluster["cli_exit"] == 0
    assert cluster["status_exit"] == 0
    assert cluster["applied"] == 1
    assert cluster["retired"] >= 1
    assert "applied by 1 process(es)" in output
    assert "pool demo: open" in output  # the status lines
    assert _phase(summary, "cluster recycle")["retired"].get("signal", 0) == cluster["retired"]
    return summary


@pytest.mark.parametrize(
    ("counts", "eligible", "expected"),
    [
        ({"a": 4, "b": 4, "c": 4}, ["a", "b", "c", "d"], 3),
        ({"a": 5, "b": 3, "c": 4}, ["a", "b", "c", "d"], 3),
        ({"a": 4, "b": 4, "c": 4, "d": 0}, ["a", "c", "d"], 4),  # b down: all of b moves
        ({"a": 3, "b": 3, "c": 3, "d": 3}, ["a", "b", "c", "d"], 0),
        ({"a": 4, "b": 3, "c": 3, "d": 3}, ["a", "b", "c", "d"], 0),  # 13 over 4: one keeps 4
        ({"a": 2}, [], 0),
    ],
)
def test_min_moves(counts, eligible, expected):
    assert min_moves(counts, eligible) == expected


def test_sqlite_demo_rotates_over_files():
    before = _leftovers(tempfile.gettempdir(), "sqla-rebalance-demo-")
    buf = io.StringIO()
    stats = run_demo(duration=10.0, threads=4, recycle=2.0, jitter=0.5, out=buf)
    output = buf.getvalue()
    summary = _check_timeline(stats, output)
    assert summary["killed_in_flight"] == 0
    assert "renaming its directory" in output
    assert set(summary["hosts"]) == {"h1", "h2", "h3", "h4"}
    assert all(key.endswith("demo.db") for key in summary["hosts"].values())
    # The temporary directories are gone.
    assert _leftovers(tempfile.gettempdir(), "sqla-rebalance-demo-") <= before


def test_single_database_demo_still_works(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'one.db'}"
    assert cli.main(["demo", "--url", url, "--duration", "2", "--threads", "2"]) == 0
    output = capsys.readouterr().out
    assert "0 errors" in output
    assert "pool.recycle(spread=1.0)" in output


def test_modes_are_exclusive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--sqlite", "--postgres"])
    assert exit_info.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


def test_postgres_demo_says_what_is_missing(monkeypatch, capsys):
    monkeypatch.setattr(backends, "have_psycopg", lambda: False)
    assert cli.main(["demo", "--postgres", "--duration", "1"]) == 2
    assert "needs psycopg" in capsys.readouterr().err


@pytest.mark.servers
def test_postgres_demo_rotates_over_servers(monkeypatch):
    pytest.importorskip("psycopg")
    # The demo starts its own cluster: a fixed port would clash with the session's pg_cluster.
    monkeypatch.delenv(devservers.PORT_ENV, raising=False)
    parent = devservers.default_parent_dir() or tempfile.gettempdir()
    before = _leftovers(parent, "sqla-rebalance-pg-")
    buf = io.StringIO()
    stats = run_demo(duration=10.0, threads=4, recycle=2.0, jitter=0.5, out=buf, mode="postgres")
    output = buf.getvalue()
    summary = _check_timeline(stats, output)
    # Only statements in flight on the killed server may fail: a handful, about one per thread.
    assert 0 <= summary["killed_in_flight"] <= 2 * summary["threads"]
    assert "statements in flight on h2 when it was killed" in output
    assert "immediate shutdown" in output
    assert all(re.fullmatch(r"127\.0\.0\.[2-5]:\d+", key) for key in summary["hosts"].values())
    # The cluster was stopped and its data removed.
    assert _leftovers(parent, "sqla-rebalance-pg-") <= before


# --------------------------------------------------------------------------- no ``tests`` inside


def _imports_of_tests(path: Path) -> list[str]:
    """``import tests...``, ``from tests...`` and ``"tests.xyz"`` module names in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value] if re.fullmatch(r"tests(\.\w+)*", node.value) else []
        found += [f"{path.name}:{node.lineno}: {n}" for n in names if n.split(".")[0] == "tests"]
    return found


def test_package_source_never_imports_tests():
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in _imports_of_tests(path)]
    assert found == []


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package as a wheel installs it: a wheel built from a copy of the sources (so
    setup.cfg's packages, package data and entry points decide what is in it; nothing
    is written to the checkout), unpacked into a site directory of its own."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(
        PACKAGE, source / "sqla_rebalance", ignore=shutil.ignore_patterns("__pycache__")
    )
    built = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"),
            *("--no-index", "--wheel-dir", str(work / "dist"), str(source)),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
    )
    # The test extra has setuptools>=70.1, which builds wheels with no network.
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (work / "dist").glob("sqla_rebalance-*.whl")
    site = work / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def _run_from_wheel(
    site: Path, tmp_path: Path, code: str, unset: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter that imports the package from the wheel: the
    repository is neither the working directory nor on ``sys.path``."""
    environ = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", *unset}}
    environ["PYTHONPATH"] = str(site)
    return subprocess.run(
        [sys.executable, "-c", code, str(site), str(ROOT)],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
    )


def test_the_wheel_carries_every_module_the_typing_marker_and_the_entry_points(wheel_site):
    modules = {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")}
    shipped = {p.relative_to(wheel_site).as_posix() for p in wheel_site.rglob("*.py")}
    assert modules - shipped == set()
    assert (wheel_site / "sqla_rebalance" / "py.typed").is_file()
    (info,) = wheel_site.glob("sqla_rebalance-*.dist-info")
    points = (info / "entry_points.txt").read_text()
    assert "sqla-rebalance = sqla_rebalance.cli:main" in points
    assert "rebalance = sqla_rebalance.plugin:RebalancePlugin" in points


def test_the_installed_entry_points_work(wheel_site, tmp_path):
    """The console script's entry point and ``plugin=rebalance`` (SQLAlchemy finds it by
    its entry point) from the wheel's metadata."""
    code = (
        _CHECKS
        + """
import contextlib, io
from importlib.metadata import entry_points
from sqlalchemy import create_engine
(script,) = entry_points(group="console_scripts", name="sqla-rebalance")
(plugin,) = entry_points(group="sqlalchemy.plugins", name="rebalance")
for point in (script, plugin):  # the wheel's metadata, not the checkout's editable install
    assert str(point.dist.locate_file("")).startswith(site), point.dist.locate_file("")
main = script.load()
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        main(["demo", "--help"])
    except SystemExit as exit:
        assert exit.code in (0, None), exit.code
assert "--postgres" in out.getvalue(), out.getvalue()
engine = create_engine("sqlite:///app.db?plugin=rebalance&rebalance_pool_name=wheel")
assert type(engine.pool).__module__ == "sqla_rebalance.pool", type(engine.pool)
assert sys.modules["sqla_rebalance.pool"].__file__.startswith(site)
assert engine.pool.pool_name == "wheel"
engine.dispose()
print("ok")
"""
        + _NO_TESTS
    )
    result = _run_from_wheel(wheel_site, tmp_path, code)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")


# Shared by the two tests below: where the package came from, and that nothing of the
# repository is reachable.
_CHECKS = """
import os, sys
site, root = sys.argv[1:]
import sqla_rebalance
assert sqla_rebalance.__file__.startswith(site), sqla_rebalance.__file__
assert not any(os.path.abspath(p or ".") == root for p in sys.path), sys.path
"""
_NO_TESTS = """
assert not any(m == "tests" or m.startswith("tests.") for m in sys.modules), sorted(sys.modules)
"""


def test_package_imports_no_tests_module(wheel_site, tmp_path):
    code = _CHECKS + "import sqla_rebalance.cli, sqla_rebalance.demo, sqla_rebalance.devservers\n"
    result = _run_from_wheel(wheel_site, tmp_path, code + _NO_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.servers
def test_postgres_demo_servers_need_no_checkout(wheel_site, tmp_path):
    """The demo's PostgreSQL hosts come from the package (``sqla_rebalance.devservers``)."""
    pytest.importorskip("psycopg")
    code = (
        _CHECKS
        + """
import json
from sqla_rebalance.demo.backends import PostgresHosts
hosts = PostgresHosts()
try:
    hosts.prepare()  # starts the four servers and creates the demo's table on each
    result = {
        "keys": hosts.keys,
        "cluster": type(hosts.cluster).__module__,
        "running": [server.is_running() for server in hosts.cluster.servers],
    }
finally:
    hosts.close()
result["stopped"] = not any(server.is_running() for server in hosts.cluster.servers)
print(json.dumps(result))
"""
        + _NO_TESTS
    )
    # Its own cluster: a fixed port would clash with the session's pg_cluster.
    result = _run_from_wheel(wheel_site, tmp_path, code, unset=(devservers.PORT_ENV,))
    assert result.returncode == 0, result.stdout + result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["cluster"] == "sqla_rebalance.devservers.postgres"
    assert all(re.fullmatch(r"127\.0\.0\.[2-5]:\d+", key) for key in found["keys"])
    assert len(found["keys"]) == 4
    assert found["running"] == [True] * 4
    assert found["stopped"]
