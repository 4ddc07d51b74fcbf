"""Shared fixtures (the helpers they use live in helpers.py)."""

from __future__ import annotations

import pytest

from helpers import tiny_bert, tiny_gpt2


@pytest.fixture
def bert():
    return tiny_bert()


@pytest.fixture
def gpt2():
    return tiny_gpt2()
