"""Session fixtures shared by every test directory (helpers live in tests/helpers.py)."""
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")
