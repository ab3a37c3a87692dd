"""Inputs whose nodes are not in topological order (``converter.fusion.core.order``), issue 19.

onnxruntime sorts a main graph listed out of order and runs it; onnx-fuse sorts every graph
before the engine reads it, fuses it as it fuses the sorted graph, and writes it sorted (so the
full checker accepts the output), even with nothing to merge. A graph with no topological order
(a cycle, a read of a value nothing defines, an output nothing produces) is refused with exit 2
and one line naming the node and the value; exit 3 stays for our own faults.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from builders import (
    assert_equivalent,
    feeds,
    fuse_with_report,
    in_topological_order,
    init,
    linear_chain,
    op_types,
    rng,
    scrambled,
)
from onnx import TensorProto, helper

import converter
from converter.cli import main
from converter.errors import InputError
from converter.fusion.core import order
from converter.fusion.passes import FuseLinearChainsPass

FLOAT = TensorProto.FLOAT
ATOL, RTOL = 1e-5, 1e-4


def _model(nodes, inputs=None, outputs=None, inits=(), opsets=(("", 17),)) -> onnx.ModelProto:
    """A model as a graph-surgery script writes it: no checker (it refuses unsorted graphs)."""
    graph = helper.make_graph(
        list(nodes),
        "g",
        inputs or [helper.make_tensor_value_info("x", FLOAT, [2, 4])],
        outputs or [helper.make_tensor_value_info("y", FLOAT, [2, 4])],
        list(inits),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 8
    return model


def _if_around(then_nodes) -> onnx.ModelProto:
    """``y = If(c, then: then_nodes -> o, else: x)``, the then branch reading the outer ``x``."""
    then = helper.make_graph(
        list(then_nodes), "then", [], [helper.make_tensor_value_info("o", FLOAT, [2, 4])]
    )
    otherwise = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", FLOAT, [2, 4])],
    )
    return _model(
        [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=otherwise, name="if")],
        [
            helper.make_tensor_value_info("x", FLOAT, [2, 4]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
    )


def _ort_runs(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    """onnxruntime runs ``model`` (it sorts the main graph itself)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), so, providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"x": x})


def _weights(*names: str, shape=(4, 4), seed: int = 0) -> list[TensorProto]:
    r = rng(seed)
    return [init(n, (r.standard_normal(shape) / 2).astype(np.float32)) for n in names]


# --- sorted, then fused as the sorted graph -------------------------------------------------


@pytest.mark.parametrize("form", ["gemm", "matmul"])
def test_an_unsorted_chain_fuses_as_the_sorted_one(form: str) -> None:
    rank = 2 if form == "gemm" else 3  # a 2-D MatMul chain is written back as a Gemm
    model = linear_chain([8, 16, 12, 4], form=form, rank=rank, seed=3)
    unsorted = scrambled(model, rng(5))
    assert not in_topological_order(unsorted)

    fused, report = fuse_with_report(unsorted)
    expected, expected_report = fuse_with_report(model)

    assert len(report.fusions) == len(expected_report.fusions) == 1
    assert (
        op_types(fused) == op_types(expected) == (["Gemm"] if form == "gemm" else ["MatMul", "Add"])
    )
    assert report.sorted_graphs == ["main graph"] and expected_report.sorted_graphs == []
    onnx.checker.check_model(fused, full_check=True)
    shape = (5, 8) if rank == 2 else (2, 5, 8)
    assert_equivalent(model, fused, feeds(shape, seed=1), atol=ATOL, rtol=RTOL)


def test_an_unsorted_model_with_nothing_to_merge_comes_back_sorted() -> None:
    nodes = [
        helper.make_node("Tanh", ["a"], ["y"], name="tanh"),
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
    ]
    model = _model(nodes)
    x = feeds((2, 4))["x"]

    fused, report = fuse_with_report(model)

    assert report.fusions == [] and report.sorted_graphs == ["main graph"]
    assert report.modified, "sorting changed the model"
    assert [n.name for n in fused.graph.node] == ["relu", "tanh"]
    onnx.checker.check_model(fused, full_check=True)
    (expected,), (got,) = _ort_runs(model, x), _ort_runs(fused, x)
    assert got.tobytes() == expected.tobytes()
    assert "input nodes were not in topological order; sorted (main graph)" in str(report)


def test_a_sorted_model_is_not_touched() -> None:
    model = ir.serde.deserialize_model(linear_chain([4, 4, 4]))
    nodes = list(model.graph)

    assert order.sort_model(model) == []
    assert list(model.graph) == nodes
    result = FuseLinearChainsPass()(
        ir.serde.deserialize_model(_model([helper.make_node("Relu", ["x"], ["y"], name="relu")]))
    )
    assert not result.modified and result.report.sorted_graphs == []


def test_the_pass_says_a_sort_modified_the_model() -> None:
    model = ir.serde.deserialize_model(
        _model(
            [
                helper.make_node("Tanh", ["a"], ["y"], name="tanh"),
                helper.make_node("Relu", ["x"], ["a"], name="relu"),
            ]
        )
    )
    result = FuseLinearChainsPass()(model)
    assert result.modified and result.report.fusions == []
    assert [n.name for n in model.graph] == ["relu", "tanh"]


