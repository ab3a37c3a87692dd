"""Tests of converter.equivalence.kernels: what onnxruntime's graph optimiser fuses, and what a fold loses.

Each model is built by hand in the form an exporter writes and run through a real onnxruntime
session (CPU, extended optimisations), so these tests fail if the helper stops seeing the
runtime's graph or if onnxruntime stops fusing a form the engine relies on:

* exact GELU as the TorchScript exporter writes it, ``Mul(Mul(x, Add(Erf(Div(x, sqrt 2)), 1)), 0.5)``,
  is one ``Gelu``; with the ``0.5`` folded into the next MatMul's weight (the same function) none;
* the ``torch.export`` form ``Mul(x, Mul(0.5, Add(...)))`` is never fused, the same ops reordered
  to ``Mul(Mul(x, Add(...)), 0.5)`` are;
* an RMSNorm decomposition with its weight ``Mul`` is one ``SimplifiedLayerNormalization``, and
  without it (the weight folded into the next projection) none.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import init, make_model
from onnx import TensorProto, helper

from converter.equivalence.kernels import (
    FUSED_KERNELS,
    fused_kernels,
    lost_kernels,
    runtime_graph_ops,
)

D, H = 8, 16  # features, hidden width
FLOAT = TensorProto.FLOAT


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    return {
        "W1": r.standard_normal((D, H)).astype(np.float32),
        "b1": r.standard_normal(H).astype(np.float32),
        "W2": r.standard_normal((H, D)).astype(np.float32),
    }


def _scalars(**values: float) -> list[onnx.TensorProto]:
    return [init(name, np.array(v, np.float32)) for name, v in values.items()]


def _model(nodes, weights: dict[str, np.ndarray], scalars: dict[str, float]) -> onnx.ModelProto:
    """``x (2, 4, D) -> nodes -> y (2, 4, D)``, ``weights`` and ``scalars`` as initializers."""
    inits = [init(k, v) for k, v in weights.items()] + _scalars(**scalars)
    x = helper.make_tensor_value_info("x", FLOAT, [2, 4, D])
    y = helper.make_tensor_value_info("y", FLOAT, [2, 4, D])
    return make_model(nodes, [x], [y], inits)


def _gelu_mlp(*, fold_half: bool = False, order: str = "legacy") -> onnx.ModelProto:
    """``MatMul(W1) -> Add(b1) -> GELU -> MatMul(W2)``.

    ``order="legacy"``: GELU as ``Mul(Mul(h, Add(Erf(Div(h, sqrt 2)), 1)), 0.5)``; with
    ``fold_half`` the final ``Mul(0.5)`` is gone and ``W2`` is halved instead (the same function).
    ``order="dynamo"``: ``Mul(h, Mul(0.5, Add(...)))``, as ``torch.export`` writes it at opset 18.
    """
    w = _weights()
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "W1"], ["m"]),
        n("Add", ["m", "b1"], ["h"]),
        n("Div", ["h", "sqrt2"], ["d"]),
        n("Erf", ["d"], ["e"]),
        n("Add", ["e", "one"], ["a"]),
    ]
    scalars = {"sqrt2": math.sqrt(2.0), "one": 1.0, "half": 0.5}
    if order == "dynamo":
        nodes += [n("Mul", ["half", "a"], ["s"]), n("Mul", ["h", "s"], ["g"])]
    elif fold_half:
        nodes += [n("Mul", ["h", "a"], ["g"])]
        w["W2"] = w["W2"] * np.float32(0.5)
        del scalars["half"]
    else:
        nodes += [n("Mul", ["h", "a"], ["p"]), n("Mul", ["p", "half"], ["g"])]
    return _model([*nodes, n("MatMul", ["g", "W2"], ["y"])], w, scalars)


def _rms_norm_head(*, fold_weight: bool = False) -> onnx.ModelProto:
    """``x * (1 / sqrt(mean(x^2) + eps)) * w`` then ``MatMul(W)``, or ``w`` folded into ``W``."""
    r = np.random.default_rng(1)
    weight = (1.0 + 0.3 * r.standard_normal(D)).astype(np.float32)
    head = r.standard_normal((D, D)).astype(np.float32)
    n = helper.make_node
    nodes = [
        n("Pow", ["x", "two"], ["sq"]),
        n("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1),
        n("Add", ["ms", "eps"], ["v"]),
        n("Sqrt", ["v"], ["rt"]),
        n("Div", ["one", "rt"], ["inv"]),  # torch.rsqrt, as the TorchScript exporter writes it
        n("Mul", ["x", "inv"], ["normed"]),
    ]
    weights = {"head": head * weight[:, None] if fold_weight else head}
    if fold_weight:
        nodes.append(n("MatMul", ["normed", "head"], ["y"]))
    else:
        weights["w"] = weight
        nodes += [n("Mul", ["normed", "w"], ["scaled"]), n("MatMul", ["scaled", "head"], ["y"])]
    return _model(nodes, weights, {"two": 2.0, "eps": 1e-6, "one": 1.0})


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options)
    return session.run(None, {"x": x})[0]


def _x() -> np.ndarray:
    return np.random.default_rng(2).standard_normal((2, 4, D)).astype(np.float32)


def test_exact_gelu_is_one_kernel_and_folding_its_half_away_loses_it():
    original, folded = _gelu_mlp(), _gelu_mlp(fold_half=True)
    # the fold is exact: the two models compute the same function
    np.testing.assert_allclose(_run(folded, _x()), _run(original, _x()), atol=1e-5, rtol=1e-5)

    before, after = fused_kernels(original), fused_kernels(folded)

    assert before == {"Gelu": 1}
    assert after == {}
    assert lost_kernels(before, after) == ["Gelu 1 -> 0"]
    # what the runtime runs instead: the elementwise ops, Erf among them
    assert runtime_graph_ops(folded)["Erf"] == 1


def test_dynamo_gelu_order_is_not_fused_and_the_reordered_one_is():
    dynamo = _gelu_mlp(order="dynamo")
    np.testing.assert_allclose(_run(dynamo, _x()), _run(_gelu_mlp(), _x()), atol=1e-5, rtol=1e-5)

    assert "Gelu" not in fused_kernels(dynamo)
    assert fused_kernels(_gelu_mlp())["Gelu"] == 1


def test_rms_norm_weight_is_part_of_the_fused_norm():
    original, folded = _rms_norm_head(), _rms_norm_head(fold_weight=True)
    np.testing.assert_allclose(_run(folded, _x()), _run(original, _x()), atol=1e-4, rtol=1e-4)

    before, after = fused_kernels(original), fused_kernels(folded)

    assert before.get("SimplifiedLayerNormalization") == 1
    assert lost_kernels(before, after) == ["SimplifiedLayerNormalization 1 -> 0"]


def test_a_path_and_a_proto_give_the_same_runtime_graph(tmp_path):
    model = _gelu_mlp()
    path = tmp_path / "gelu.onnx"
    onnx.save(model, path)

    by_path, by_proto = runtime_graph_ops(path), runtime_graph_ops(model)

    assert by_path == by_proto
    assert by_path["Gelu"] == 1 and by_path["MatMul"] >= 1
    assert path.exists() and list(tmp_path.iterdir()) == [path]  # nothing written beside it


@pytest.mark.parametrize(
    ("before", "after", "lost"),
    [
        ({"Gelu": 2, "LayerNormalization": 3}, {"Gelu": 2, "LayerNormalization": 3}, []),
        ({"Gelu": 2}, {"Gelu": 3, "FastGelu": 1}, []),  # gaining kernels is no loss
        (
            {"Gelu": 2, "SkipLayerNormalization": 1},
            {"Gelu": 1},
            ["Gelu 2 -> 1", "LayerNormalization 1 -> 0"],
        ),
        ({"FusedMatMul": 8}, {"FusedMatMul": 2}, []),  # a scale folded into the weight does as much
        # a kernel that took in the Add before it is the same kernel and more
        ({"Gelu": 1, "FusedMatMul": 1}, {"BiasGelu": 1}, []),
        ({"SkipLayerNormalization": 4, "LayerNormalization": 1}, {"LayerNormalization": 5}, []),
        ({"Gelu": 1, "BiasGelu": 1}, {"BiasGelu": 1}, ["Gelu 2 -> 1"]),
        ({}, {}, []),
    ],
)
def test_lost_kernels(before, after, lost):
    assert lost_kernels(before, after) == lost


def test_fused_kernels_counts_only_fused_kernels():
    kernels = fused_kernels(_gelu_mlp())

    assert set(kernels) <= set(FUSED_KERNELS)
    assert "MatMul" not in kernels and all(count > 0 for count in kernels.values())
