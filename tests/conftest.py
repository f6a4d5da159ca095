"""Shared test helpers: where the reference data lives, and small loaders."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd
import pytest

# tests/ mirrors the package's layers in subfolders; the helpers shared by them
# (stored_outputs, reference_harmony, reference_mapping, ...) live here, and a few
# test modules borrow small builders from another layer's tests (test basenames
# are unique, so every folder can be on the path).
_TESTS = Path(__file__).resolve().parent
for _folder in [_TESTS, *sorted(p for p in _TESTS.iterdir() if p.is_dir() and p.name != "data")]:
    sys.path.insert(0, str(_folder))


def shared_data_dir() -> Path | None:
    """``../shared/data`` beside the repository, or ``$HARMONYPY_SHARED_DATA``."""
    env = os.environ.get("HARMONYPY_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for path in candidates:
        if path.is_dir():
            return path
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("reference data ../shared/data not found (set HARMONYPY_SHARED_DATA)")
    return path


def read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t")
