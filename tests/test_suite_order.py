"""The suite's long files start first (conftest.LONG_FILES), in the order given."""

from __future__ import annotations

import tomllib
from pathlib import Path
from types import SimpleNamespace

from conftest import LONG_FILES, PROJECT_ROOT, pytest_collection_modifyitems


def test_every_long_file_exists_and_xdist_keeps_their_order() -> None:
    # A renamed file would silently go back to the end of the queue.
    assert [name for name in LONG_FILES if not (PROJECT_ROOT / "tests" / name).is_file()] == []
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "--no-loadscope-reorder" in pyproject["tool"]["pytest"]["ini_options"]["addopts"].split()


def test_collection_puts_the_long_files_first_longest_first_and_keeps_the_rest_in_order() -> None:
    names = ["test_a.py", LONG_FILES[1], "test_b.py", LONG_FILES[0], "test_a.py", LONG_FILES[1]]
    items = [SimpleNamespace(path=Path("tests") / name, index=index) for index, name in enumerate(names)]
    pytest_collection_modifyitems(items)  # type: ignore[arg-type]
    assert [item.index for item in items] == [3, 1, 5, 0, 2, 4]
