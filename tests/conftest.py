"""Shared fixtures: the custom-op library and tiny models built in memory or exported once."""

from __future__ import annotations

import pytest

from onnxprune.runtime import library_path


@pytest.fixture(scope="session")
def ops_library() -> str:
    return library_path()
