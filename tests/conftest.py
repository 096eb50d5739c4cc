"""Session fixtures shared by every test directory (helpers live in tests/helpers.py)."""
import logging
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(autouse=True)
def _restore_logging():
    """In-process CLI calls install dist_tune's rank prefix and levels (logs.rank_logging); undo them so the
    next test's caplog sees plain records."""
    factory, level = logging.getLogRecordFactory(), logging.getLogger().level
    yield
    logging.setLogRecordFactory(factory)
    logging.getLogger().setLevel(level)


@pytest.fixture(autouse=True)
def _restore_environment():
    """In-process CLI calls may export the launcher's variables (a DeepSpeed run alone gets a one-rank group and
    LOCAL_RANK etc.); undo them so the next test's cluster detection sees the environment it set."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)
