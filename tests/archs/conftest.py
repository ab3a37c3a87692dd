"""The ``cache_dir`` fixture: one folder per run for the architectures' exports (``archs.cache``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .cache import shared_dir


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder per run, shared by xdist workers (their base temps are its children)."""
    return shared_dir(tmp_path_factory)
