"""Session-wide fixtures: the demo repository's artifacts and one shared demo server."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.repos import DEMO, build_demo_module
from tests.server import LadleServer

# LLM engines (in-process and in test servers) run eagerly unless a test asks for torch.compile: a background compile
# per engine would load the 2-core box under every timing-sensitive test. Compiled engines have their own tests.
os.environ.setdefault("LADLE_ENFORCE_EAGER", "1")
# Compiled engines call their kernels from generated Python, not inductor's C++ wrapper (the CPU default): the C++
# compile doubles each cold compile (~10 -> ~20 s for a tiny model), and the kernels are the same. Tests that compile
# with the C++ wrapper say so (test_compiled.py).
os.environ.setdefault("LADLE_CPP_WRAPPER", "0")


@pytest.fixture(scope="session")
def demo_repository():
    """examples/models with its artifacts built (what `make install` does)."""
    build_demo_module().build(DEMO, log=lambda _msg: None)
    return DEMO


@pytest.fixture(scope="session")
def demo_server(demo_repository) -> Iterator[LadleServer]:
    with LadleServer([demo_repository]) as server:
        yield server
