"""Tests of converter.equivalence.sides and the sessions built from them: a model file is read as
its checked proto, and the whole onnx_ir model is built only for the float64 reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter.equivalence import runtime, sides
from converter.equivalence.inputs import describe_input, model_inputs, synthesize_inputs
from converter.equivalence.validate import check_equivalence
from converter.errors import UnsafeModelError
from converter.model_io import files as io

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def _indexing_model() -> onnx.ModelProto:
    """Integer inputs used as Gather indices (main graph, inside an If branch, an initializer
    listed among the inputs), a symbolic dim shared by two inputs."""
    table = numpy_helper.from_array(np.ones((5, 4), np.float32), "table")
    wide = numpy_helper.from_array(np.ones((2, 9), np.float32), "wide")
    branch = helper.make_graph(
        [
            helper.make_node("Gather", ["local", "j"], ["g2"], axis=1),
            helper.make_node("Identity", ["wide"], ["inner"]),
            helper.make_node("Gather", ["inner", "k"], ["g3"], axis=1),
        ],
        "branch",
        [],
        [
            helper.make_tensor_value_info("g2", F, None),
            helper.make_tensor_value_info("g3", F, None),
        ],
        value_info=[  # onnx_ir reads a subgraph's value info for its own values only
            helper.make_tensor_value_info("local", F, [2, 7]),
            helper.make_tensor_value_info("inner", F, [2, 6]),
        ],
    )
    nodes = [
        helper.make_node("Gather", ["table", "i"], ["g"]),
        helper.make_node("Mul", ["wide", "wide"], ["local"]),
        helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
        helper.make_node("Greater", ["m", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["o", "o2"], then_branch=branch, else_branch=branch),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", F, ["batch", "n"]),
            helper.make_tensor_value_info("i", I64, ["batch", "n"]),
            helper.make_tensor_value_info("j", I64, [3]),
            helper.make_tensor_value_info("k", I64, [20]),
            helper.make_tensor_value_info("table", F, [5, 4]),
        ],
        [helper.make_tensor_value_info(n, F, None) for n in ("g", "o", "o2")],
        [table, wide, numpy_helper.from_array(np.zeros((), np.float32), "zero")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_interface_of_a_file_draws_the_inputs_the_whole_model_draws(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_indexing_model(), path)
    side = sides.load_side(path, "original")
    whole = io.load_model(path)
    assert not side.loaded
    assert (
        [describe_input(v) for v in model_inputs(side.interface)]
        == [describe_input(v) for v in model_inputs(whole)]
        == ["float32[batch,n]", "int64[batch,n]", "int64[3]", "int64[20]"]
    )
    for trial in range(3):
        got = synthesize_inputs(side.interface, trial=trial, seed=4)
        want = synthesize_inputs(whole, trial=trial, seed=4)
        assert got.dims == want.dims and got.description == want.description
        for name, array in want.values.items():
            np.testing.assert_array_equal(got.values[name], array)
        assert got.values["i"].max() < 5 and got.values["k"].max() < 6  # the tables' sizes
    assert not side.loaded


def test_first_produced_follows_the_graph_order_in_proto_and_model(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_indexing_model(), path)
    side = sides.load_side(path, "original")
    names = {"o", "local", "c", "x"}
    assert side.first_produced(names) == "local"
    assert side.first_produced({"x", "table"}) == "table"  # no producing node: by name
    assert side.first_produced(set()) is None
    assert side.model is not None and side.loaded
    assert side.first_produced(names) == "local"


def test_a_file_is_deserialised_only_when_the_float64_reference_runs(tmp_path, monkeypatch):
    from test_validate import _cancelling_pair, _two_layers

    calls = []
    real = ir.serde.deserialize_model
    monkeypatch.setattr(sides.ir.serde, "deserialize_model", lambda p: calls.append(1) or real(p))
    onnx.save(_two_layers(), tmp_path / "a.onnx")
    onnx.save(_two_layers(shift_h=True), tmp_path / "b.onnx")
    report = check_equivalence(tmp_path / "a.onnx", tmp_path / "b.onnx", extra_outputs=["h"])
    assert report.passed and report.reference == "not needed" and calls == []
    assert not report.intermediates[0].passed  # h measured from the files' own protos

    original, candidate = _cancelling_pair(noise=0.0)
    onnx.save(original, tmp_path / "c.onnx")
    onnx.save(candidate, tmp_path / "d.onnx")
    report = check_equivalence(tmp_path / "c.onnx", tmp_path / "d.onnx", extra_outputs=["xx"])
    assert report.passed and report.reference == "used" and calls == [1]  # the original only
    assert report.intermediates[0].reason.startswith("not measured: the value no longer")


def test_a_file_with_unsafe_external_data_is_refused_before_anything_runs(tmp_path):
    model = _indexing_model()
    table = model.graph.initializer[0]
    table.ClearField("float_data")
    table.ClearField("raw_data")
    table.data_location = TensorProto.EXTERNAL
    table.external_data.add(key="location", value="../secret.bin")
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(UnsafeModelError, match=r"m\.onnx: tensor 'table'"):
        check_equivalence(tmp_path / "m.onnx", tmp_path / "m.onnx")


def _many_chains(count: int) -> onnx.ModelProto:
    """``count`` chains ``x -> Gemm -> Relu`` summed: 2 small initializers each."""
    rng = np.random.default_rng(3)
    nodes, inits, outs = [], [], []
    for i in range(count):
        w = numpy_helper.from_array(rng.uniform(-1, 1, (2, 4)).astype(np.float32), f"w{i}")
        b = numpy_helper.from_array(rng.uniform(-1, 1, 2).astype(np.float32), f"b{i}")
        inits += [w, b]
        nodes += [
            helper.make_node("Gemm", ["x", f"w{i}", f"b{i}"], [f"h{i}"], transB=1),
            helper.make_node("Relu", [f"h{i}"], [f"r{i}"]),
        ]
        outs.append(f"r{i}")
    nodes.append(helper.make_node("Sum", outs, ["y"]))
    graph = helper.make_graph(
        nodes,
        "chains",
        [helper.make_tensor_value_info("x", F, ["batch", 4])],
        [helper.make_tensor_value_info("y", F, ["batch", 2])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_onnxruntime_keeps_initializers_only_of_small_models_with_many(tmp_path):
    assert runtime._keep_initializers(1_000, b"\0" * 100_000)
    assert not runtime._keep_initializers(100, b"\0" * 100_000)  # few: the write costs more
    assert not runtime._keep_initializers(1_000, b"location" + b"\0" * 1_000)  # external data
    assert not runtime._keep_initializers(10**6, b"\0" * (runtime._KEEP_MAX_BYTES + 1))


@pytest.mark.parametrize("saving_fails", [False, True])
def test_a_session_keeping_initializers_computes_what_a_plain_one_does(
    tmp_path, monkeypatch, saving_fails
):
    path = tmp_path / "m.onnx"
    onnx.save(_many_chains(300), path)
    side = sides.load_side(path, "original")
    assert sides.expose(side, ["h7", "r299"]) == []
    real = ort.InferenceSession
    kept = []

    def session(source, options, **kwargs):
        kept.append(bool(options.optimized_model_filepath))
        if saving_fails and options.optimized_model_filepath:
            raise RuntimeError("cannot save")
        return real(source, options, **kwargs)

    monkeypatch.setattr(runtime.ort, "InferenceSession", session)
    runner = runtime.open_session(side, str(tmp_path), "original")
    assert kept == ([True, False] if saving_fails else [True])
    x = np.random.default_rng(0).uniform(-1, 1, (3, 4)).astype(np.float32)
    got = runner.run({"x": x})
    plain = real(str(path), runtime._session_options(), providers=["CPUExecutionProvider"])
    assert list(got) == ["y", "h7", "r299"]
    np.testing.assert_array_equal(got["y"], plain.run(["y"], {"x": x})[0])
    w, b = (numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer[14:16])
    np.testing.assert_allclose(got["h7"], x @ w.T + b, rtol=1e-6, atol=1e-6)
