"""The docs that are generated from the code are up to date, and cover every argument."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

from sqla_rebalance import RebalancingQueuePool
from sqla_rebalance.parameters import PARAMETERS

ROOT = Path(__file__).resolve().parent.parent


def _gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_parts_are_current():
    gen = _gen_docs()
    for path, _ in gen.REGIONS:
        text = path.read_text()
        assert gen.updated(text, path) == text, "run: .venv/bin/python scripts/gen_docs.py"


def test_every_pool_argument_is_documented():
    gen = _gen_docs()
    own = [p.argument for p in PARAMETERS if not p.sqlalchemy]
    assert own, "no pool arguments found"
    # Each has its text in the table (hence in the pool's docstring and the
    # generated reference)...
    assert [p.argument for p in PARAMETERS if not p.sqlalchemy and not p.doc] == []
    documented = inspect.getdoc(RebalancingQueuePool) or ""
    assert [name for name in own if f":param {name}:" not in documented] == []
    # ...and each is described by hand too (a section, or a row of a table of its own),
    # outside the generated table.
    head, rest = gen.CONFIG.read_text().split(gen.START, 1)
    text = head + rest.split(gen.END, 1)[1]
    missing = [n for n in own if f"### `{n}`" not in text and f"| `{n}` |" not in text]
    assert missing == []