def _if_model() -> onnx.ModelProto:
    """``If`` listed before the ``Relu`` its branch reads (outer scope), its then-branch's
    chain ``Gemm -> Gemm`` listed backwards; onnxruntime runs this after sorting the main graph
    (it does not sort subgraphs: the branch has to be in order for it)."""
    then = helper.make_graph(
        [
            helper.make_node("Gemm", ["t1", "W2"], ["o"], name="g2"),
            helper.make_node("Gemm", ["r", "W1"], ["t1"], name="g1"),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("o", FLOAT, [2, 4])],
    )
    otherwise = helper.make_graph(
        [helper.make_node("Neg", ["r"], ["e"], name="neg")],
        "else",
        [],
        [helper.make_tensor_value_info("e", FLOAT, [2, 4])],
    )
    nodes = [
        helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=otherwise, name="if"),
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
    ]
    inputs = [
        helper.make_tensor_value_info("x", FLOAT, [2, 4]),
        helper.make_tensor_value_info("c", TensorProto.BOOL, []),
    ]
    return _model(nodes, inputs, inits=_weights("W1", "W2"))


def test_subgraphs_and_outer_scope_reads_are_sorted_too() -> None:
    model = _if_model()

    fused, report = fuse_with_report(model)

    assert [r.nodes for r in report.fusions] == [["g1", "g2"]]
    assert report.sorted_graphs == ["main graph", "main graph/if.then_branch"]
    assert op_types(fused) == ["Relu", "If"]
    branch = _branch(fused.graph.node[1], "then_branch")
    assert [n.op_type for n in branch.node] == ["Gemm"]
    onnx.checker.check_model(fused, full_check=True)
    x = feeds((2, 4), seed=2)["x"]
    sorted_model = onnx.ModelProto()
    sorted_model.CopyFrom(model)
    sorted_model.graph.node.reverse()
    _branch(sorted_model.graph.node[1], "then_branch").node.reverse()  # now in order
    for cond in (True, False):
        inputs = {"x": x, "c": np.array(cond)}
        expected = _session(sorted_model).run(None, inputs)[0]
        np.testing.assert_allclose(
            _session(fused).run(None, inputs)[0], expected, atol=ATOL, rtol=RTOL
        )


def _branch(node: onnx.NodeProto, name: str) -> onnx.GraphProto:
    return next(a.g for a in node.attribute if a.name == name)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_the_cli_writes_an_unsorted_input_sorted_not_as_a_byte_copy(tmp_path: Path, capsys) -> None:
    src, out = tmp_path / "unsorted.onnx", tmp_path / "out.onnx"
    onnx.save(
        _model(
            [
                helper.make_node("Tanh", ["a"], ["y"], name="tanh"),
                helper.make_node("Relu", ["x"], ["a"], name="relu"),
            ]
        ),
        src,
    )

    assert main([str(src), "-o", str(out)]) == 0

    text = capsys.readouterr().out
    assert "note            input nodes were not in topological order; sorted (main graph)" in text
    assert "validation      skipped" in text  # nothing merged: the input's own nodes, sorted
    assert out.read_bytes() != src.read_bytes()
    written = onnx.load(out)
    onnx.checker.check_model(written, full_check=True)
    assert [n.name for n in written.graph.node] == ["relu", "tanh"]


def test_declared_opsets_that_disagree_are_read_as_onnxruntime_reads_them() -> None:
    """``""`` and ``"ai.onnx"`` are one domain; imported as 17 then 9, onnxruntime runs opset 9,
    where Gemm needs C: the merged bias-free 2-D chain must stay a MatMul (a Gemm without C
    would not load)."""
    r = rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("MatMul", ["h", "W2"], ["y"], name="mm2"),
    ]
    inits = [init(n, r.standard_normal((4, 4)).astype(np.float32)) for n in ("W1", "W2")]
    model = _model(nodes, inits=inits, opsets=(("", 17), ("ai.onnx", 9)))
    x = feeds((2, 4))["x"]

    fused, report = fuse_with_report(model)

    assert len(report.fusions) == 1 and op_types(fused) == ["MatMul"]
    onnx.checker.check_model(fused, full_check=True)
    np.testing.assert_allclose(_ort_runs(fused, x)[0], _ort_runs(model, x)[0], atol=ATOL, rtol=RTOL)


# --- refused: no topological order ----------------------------------------------------------


def _refusal(tmp_path: Path, capsys, model: onnx.ModelProto) -> str:
    """Run the CLI on ``model``; assert exit 2, nothing written, one line; return the line."""
    src, out = tmp_path / "bad.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    assert main([str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert not out.exists()
    assert len(err.strip().splitlines()) == 1, err
    assert "internal error" not in err
    prefix = f"onnx-fuse: error: {src}: "
    assert err.startswith(prefix), err
    return err.strip().removeprefix(prefix)


