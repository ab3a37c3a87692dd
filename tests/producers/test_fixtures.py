"""Issue 22: models from other producers (Keras/tf2onnx, Flax NNX/jax2onnx, scikit-learn/skl2onnx).

The fixtures in ``models/producers`` were exported once by that folder's ``make_*.py`` scripts,
each in its framework's own environment; this file needs none of those frameworks (onnx,
onnxruntime, numpy and the converter only). For every fixture:

* ``test_fixture_is_valid``: it loads and passes ``onnx.checker`` (full check);
* ``test_onnx_equals_framework``: onnxruntime's outputs on the saved sample inputs equal the
  framework's own saved outputs (float outputs within :data:`measure.TOLERANCES`, labels exactly);
* ``test_fuse_keeps_outputs``: ``converter.fuse_file`` with the defaults (validation on) exits
  cleanly, validates whatever it changed, and the result passes the checker and still equals the
  framework;
* ``test_fuse_reaches_hand_folded``: the fused model is as far as a hand-folded one
  (``manifest.json``): its linear-op count, no BatchNormalization or free fold left, no op count
  over the manifest's bounds, no onnxruntime fused kernel lost. Today's engine reaches few of
  them: those in :data:`NOT_YET` are ``xfail(strict=True)`` with what is left, so each turns into
  a failure the day the engine gets there, and its entry goes.

Each fixture is fused once per worker. Every fuse appends one JSON record (counts original ->
fused vs hand-folded, validation, what is left) to ``producers-record.jsonl`` in pytest's base
temp folder; ``benchmarks/producers.py`` prints the same as a table.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

from . import measure

FIXTURES = measure.fixtures()
MAX_BYTES = 200_000

# What keeps each fixture from its hand-folded form with today's engine, in words.
NOT_YET: dict[str, str] = {}


def _cases(marked: bool) -> list:
    return [
        pytest.param(
            name,
            id=name,
            marks=[pytest.mark.xfail(reason=NOT_YET[name], strict=True)]
            if marked and name in NOT_YET
            else [],
        )
        for name in FIXTURES
    ]


@pytest.fixture(scope="session")
def fused_results() -> dict[str, measure.Fused]:
    """Each fixture fused at most once per worker (lazily: a ``-k`` run fuses only what it needs)."""
    return {}


def _fused(fused_results: dict, tmp_path_factory, name: str) -> measure.Fused:
    if name not in fused_results:
        out = tmp_path_factory.mktemp(f"fused-{name}")
        result = measure.fuse(FIXTURES[name], out)
        fused_results[name] = result
        base = tmp_path_factory.getbasetemp()
        root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
        with open(root / "producers-record.jsonl", "a") as f:
            f.write(json.dumps(result.to_dict(), default=str) + "\n")
    return fused_results[name]


def test_manifest_lists_every_fixture():
    on_disk = {p.stem for p in measure.FIXTURES.glob("*.onnx")}
    assert on_disk == set(FIXTURES)
    for fixture in FIXTURES.values():
        assert fixture.samples.exists(), fixture.name
        assert fixture.path.stat().st_size < MAX_BYTES, fixture.name
        assert fixture.producer in measure.TOLERANCES, fixture.name
        assert fixture.why and fixture.hand_folded >= 1, fixture.name


@pytest.mark.parametrize("name", _cases(marked=False))
def test_fixture_is_valid(name):
    fixture = FIXTURES[name]
    model = onnx.load(fixture.path)

    onnx.checker.check_model(model, full_check=True)

    inputs, outputs = measure.load_samples(fixture)
    assert sorted(i.name for i in model.graph.input) == sorted(inputs)
    assert sorted(o.name for o in model.graph.output) == sorted(outputs)
    # The hand-folded model has at most what the export has: a count above it is a manifest slip.
    assert measure.count_linear(model) >= fixture.hand_folded


@pytest.mark.parametrize("name", _cases(marked=False))
def test_onnx_equals_framework(name):
    fixture = FIXTURES[name]
    inputs, expected = measure.load_samples(fixture)
    atol, rtol = measure.tolerance(fixture)

    actual = measure.run(fixture.path, inputs)

    for key, want in expected.items():
        if want.dtype.kind in "iub":
            np.testing.assert_array_equal(actual[key], want, err_msg=key)
        else:
            np.testing.assert_allclose(actual[key], want, atol=atol, rtol=rtol, err_msg=key)


@pytest.mark.parametrize("name", _cases(marked=False))
def test_fuse_keeps_outputs(fused_results, tmp_path_factory, record_property, name):
    result = _fused(fused_results, tmp_path_factory, name)
    record_property(
        "linear", f"{result.linear_before} -> {result.linear_after} ({result.fixture.hand_folded})"
    )

    assert result.error is None, result.error
    assert result.validated or not result.modified
    assert result.checker is None, result.checker
    assert not result.output_errors, result.output_errors


@pytest.mark.parametrize("name", _cases(marked=True))
def test_fuse_reaches_hand_folded(fused_results, tmp_path_factory, name):
    result = _fused(fused_results, tmp_path_factory, name)

    assert result.reached, "; ".join(result.left())
