"""What the compatibility scripts share: the sdist cache, the expected-differences file,
and the comparison of a run with our pool against a run with the stock one.

Standard library only (the scripts run it before anything is installed or imported).

Outcomes, per test id: ``passed``, ``failed``, ``error``, ``skipped``, ``xfailed``,
``xpassed``, and ``missing`` (collected in one run only).

A test **differs** when the stock run did not fail it (anything but ``failed``/``error``)
and our run did not give the same outcome, nor a pass: it fails or errors only with our
pool, or is skipped or missing only with it (coverage lost), or flips between ``xfailed``
and ``xpassed``. Tests that fail with the stock pool too are ignored; a test that passes
only with ours is reported, not counted against us.

Every difference must match a line of the expected-differences file (``compat/expected.txt``)::

    <suite> <test id> <reason...>

``suite`` is ``sqlalchemy`` (any version), ``sqlalchemy-2.0`` / ``sqlalchemy-2.1`` (one
line of releases), ``django-postgresql``, ``django-mysql`` (and ``django-mysql-mysqldb``, which the
lines for ``django-mysql`` cover). In ``test id``, ``*``
matches any run of characters and nothing else is special (``[`` and ``]`` in pytest
parameter ids are literal). The reason is required; one that starts with ``BUG:`` is a
defect of ours, listed so that CI stays green until it is fixed; one whose first sentence
is ``Intermittent`` is a difference that does not show in every run (it is not reported
when it does not). Lines starting with ``#`` and blank lines are ignored.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPAT_DIR = ROOT / "compat"
CACHE = ROOT / ".compat-cache"
EXPECTED = COMPAT_DIR / "expected.txt"

BAD = frozenset({"failed", "error"})
COLUMNS = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


def log(message: str) -> None:
    print(message, flush=True)


# -- sdists ------------------------------------------------------------------
def sdist(python: str, project: str, version: str, cache: Path = CACHE) -> Path:
    """The unpacked sdist of ``project==version`` in ``cache``, downloaded with pip once."""
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"{project.lower()}-{version}"
    marker = target / ".complete"
    if marker.exists():
        return target
    downloads = cache / "downloads"
    downloads.mkdir(exist_ok=True)
    archive = next(iter(_archives(downloads, project, version)), None)
    if archive is None:
        log(f"downloading the sdist of {project}=={version} with pip")
        subprocess.run(
            [
                python,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--disable-pip-version-check",
                "--no-binary",
                ":all:",
                "--no-deps",
                f"{project}=={version}",
                "-d",
                str(downloads),
            ],
            check=True,
        )
        archive = next(iter(_archives(downloads, project, version)), None)
        if archive is None:
            raise SystemExit(f"pip downloaded no sdist of {project}=={version}")
    if target.exists():
        shutil.rmtree(target)
    staging = cache / f".unpack-{project.lower()}-{version}"
    if staging.exists():
        shutil.rmtree(staging)
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(staging, filter="data")
        else:  # pragma: no cover - Python < 3.10.12 / 3.11.4
            tar.extractall(staging)
    (top,) = staging.iterdir()
    top.rename(target)
    staging.rmdir()
    marker.write_text(archive.name + "\n")
    return target


def _archives(directory: Path, project: str, version: str) -> list[Path]:
    names = {project.lower(), project.lower().replace("-", "_")}
    return [
        p
        for p in directory.glob("*.tar.gz")
        if p.name.lower() in {f"{n}-{version}.tar.gz" for n in names}
    ]


# -- the expected-differences file -------------------------------------------
@dataclasses.dataclass
class Entry:
    suite: str
    pattern: str
    reason: str
    line: int
    regex: re.Pattern[str]
    used: bool = False

    @property
    def bug(self) -> bool:
        return self.reason.startswith("BUG:")

    @property
    def intermittent(self) -> bool:
        return "Intermittent" in self.reason.split(".", 1)[0] or self.reason.startswith(
            "BUG: Intermittent"
        )

    def applies_to(self, suite: str) -> bool:
        # "sqlalchemy" covers "sqlalchemy-2.1"; "sqlalchemy-2.1" covers only itself.
        return suite == self.suite or suite.startswith(self.suite + "-")


def load_expected(path: Path = EXPECTED) -> list[Entry]:
    entries = []
    errors = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 2)
        if len(parts) < 3:
            errors.append(f"{path}:{number}: want '<suite> <test id> <reason>': {raw!r}")
            continue
        suite, pattern, reason = parts
        regex = re.compile(".*".join(re.escape(piece) for piece in pattern.split("*")))
        entries.append(Entry(suite, pattern, reason, number, regex))
    if errors:
        raise SystemExit("\n".join(errors))
    return entries


# -- comparison ----------------------------------------------------------------
@dataclasses.dataclass
class Comparison:
    suite: str
    stock: Mapping[str, str]
    ours: Mapping[str, str]
    expected: list[tuple[str, str, str, Entry]]  # test, stock, ours, entry
    unexpected: list[tuple[str, str, str]]
    better: list[tuple[str, str, str]]  # fails with stock, passes with ours
    stale: list[Entry]

    @property
    def ok(self) -> bool:
        return not self.unexpected


def differs(stock: str, ours: str) -> bool:
    return stock not in BAD and ours not in (stock, "passed")


def compare(
    suite: str,
    stock: Mapping[str, str],
    ours: Mapping[str, str],
    entries: Iterable[Entry],
) -> Comparison:
    mine = [e for e in entries if e.applies_to(suite)]
    expected, unexpected, better = [], [], []
    for test in sorted(set(stock) | set(ours)):
        s, o = stock.get(test, "missing"), ours.get(test, "missing")
        if differs(s, o):
            entry = next((e for e in mine if e.regex.fullmatch(test)), None)
            if entry is None:
                unexpected.append((test, s, o))
            else:
                entry.used = True
                expected.append((test, s, o, entry))
        elif s in BAD and o == "passed":
            better.append((test, s, o))
    stale = [e for e in mine if not e.used and not e.intermittent]
    return Comparison(suite, stock, ours, expected, unexpected, better, stale)


def counts(outcomes: Mapping[str, str]) -> dict[str, int]:
    c = collections.Counter(outcomes.values())
    return {k: c.get(k, 0) for k in COLUMNS}


def report(cmp: Comparison, details: Mapping[str, str], title: str) -> None:
    """Print the counts, the expected and unexpected differences, and stale entries."""
    log("")
    log(f"== {title}")
    header = f"   {'':6}" + "".join(f"{k:>9}" for k in COLUMNS) + f"{'total':>9}"
    log(header)
    for name, outcomes in (("stock", cmp.stock), ("ours", cmp.ours)):
        c = counts(outcomes)
        log(f"   {name:6}" + "".join(f"{c[k]:>9}" for k in COLUMNS) + f"{len(outcomes):>9}")
    bugs = sum(1 for *_, e in cmp.expected if e.bug)
    log(
        f"   differences: {len(cmp.expected)} expected ({bugs} of them known bugs), "
        f"{len(cmp.unexpected)} unexpected"
    )
    for test, s, o, entry in cmp.expected:
        log(f"     expected  {test}  [stock {s}, ours {o}]  line {entry.line}")
    for test, s, o in cmp.better:
        log(f"     better    {test}  [stock {s}, ours {o}]")
    for entry in cmp.stale:
        log(
            f"   note: {EXPECTED.name}:{entry.line} ({entry.suite} {entry.pattern}) matched no "
            "difference in this run: remove it if the difference is gone for good"
        )
    for test, s, o in cmp.unexpected:
        log(f"   UNEXPECTED DIFFERENCE: {test}  [stock {s}, ours {o}]")
        text = details.get(test)
        if text:
            for line in text.splitlines()[-25:]:
                log(f"       | {line}")
    if cmp.unexpected:
        log(
            f"   {len(cmp.unexpected)} unexpected difference(s): fix the pool, or, if it is a "
            f"documented semantic difference, add a line with its reason to {EXPECTED}"
        )


def write_summary(path: Path, cmp: Comparison, extra: Mapping[str, object]) -> None:
    """A JSON summary (``compat.sh`` prints the table of every suite from these)."""
    data = {
        "suite": cmp.suite,
        "stock": counts(cmp.stock),
        "ours": counts(cmp.ours),
        "expected": len(cmp.expected),
        "bugs": sum(1 for *_, e in cmp.expected if e.bug),
        "unexpected": [t for t, _, _ in cmp.unexpected],
        "stale": [e.line for e in cmp.stale],
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True))


def python_version_of(python: str, module: str) -> str:
    out = subprocess.run(
        [python, "-c", f"import {module}; print({module}.__version__)"],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


if __name__ == "__main__":  # pragma: no cover
    sys.exit("a helper module of scripts/compat_*.py")
