"""Shared pytest options: ``--corpus=full|sample`` picks how much of the ONNX corpus to run.

Importing this also sets ``ONNX_FUSE_CHECK_EVERY_REWRITE=1`` (unless set): every fusion in the
suite checks the IR invariants after each merge, not only at the end.
"""

from __future__ import annotations

import os

import pytest

# Every merge in the suite is followed by a whole-model invariant check (converter.fusion.engine).
os.environ.setdefault("ONNX_FUSE_CHECK_EVERY_REWRITE", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--corpus",
        choices=("full", "sample"),
        default=os.environ.get("ONNX_FUSE_CORPUS", "full"),
        help="tests/test_corpus.py: run every ONNX conformance case (full, the default) or a "
        "deterministic sample of them (also settable with ONNX_FUSE_CORPUS=sample)",
    )


@pytest.fixture(scope="session")
def corpus_mode(request: pytest.FixtureRequest) -> str:
    return request.config.getoption("--corpus")
