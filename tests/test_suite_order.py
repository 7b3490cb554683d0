"""The suite's long files start first (conftest.LONG_FILES), in the order given."""

from __future__ import annotations

import tomllib

from conftest import LONG_FILES, PROJECT_ROOT


def test_every_long_file_exists_and_xdist_keeps_their_order() -> None:
    # A renamed file would silently go back to the end of the queue.
    assert [name for name in LONG_FILES if not (PROJECT_ROOT / "tests" / name).is_file()] == []
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "--no-loadscope-reorder" in pyproject["tool"]["pytest"]["ini_options"]["addopts"].split()