def test_a_cycle_is_refused_naming_its_nodes_and_values(tmp_path: Path, capsys) -> None:
    model = _model(
        [
            helper.make_node("Add", ["x", "b"], ["a"], name="n1"),
            helper.make_node("Relu", ["a"], ["b"], name="n2"),
            helper.make_node("Identity", ["a"], ["y"], name="n3"),
        ]
    )
    with pytest.raises(Exception, match="the graph is"):  # onnxruntime refuses it too
        _ort_runs(model, feeds((2, 4))["x"])

    assert _refusal(tmp_path, capsys, model) == (
        "main graph: the nodes form a cycle, so they have no topological order: "
        "'n1' reads 'b' from 'n2', 'n2' reads 'a' from 'n1'"
    )


def test_a_node_reading_its_own_output_is_a_cycle() -> None:
    model = _model(
        [
            helper.make_node("Add", ["x", "a"], ["a"], name="self"),
            helper.make_node("Relu", ["a"], ["y"], name="relu"),
        ]
    )
    with pytest.raises(InputError, match=r"cycle.*: 'self' reads 'a' from 'self'$"):
        converter.fuse(model)


def test_a_cycle_through_a_subgraph_is_refused() -> None:
    """The ``If`` branch reads ``r`` (outer scope), ``r`` is computed from the ``If``'s output."""
    then = helper.make_graph(
        [helper.make_node("Neg", ["r"], ["o"], name="neg")],
        "then",
        [],
        [helper.make_tensor_value_info("o", FLOAT, [2, 4])],
    )
    otherwise = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"], name="id")],
        "else",
        [],
        [helper.make_tensor_value_info("e", FLOAT, [2, 4])],
    )
    model = _model(
        [
            helper.make_node(
                "If", ["c"], ["i"], then_branch=then, else_branch=otherwise, name="if"
            ),
            helper.make_node("Relu", ["i"], ["r"], name="relu"),
            helper.make_node("Identity", ["r"], ["y"], name="out"),
        ],
        [
            helper.make_tensor_value_info("x", FLOAT, [2, 4]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
    )
    with pytest.raises(InputError) as info:
        converter.fuse(model)
    assert str(info.value) == (
        "main graph: the nodes form a cycle, so they have no topological order: "
        "'if' reads 'r' from 'relu', 'relu' reads 'i' from 'if'"
    )


def test_a_cycle_inside_a_subgraph_names_the_subgraph() -> None:
    model = _if_around(
        [
            helper.make_node("Add", ["x", "q"], ["p"], name="p"),
            helper.make_node("Neg", ["p"], ["q"], name="q"),
            helper.make_node("Identity", ["q"], ["o"], name="o"),
        ]
    )
    with pytest.raises(InputError, match=r"^main graph/if\.then_branch: the nodes form a cycle"):
        converter.fuse(model)


def test_an_undefined_input_is_refused_naming_the_node_and_value(tmp_path: Path, capsys) -> None:
    model = _model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Add", ["r", "nope"], ["y"], name="adder"),
        ]
    )
    with pytest.raises(Exception, match="nope"):  # onnxruntime refuses it too
        _ort_runs(model, feeds((2, 4))["x"])

    # one line: onnx_ir's own warnings about the missing value go to the debug log
    assert _refusal(tmp_path, capsys, model) == (
        "main graph: node 'adder' (Add) reads 'nope', which no node, graph input or initializer "
        "in its scope defines; the graph is not a valid ONNX graph"
    )


def test_an_output_nothing_produces_is_refused(tmp_path: Path, capsys) -> None:
    model = _model([helper.make_node("Relu", ["x"], ["r"], name="relu")])
    assert _refusal(tmp_path, capsys, model) == (
        "main graph: graph output 'y' is produced by no node, graph input or initializer; "
        "the graph is not a valid ONNX graph"
    )


def test_an_undefined_input_in_a_subgraph_is_refused() -> None:
    model = _if_around([helper.make_node("Add", ["x", "ghost"], ["o"], name="inner")])
    with pytest.raises(
        InputError, match=r"^main graph/if\.then_branch: node 'inner' \(Add\) reads 'ghost'"
    ):
        converter.fuse(model)


def test_inspect_plans_on_the_sorted_graph_and_refuses_a_cycle(tmp_path: Path, capsys) -> None:
    src = tmp_path / "unsorted.onnx"
    onnx.save(scrambled(linear_chain([4, 6, 4]), rng(1)), src)
    assert main(["inspect", str(src)]) == 0
    out = capsys.readouterr().out
    assert "fc0 + fc1" in out and "merge" in out
    assert out.rstrip().endswith(
        "note: input nodes were not in topological order; sorted (main graph)"
    )

    bad = tmp_path / "cycle.onnx"
    onnx.save(
        _model(
            [
                helper.make_node("Relu", ["b"], ["a"], name="n1"),
                helper.make_node("Neg", ["a"], ["b"], name="n2"),
                helper.make_node("Identity", ["x"], ["y"], name="n3"),
            ]
        ),
        bad,
    )
    assert main(["inspect", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"onnx-fuse: error: {bad}: main graph: the nodes form a cycle, so they have no "
        "topological order: 'n1' reads 'b' from 'n2', 'n2' reads 'a' from 'n1'"
    )
