"""``onnx-fuse inspect``: the op table, the fuser's plan, and weights numpy can run."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import gemm_node, init, linear_chain, make_model, rng, run
from onnx import TensorProto, helper

from converter.cli import main

MODELS = Path(__file__).resolve().parent.parent / "models"
M, K, N = 5, 7, 3  # rows, in features, out features


def _gemm_model(
    trans_a: int, trans_b: int, alpha: float, beta: float, bias: str
) -> onnx.ModelProto:
    r = rng(trans_a * 8 + trans_b * 4 + len(bias))
    b = r.standard_normal((N, K) if trans_b else (K, N)).astype(np.float32)
    c = {
        "none": None,
        "scalar": np.float32(0.3),
        "row": r.standard_normal(N),
        "1xN": r.standard_normal((1, N)),
        "MxN": r.standard_normal((M, N)),
        "Mx1": r.standard_normal((M, 1)),
    }[bias]
    inits = [init("B", b)] + ([] if c is None else [init("C", np.asarray(c, np.float32))])
    node = gemm_node("g", "a", "B", None if c is None else "C", "y", transA=trans_a, transB=trans_b)
    node.attribute.extend(
        [helper.make_attribute("alpha", alpha), helper.make_attribute("beta", beta)]
    )
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [K, M] if trans_a else [M, K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])
    return make_model([node], [a], [y], inits)


def _weights(tmp_path: Path, model: onnx.ModelProto, *extra: str) -> dict[str, np.ndarray]:
    src, npz = tmp_path / "m.onnx", tmp_path / "w.npz"
    onnx.save(model, src)
    assert main(["inspect", str(src), "--weights", str(npz), "--json", *extra]) == 0
    with np.load(npz) as archive:
        return dict(archive)


@pytest.mark.parametrize("bias", ["none", "scalar", "row", "1xN", "MxN", "Mx1"])
@pytest.mark.parametrize(("trans_a", "trans_b"), [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_npz_reproduces_gemm_in_every_form(tmp_path, capsys, trans_a, trans_b, bias):
    model = _gemm_model(trans_a, trans_b, alpha=0.7, beta=1.9, bias=bias)
    w = _weights(tmp_path, model)
    assert sorted(w) == ["g.bias", "g.weight"] and w["g.weight"].shape == (K, N)
    a = rng(1).uniform(-1, 1, (K, M) if trans_a else (M, K)).astype(np.float32)
    x = a.T if trans_a else a  # with transA=1 the layer's rows are A's columns
    (expected,) = run(model, {"a": a})
    np.testing.assert_allclose(x @ w["g.weight"] + w["g.bias"], expected, atol=1e-5, rtol=0)
    (op,) = json.loads(capsys.readouterr().out)["ops"]
    assert op["form"].startswith(f"Gemm transA={trans_a} transB={trans_b} alpha=0.7")
    assert op["meaning"].startswith("(out,in): y = x @ W.T + b" if trans_b else "(in,out)")


@pytest.mark.parametrize("bias_first", [False, True])
def test_npz_reproduces_matmul_and_its_bias_add(tmp_path, bias_first):
    model = linear_chain([6, 4], form="matmul", rank=3)
    if bias_first:  # Add(b, MatMul(x, W)): the bias on the left
        add = model.graph.node[1]
        add.input[:] = list(reversed(add.input))
    w = _weights(tmp_path, model)
    x = rng(2).uniform(-1, 1, (2, 3, 6)).astype(np.float32)
    (expected,) = run(model, {"x": x})
    np.testing.assert_allclose(x @ w["mm0.weight"] + w["mm0.bias"], expected, atol=1e-5, rtol=0)


def test_table_lists_each_op_and_the_merge_and_changes_nothing(tmp_path, capsys):
    src = tmp_path / "four_layer.onnx"
    shutil.copy(MODELS / "four_layer.onnx", src)
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    assert main(["inspect", str(src)]) == 0
    text = capsys.readouterr().out
    assert "\033[" not in text  # captured stdout is not a terminal: plain text
    rows = [line for line in text.splitlines() if line.startswith("/") and "Gemm transA" in line]
    assert len(rows) == 4
    assert "(128, 64)" in rows[0] and "64 -> 128" in rows[0] and "y = x @ W.T + b" in rows[0]
    merge = next(line for line in text.splitlines() if line.endswith("merge"))
    assert "64->128->128->64->32" in merge and "34,816 -> 2,048" in merge
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["four_layer.onnx"]


def test_json_gives_the_decision_and_its_reason(capsys):
    assert main(["inspect", str(MODELS / "low_rank.onnx"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [op["weight_shape"] for op in data["ops"]] == [[16, 256], [256, 16]]
    assert data["merges"] == []
    (declined,) = data["declined"]
    assert declined["reason"].startswith("cost model: merging widths 256->16->256")
    assert data["totals"]["linear_ops"] == [2, 2]


def test_recurrent_example_lists_five_layers_and_why_nothing_merges(capsys):
    assert main(["inspect", str(MODELS / "recurrent.onnx"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    shapes = [(op["in_features"], op["out_features"], op["bias"]) for op in data["ops"]]
    assert shapes == [
        (12, 100, [100]),
        (100, 100, None),
        (12, 100, [100]),
        (100, 100, None),
        (100, 6, [6]),
    ]
    assert data["merges"] == [] and data["totals"]["linear_ops"] == [5, 5]


def test_fused_weights_run_the_whole_chain_as_one_layer(tmp_path):
    model = onnx.load(MODELS / "four_layer.onnx")
    w = _weights(tmp_path, model, "--fused")
    (weight,) = [k for k in w if k.endswith(".weight")]
    assert w[weight].shape == (64, 32)
    x = rng(3).uniform(-1, 1, (4, 64)).astype(np.float32)
    (expected,) = run(model, {"x": x})
    bias = w[weight.removesuffix(".weight") + ".bias"]
    np.testing.assert_allclose(x @ w[weight] + bias, expected, atol=1e-5, rtol=0)


def test_conv_and_left_matmul_are_listed_with_their_layout(capsys, tmp_path):
    r = rng(4)
    nodes = [
        helper.make_node("Conv", ["x", "K"], ["c"], name="conv", group=2, pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"], name="flat"),
        helper.make_node("MatMul", ["L", "f"], ["y"], name="left"),
    ]
    inits = [init("K", r.standard_normal((4, 1, 3, 3)).astype(np.float32))]
    inits.append(init("L", r.standard_normal((3, 2)).astype(np.float32)))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2, 1, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])
    src = tmp_path / "m.onnx"
    onnx.save(make_model(nodes, [x], [y], inits), src)
    assert main(["inspect", str(src), "--json"]) == 0
    conv, left = json.loads(capsys.readouterr().out)["ops"]
    assert conv["form"] == "Conv 3x3 groups=2" and conv["weight_shape"] == [4, 1, 3, 3]
    assert (conv["in_features"], conv["out_features"]) == (2, 4)
    assert left["form"] == "left MatMul" and "left operand" in left["note"]


def test_weights_file_is_not_overwritten_without_force(tmp_path, capsys):
    npz = tmp_path / "w.npz"
    npz.write_bytes(b"keep")
    assert main(["inspect", str(MODELS / "two_layer.onnx"), "--weights", str(npz)]) == 2
    assert npz.read_bytes() == b"keep" and "already exists" in capsys.readouterr().err
    assert main(["inspect", str(MODELS / "two_layer.onnx"), "--weights", str(npz), "--force"]) == 0
    assert len(np.load(npz).files) == 4


def test_fused_conv_kernels_are_written_in_onnx_and_torch_layout(tmp_path):
    """A RepVGG-style pair (3x3 + 1x1 summed) fuses to one Conv; its kernel and bias from
    --weights --fused, put in a one-Conv model, reproduce the original."""
    r = rng(5)
    nodes = [
        helper.make_node("Conv", ["x", "K3", "b3"], ["a"], name="conv3", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "K1"], ["c"], name="conv1"),
        helper.make_node("Add", ["a", "c"], ["y"], name="sum"),
    ]
    inits = [
        init("K3", r.standard_normal((4, 3, 3, 3)).astype(np.float32)),
        init("b3", r.standard_normal(4).astype(np.float32)),
        init("K1", r.standard_normal((4, 3, 1, 1)).astype(np.float32)),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 5, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 5, 5])
    model = make_model(nodes, [x], [y], inits)
    w = _weights(tmp_path, model, "--fused")
    (weight,) = [k for k in w if k.endswith(".weight")]
    bias = w[weight.removesuffix(".weight") + ".bias"]
    assert w[weight].shape == (4, 3, 3, 3) and bias.shape == (4,)
    one = make_model(
        [helper.make_node("Conv", ["x", "K", "B"], ["y"], pads=[1, 1, 1, 1])],
        [x],
        [y],
        [init("K", w[weight]), init("B", bias)],
    )
    feeds = {"x": r.uniform(-1, 1, (2, 3, 5, 5)).astype(np.float32)}
    np.testing.assert_allclose(run(one, feeds)[0], run(model, feeds)[0], atol=1e-5, rtol=0)
    (tmp_path / "orig").mkdir()
    original = _weights(tmp_path / "orig", model)  # the unfused model: both kernels, biases
    assert original["conv1.weight"].shape == (4, 3, 1, 1)
    np.testing.assert_array_equal(original["conv1.bias"], np.zeros(4, np.float32))


def test_rewrites_and_patterns_kept_for_the_runtime_are_listed(tmp_path, capsys):
    """Dynamo's GELU between two layers: the reorder is a row, the kept 0.5 says why once."""
    one, half, sqrt2 = (
        init(n, np.array(v, np.float32))
        for n, v in [("one", 1.0), ("half", 0.5), ("sqrt2", 1.4142135)]
    )
    r = rng(2)
    nodes = [
        gemm_node("fc0", "x", "W0", "b0", "h", transB=1),
        helper.make_node("Div", ["h", "sqrt2"], ["d"], name="div"),
        helper.make_node("Erf", ["d"], ["e"], name="erf"),
        helper.make_node("Add", ["e", "one"], ["a"], name="add"),
        helper.make_node("Mul", ["half", "a"], ["ha"], name="mul_half"),
        helper.make_node("Mul", ["h", "ha"], ["g"], name="gelu"),
        gemm_node("fc1", "g", "W1", "b1", "y", transB=1),
    ]
    inits = [
        init("W0", r.standard_normal((6, 4)).astype(np.float32)),
        init("b0", r.standard_normal(6).astype(np.float32)),
        init("W1", r.standard_normal((3, 6)).astype(np.float32)),
        init("b1", r.standard_normal(3).astype(np.float32)),
        one,
        half,
        sqrt2,
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    src = tmp_path / "gelu.onnx"
    onnx.save(make_model(nodes, [x], [y], inits), src)
    assert main(["inspect", str(src)]) == 0
    text = capsys.readouterr().out
    assert "rewrite for the runtime: main graph: GELU at 'gelu' reordered" in text
    assert "kept: part of GELU (erf form)" in text and "keep: kept" not in text
    assert main(["inspect", str(src), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["runtime_rewrites"] == [
        "main graph: GELU at 'gelu' reordered as x * (1 + erf(x / sqrt 2)) * 0.5"
    ]
