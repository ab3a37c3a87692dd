"""The collector is paused inside the library's entry points and restored after them."""

from __future__ import annotations

import gc

import onnx
import onnx_ir as ir
import pytest
from builders import linear_chain

import converter
from converter.cli import main
from converter.gcpause import paused_collection


@pytest.fixture
def collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_paused_then_restored_and_nested(collector_on):
    with paused_collection():
        assert not gc.isenabled()
        with paused_collection():
            assert not gc.isenabled()
        assert not gc.isenabled()  # only the outermost block turns it back on
    assert gc.isenabled()


def test_a_disabled_collector_stays_disabled(collector_on):
    gc.disable()
    with paused_collection():
        pass
    assert not gc.isenabled()


def test_restored_after_an_error(collector_on):
    with pytest.raises(ValueError), paused_collection():
        raise ValueError("boom")
    assert gc.isenabled()


def test_fuse_runs_paused_and_restores(collector_on, monkeypatch):
    from converter.fusion import passes

    seen = []
    real = passes._fuse_graphs

    def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(passes, "_fuse_graphs", spy)
    model = ir.serde.deserialize_model(linear_chain([4, 5, 3]))
    converter.fuse(model)
    assert seen == [False] and gc.isenabled()


def test_the_command_line_restores_the_collector(collector_on, tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(linear_chain([4, 5, 3]), src)
    assert main([str(src), "-o", str(tmp_path / "o.onnx"), "-q"]) == 0
    assert gc.isenabled()
