"""Shared fixtures (the helpers they use live in helpers.py), and the switch for slow tests."""

from __future__ import annotations

import os

import pytest

from helpers import tiny_bert, tiny_gpt2


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="run the tests marked slow (or set MOLORA_SLOW=1)")


def pytest_collection_modifyitems(config, items):
    # Slow tests (e.g. the kill -9 loops) stay out of the default run, which must stay fast;
    # each has a fast deterministic counterpart that runs always.
    if config.getoption("--runslow") or os.environ.get("MOLORA_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with MOLORA_SLOW=1 or --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def bert():
    return tiny_bert()


@pytest.fixture
def gpt2():
    return tiny_gpt2()
