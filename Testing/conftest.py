"""Shared pytest fixtures for every test layer.

``shared_data``: the folder with the project's real development data (DESIGN.md, "Data"). It is
``$MMREG_DATA`` when that variable is set, else ``<repo>/../shared/data``. Tests that need it
take the fixture and are skipped, with the path that was looked at, when the folder is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_path() -> Path:
    """Where the shared data is expected (``$MMREG_DATA`` or ``<repo>/../shared/data``); may not exist."""
    env = os.environ.get("MMREG_DATA")
    return Path(env).expanduser() if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder as a Path; skips the test with a clear reason when it is absent."""
    path = shared_data_path()
    if not path.is_dir():
        pytest.skip(f"shared data folder not found at '{path}' (set MMREG_DATA to the shared data folder)")
    return path


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` (minutes on a 2-core CPU) run only when asked for.

    Ask with ``MMREG_RUN_SLOW=1`` or by selecting them with a marker expression that names them
    (``-m slow``); otherwise they are skipped with that hint.
    """
    if os.environ.get("MMREG_RUN_SLOW", "") not in ("", "0") or "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow test (minutes on a 2-core CPU): set MMREG_RUN_SLOW=1 "
                                   "or select it with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
