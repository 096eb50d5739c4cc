"""Session fixtures shared by every test directory (helpers live in tests/helpers.py)."""
import logging
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(autouse=True)
def _restore_logging():
    """In-process CLI calls install dist_tune's rank prefix and levels (metrics.rank_logging); undo them so the
    next test's caplog sees plain records."""
    factory, level = logging.getLogRecordFactory(), logging.getLogger().level
    yield
    logging.setLogRecordFactory(factory)
    logging.getLogger().setLevel(level)
