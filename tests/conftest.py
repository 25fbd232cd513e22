"""Fixtures shared by the test modules (importable helpers live in ``helpers.py``)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """Environment for a ``streamexec`` subprocess: its own compile cache and TMPDIR (spill
    files), so runs neither share state with each other nor leave files in the real ones."""
    cache = tmp_path_factory.mktemp("cache")
    scratch = tmp_path_factory.mktemp("tmp")
    return dict(os.environ, STREAMEXEC_CACHE=str(cache), TMPDIR=str(scratch))
