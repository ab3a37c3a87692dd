"""Tests of converter.equivalence.inputs: synthetic trial inputs and real inputs from .npz files."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter.equivalence.inputs import (
    TrialInputs,
    check_inputs,
    describe_input,
    load_inputs_npz,
    synthesize_inputs,
)
from converter.errors import InputError

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def _model(inputs, nodes=(), initializers=(), outputs=None) -> ir.Model:
    """An IR model with the given ``(name, elem_type, shape)`` inputs; outputs default to them."""
    values = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
    if outputs is None:
        nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n, _, _ in inputs]
        outputs = [helper.make_tensor_value_info(f"{n}_out", t, s) for n, t, s in inputs]
    graph = helper.make_graph(list(nodes), "g", values, outputs, list(initializers))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(proto)


def _gather_model(table_rows: int | str, axis: int = 0) -> ir.Model:
    """``y = Gather(table, ids)``; the table is an initializer or (symbolic) a graph input."""
    ids = ("ids", I64, ["batch", "seq"])
    node = helper.make_node("Gather", ["table", "ids"], ["y"], axis=axis)
    y = helper.make_tensor_value_info("y", F, None)
    if isinstance(table_rows, int):
        table = np.zeros((table_rows, 4) if axis == 0 else (4, table_rows), np.float32)
        init = numpy_helper.from_array(table, "table")
        return _model([ids], [node], [init], outputs=[y])
    return _model([("table", F, [table_rows, 4]), ids], [node], outputs=[y])


# --------------------------------------------------------------------------- sizes


def test_dims_sharing_a_name_share_a_value():
    model = _model([("a", F, ["batch", "seq", 4]), ("b", F, ["batch", "seq"])])
    trial = synthesize_inputs(model)
    assert trial.values["a"].shape[:2] == trial.values["b"].shape
    assert trial.dims == {"batch": 2, "seq": 5}
    assert trial.values["a"].shape == (2, 5, 4)


def test_unnamed_dims_get_the_documented_defaults():
    model = _model([("x", F, [None, None, None])])
    assert synthesize_inputs(model, trial=0).values["x"].shape == (2, 3, 3)
    assert synthesize_inputs(model, trial=1).values["x"].shape == (3, 4, 4)


def test_minus_one_dims_are_dynamic_not_fixed():
    """Paddle and some other exporters write dim_value -1 for an unknown size."""
    model = _model([("x", F, [-1, 3, -1, -1])])
    assert synthesize_inputs(model, trial=0).values["x"].shape == (2, 3, 3, 3)
    real = {"x": np.zeros((1, 3, 48, 192), np.float32)}
    assert check_inputs(model, real).values["x"].shape == (1, 3, 48, 192)
    assert describe_input(model.graph.inputs[0]) == "float32[?,3,?,?]"


def test_question_mark_dims_are_placeholders_not_shared_names():
    model = _model([("x", F, ["?", 3, "?", "?"])])
    assert check_inputs(model, {"x": np.zeros((1, 3, 48, 192), np.float32)}).dims == {}
    assert synthesize_inputs(model, trial=0).values["x"].shape == (2, 3, 3, 3)


def test_two_trials_use_different_sizes_none_square_or_equal():
    model = _model([("x", F, ["batch", "seq", "hidden"])])
    first, second = (synthesize_inputs(model, trial=i).values["x"].shape for i in (0, 1))
    assert all(a != b for a, b in zip(first, second, strict=True))
    assert len(set(first)) == 3 and len(set(second)) == 3
    assert synthesize_inputs(model, trial=2).values["x"].shape == first  # sizes A again


def test_input_shapes_override_binds_the_symbols_other_inputs_use():
    model = _model([("x", F, ["batch", "seq"]), ("mask", F, ["seq"])])
    for trial in (0, 1):
        out = synthesize_inputs(model, trial=trial, input_shapes={"x": [4, 10]})
        assert out.values["x"].shape == (4, 10)
        assert out.values["mask"].shape == (10,)
        assert out.dims == {"batch": 4, "seq": 10}


@pytest.mark.parametrize(
    ("shapes", "words"),
    [
        ({"nope": [1]}, ["'nope'", "not a model input"]),
        ({"x": [2]}, ["x", "rank 1", "float32[batch,3]"]),
        ({"x": [2, 4]}, ["x", "dim 1", "dim 1 must be 3"]),
        ({"x": [2, -1]}, ["x", ">= 0"]),
    ],
)
def test_bad_input_shapes_raise_input_error_naming_the_input(shapes, words):
    model = _model([("x", F, ["batch", 3])])
    with pytest.raises(InputError) as e:
        synthesize_inputs(model, input_shapes=shapes)
    for word in words:
        assert word in str(e.value)


def test_conflicting_overrides_of_a_shared_symbol_raise():
    model = _model([("x", F, ["batch", 3]), ("y", F, ["batch"])])
    with pytest.raises(InputError, match="'batch'"):
        synthesize_inputs(model, input_shapes={"x": [2, 3], "y": [5]})


def test_unknown_rank_needs_an_input_shape():
    model = _model([("x", F, None)])
    with pytest.raises(InputError, match=r"unknown rank.*--input-shape x:"):
        synthesize_inputs(model)
    assert synthesize_inputs(model, input_shapes={"x": [3, 2]}).values["x"].shape == (3, 2)


# --------------------------------------------------------------------------- values


def test_float_values_are_signed_and_every_third_trial_is_large():
    model = _model([("x", F, [64, 64]), ("h", TensorProto.FLOAT16, [64])])
    small = synthesize_inputs(model, trial=0).values
    large = synthesize_inputs(model, trial=2).values
    assert small["x"].dtype == np.float32 and small["h"].dtype == np.float16
    assert small["x"].min() < -0.9 and small["x"].max() > 0.9
    assert np.abs(small["x"]).max() <= 1.0
    assert large["x"].min() < -7 and large["x"].max() > 7 and np.abs(large["x"]).max() <= 8.0


def test_ints_are_small_non_negative_bools_have_both_values_strings_are_text():
    model = _model(
        [
            ("i", I64, [100]),
            ("u", TensorProto.UINT8, [100]),
            ("b", TensorProto.BOOL, [2]),
            ("s", TensorProto.STRING, ["batch"]),
        ]
    )
    for trial in range(3):
        values = synthesize_inputs(model, trial=trial).values
        assert values["i"].dtype == np.int64 and values["u"].dtype == np.uint8
        assert values["i"].min() >= 0 and values["i"].max() < 8 and len(set(values["i"])) > 2
        assert set(values["b"].tolist()) == {False, True}
        assert values["s"].dtype == object and all(isinstance(v, str) for v in values["s"])


@pytest.mark.parametrize("axis", [0, 1])
def test_gather_indices_stay_below_the_table_size(axis):
    model = _gather_model(3, axis=axis)
    for trial in range(3):
        ids = synthesize_inputs(model, trial=trial).values["ids"]
        assert ids.min() >= 0 and ids.max() < 3 and ids.size > 3


def test_gather_indices_follow_a_symbolic_table_size():
    model = _gather_model("vocab")
    out = synthesize_inputs(model, input_shapes={"table": [2, 4]})
    assert out.values["ids"].max() < 2


def test_synthesis_is_seeded():
    model = _model([("x", F, ["batch", 8])])
    first = synthesize_inputs(model, seed=7).values["x"]
    np.testing.assert_array_equal(first, synthesize_inputs(model, seed=7).values["x"])
    assert not np.array_equal(first, synthesize_inputs(model, seed=8).values["x"])


def test_trial_summary_is_json_friendly():
    model = _model([("x", F, ["batch", 4])])
    summary = synthesize_inputs(model, trial=1).to_dict()
    assert summary == {
        "index": 1,
        "description": "uniform[-1,1], sizes B",
        "dims": {"batch": 3},
        "inputs": {"x": {"shape": [3, 4], "dtype": "float32"}},
    }


def test_describe_input():
    model = _model([("x", F, ["batch", None, 3])])
    assert describe_input(model.graph.inputs[0]) == "float32[batch,?,3]"


# --------------------------------------------------------------------------- real inputs


def _two_input_model() -> ir.Model:
    return _model([("x", F, ["batch", 3]), ("ids", I64, ["batch"])])


def test_npz_inputs_load_in_model_order(tmp_path):
    path = tmp_path / "in.npz"
    np.savez(path, ids=np.zeros(2, np.int64), x=np.ones((2, 3), np.float32))
    trial = load_inputs_npz(path, _two_input_model())
    assert isinstance(trial, TrialInputs)
    assert list(trial.values) == ["x", "ids"]
    assert trial.dims == {"batch": 2}
    assert "in.npz" in trial.description


@pytest.mark.parametrize(
    ("arrays", "words"),
    [
        ({"x": np.ones((2, 3), np.float32)}, ["no array for model input 'ids'", "int64[batch]"]),
        (
            {"x": np.ones((2, 3), np.float32), "ids": np.zeros(2, np.int64), "extra": np.ones(1)},
            ["'extra'", "not an input", "x, ids"],
        ),
        (
            {"x": np.ones((2, 3), np.float64), "ids": np.zeros(2, np.int64)},
            ["'x'", "float64", "float32[batch,3]"],
        ),
        (
            {"x": np.ones((2, 3, 1), np.float32), "ids": np.zeros(2, np.int64)},
            ["'x'", "rank 3", "rank 2", "float32[batch,3]"],
        ),
        (
            {"x": np.ones((2, 4), np.float32), "ids": np.zeros(2, np.int64)},
            ["'x'", "(2, 4)", "dim 1 must be 3"],
        ),
        (
            {"x": np.ones((2, 3), np.float32), "ids": np.zeros(5, np.int64)},
            ["'ids'", "'batch' = 5", "'x'", "'batch' = 2"],
        ),
    ],
    ids=["missing", "unknown", "dtype", "rank", "fixed-dim", "shared-symbol"],
)
def test_npz_problems_raise_input_error_naming_the_input(tmp_path, arrays, words):
    path = tmp_path / "in.npz"
    np.savez(path, **arrays)
    with pytest.raises(InputError) as e:
        load_inputs_npz(path, _two_input_model())
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("content", [b"not a zip", None])
def test_unreadable_npz_raises_input_error(tmp_path, content):
    path = tmp_path / "in.npz"
    if content is None:
        np.save(path.with_suffix(".npy"), np.ones(3))
        path = path.with_suffix(".npy")
    else:
        path.write_bytes(content)
    with pytest.raises(InputError, match=r"in\.np"):
        load_inputs_npz(path, _two_input_model())


def test_missing_npz_file_raises_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot read inputs file"):
        load_inputs_npz(tmp_path / "absent.npz", _two_input_model())


def test_bfloat16_arrays_saved_by_numpy_are_accepted(tmp_path):
    model = _model([("x", TensorProto.BFLOAT16, [3])])
    path = tmp_path / "in.npz"
    np.savez(path, x=np.array([1, 2, 3], ml_dtypes.bfloat16))  # stored as raw 2-byte void
    values = load_inputs_npz(path, model).values
    assert values["x"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(values["x"].astype(np.float32), [1, 2, 3])


def test_check_inputs_accepts_a_mapping_and_string_arrays():
    model = _model([("s", TensorProto.STRING, [2])])
    trial = check_inputs(model, {"s": np.array(["a", "b"])})
    assert trial.values["s"].dtype == object and trial.description == "real inputs"
