"""Property tests: random graphs of the *structures* merges must compose over, through ``fuse``.

Where ``test_random_graphs.py`` draws runs of single ops, these graphs are built from blocks on
a running value ``h`` (generator in ``random_structures.py``, shared with ``benchmarks/fuzz.py``):
stacked residual blocks (``h + L(h)``, with ``Add``, ``Sub`` or ``Sum``), LoRA branches
``base(h) + s * B(A(h))`` on consecutive layers, N-way sums ``a(h) + b(h) + h`` as trees of
``Add``/``Sub`` or one ``Sum``, chains the cost model splits into segments (``d -> r -> d -> d ->
r -> d``), shared constants (one LoRA scale for every adapter, one zero bias per width read by
several layers and by a ``Max``, a BatchNormalization whose weight and running variance are one
initializer through ``Identity``), intermediates that are also graph outputs, a 0-d
``ReduceMean`` output, and ``If`` nodes whose branches hold such blocks (an ``If`` too, one level
deep) and read outer weights; float32 and float64, opsets 13 to 21, 2-D (Gemm) and 3-D
(MatMul+Add) inputs, node names sometimes empty. Also steps after views of a linear op's output
(a BatchNorm over tokens, a scale after a permute, an attention scale after a qkv ``Split``),
left MatMuls, ``torch.stack(...).sum(0)``, Reshape sandwiches, no-op steps, and NCHW images with
convolutions (Conv + BatchNorm or channel affine, RepVGG sums, a scale or shift before a Conv,
1x1 then 3x3, a 1x1 Conv before a channels-last MLP), with negative cases of each.

Properties, for every graph (``random_structures.check_case``), under ``cost`` (and, for fewer
graphs, ``always``):

(a) the result of ``converter.fuse`` passes the full checker and loads in onnxruntime;
(b) its outputs match the float64 evaluation of the original as closely as twice the original's
    own error, plus the dtype's ``atol + rtol * scale`` (``scale``: the largest output, at least 1);
(c) fusing the result again makes no fusion and changes nothing but ``value_info`` (see below);
(d) shuffling the nodes of every graph into another topological order before fusing gives the
    same op-type counts and matching outputs; and (h) so does listing them in a random order that
    is not topological (the engine sorts it first), with as many fusions, a fused model in order
    and a report that says it sorted;
(e) the IR invariants hold after every rewrite (``tests/conftest.py`` sets
    ``ONNX_FUSE_CHECK_EVERY_REWRITE=1``, so the engine raises ``EngineError`` on a violation);
(f) report records name only values of the fused model; consumed ones have ``output None`` and
    ``merged_into`` set;
(g) every fused kernel onnxruntime makes of the original it makes of the fused model too.

Four engine bugs these graphs found (a merge retried across graphs, merged weights without a
type, initializers reordered by shape inference, a fixpoint missed when a merge released a shared
constant) are kept at the end as regression tests, and two more that the view, left-MatMul and
convolution blocks found (a step after views that a chain merge made foldable left for a second
pass; a stale rank cache declining a left-MatMul chain): all pass, and nothing is excused.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import onnx
import pytest
from builders import fuse_with_report, linear_chain
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import converter
from fusion.random_structures import (
    BLOCKS,
    IMAGE_BLOCKS,
    Case,
    RngChoices,
    as_float64,
    check_case,
    generate,
)

T = TypeVar("T")


def _settings(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


class DrawChoices:
    """The generator's choices drawn by hypothesis, so a failing graph shrinks."""

    def __init__(self, draw: Any) -> None:
        self.draw = draw

    def pick(self, options: Sequence[T]) -> T:
        return self.draw(st.sampled_from(list(options)))

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))


@st.composite
def structures(draw: Any, blocks: Sequence[str] = BLOCKS, image: bool | None = None) -> Case:
    return generate(DrawChoices(draw), blocks, image)


def _check(case: Case, policy: str, stats: collections.Counter) -> None:
    stats["graphs"] += 1
    stats.update(case.blocks)
    outcome = check_case(case, policy, shuffle_seed=stats["graphs"], scramble=True)
    stats["merged"] += outcome.fusions > 0
    stats["fusions"] += outcome.fusions


def _each_block_once(kinds, stats: collections.Counter, *, image: bool) -> None:
    """Every block kind the draws above missed, once, in a graph of its own (hypothesis's
    derandomised draws need not reach each kind): the coverage does not hang on luck."""
    for i, kind in enumerate(sorted(k for k in kinds if not stats[k])):
        _check(generate(RngChoices(29, i), [kind], image), "cost", stats)
    missing = sorted(k for k in kinds if not stats[k])
    assert not missing, f"blocks never drawn: {missing}"


def test_random_structures_cost_policy() -> None:
    stats: collections.Counter = collections.Counter()
    _settings(220)(given(structures())(lambda case: _check(case, "cost", stats)))()
    # The generator must keep producing graphs in which merges happen, of every kind of block.
    assert stats["merged"] >= 0.6 * stats["graphs"], stats
    _each_block_once(set(BLOCKS) - IMAGE_BLOCKS, stats, image=False)


def test_random_structures_always_policy() -> None:
    stats: collections.Counter = collections.Counter()
    _settings(60)(given(structures())(lambda case: _check(case, "always", stats)))()
    assert stats["merged"] >= 0.5 * stats["graphs"], stats


def test_random_structures_in_subgraphs() -> None:
    """Mostly ``If`` blocks, whose branches hold the other blocks and share outer weights."""
    stats: collections.Counter = collections.Counter()
    blocks = ("if",) * 4 + ("residual", "lora", "nway", "output")
    _settings(60)(given(structures(blocks))(lambda case: _check(case, "cost", stats)))()
    assert stats["if"] >= 0.5 * stats["graphs"], stats
    assert stats["merged"] >= 0.6 * stats["graphs"], stats


def test_random_structures_convolutions() -> None:
    """Images ``[N, C, H, W]``: convolution blocks (a Conv then a BatchNorm or channel affine,
    RepVGG sums, a scale or shift before a Conv, 1x1 then 3x3, a 1x1 Conv before a channels-last
    MLP) mixed with the others, which see the image channels-last through a ``Transpose`` (and go
    back with a channel scale)."""
    stats: collections.Counter = collections.Counter()
    _settings(80)(given(structures(image=True))(lambda case: _check(case, "cost", stats)))()
    _each_block_once(IMAGE_BLOCKS, stats, image=True)
    assert stats["merged"] >= 0.6 * stats["graphs"], stats


def test_the_checks_catch_a_wrong_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    """Merged weights off by 1% fail property (b): the checks can fail."""
    real_fuse = converter.fuse
    case = next(
        c
        for c in (generate(RngChoices(0, i)) for i in range(40))
        if "lora" in c.blocks
        and any(t.name.startswith("fused(") for t in real_fuse(c.model).graph.initializer)
    )

    def off_by_one_percent(model: onnx.ModelProto, policy: str = "cost") -> onnx.ModelProto:
        fused = real_fuse(model, policy=policy)
        for merged in [t for t in fused.graph.initializer if t.name.startswith("fused(")]:
            array = numpy_helper.to_array(merged) * 1.01
            merged.CopyFrom(numpy_helper.from_array(array, merged.name))
        return fused

    check_case(case, "cost")
    monkeypatch.setattr(converter, "fuse", off_by_one_percent)
    with pytest.raises(AssertionError, match=r"^\(b\) fused: output"):
        check_case(case, "cost")


# --- engine bugs these graphs found, as minimal reproducers -----------------------------------


def _shared_zero_across_graphs() -> onnx.ModelProto:
    """``res = x @ W + zero + x`` in the main graph; an ``If`` branch reads the same ``zero`` as
    the bias of a chain ``Gemm -> Gemm`` that merges."""
    r = np.random.default_rng(0)
    f32 = TensorProto.FLOAT
    inits = [numpy_helper.from_array(np.zeros(4, np.float32), "zero")] + [
        numpy_helper.from_array((r.standard_normal((4, 4)) / 2).astype(np.float32), name)
        for name in ("W", "W1", "W2")
    ]
    out = [helper.make_tensor_value_info("t2", f32, [2, 4])]
    then = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "W1", "zero"], ["t1"], transB=1, name="g1"),
            helper.make_node("Gemm", ["t1", "W2"], ["t2"], transB=1, name="g2"),
        ],
        "then",
        [],
        out,
    )
    other = [helper.make_tensor_value_info("e", f32, [2, 4])]
    otherwise = helper.make_graph([helper.make_node("Relu", ["x"], ["e"])], "else", [], other)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "zero"], ["a"], name="bias"),
        helper.make_node("Add", ["a", "x"], ["res"], name="residual"),
        helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=otherwise),
    ]
    inputs = [
        helper.make_tensor_value_info("x", f32, [2, 4]),
        helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
    ]
    outputs = [helper.make_tensor_value_info(n, f32, [2, 4]) for n in ("res", "y")]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_idempotent_when_a_constant_is_shared_across_graphs() -> None:
    model = _shared_zero_across_graphs()
    fused, report = fuse_with_report(model)
    # The main graph's residual merge waits for the If branch to let go of the shared zero bias;
    # the engine then fuses the main graph again, so one pass makes both merges.
    assert sorted(r.nodes for r in report.fusions) == [["g1", "g2"], ["mm", "bias", "residual"]]
    _, again = fuse_with_report(fused)
    assert again.fusions == [], [r.nodes for r in again.fusions]


def test_fusing_a_fused_model_changes_no_byte() -> None:
    fused = converter.fuse(linear_chain([4, 4, 4]))
    assert len(fused.graph.node) == 1
    assert converter.fuse(fused).SerializeToString() == fused.SerializeToString()


def test_nothing_to_merge_keeps_the_initializer_order() -> None:
    r = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(r.standard_normal((64, 64)).astype(np.float32), "W_big"),
        numpy_helper.from_array(r.standard_normal((64, 1)).astype(np.float32), "W_small"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "W_big"], ["h"], name="fc0"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "W_small"], ["y"], name="fc1"),
    ]
    x = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])]
    y = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])]
    model = helper.make_model(
        helper.make_graph(nodes, "g", x, y, inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    fused = converter.fuse(model)
    assert len(fused.graph.node) == 3
    assert [t.name for t in fused.graph.initializer] == ["W_big", "W_small"]  # today: reversed


def _zero_bias_shared_along_a_split_chain() -> onnx.ModelProto:
    """The fuzz run's reproducer (seed 0, index 877 of the first generator): ``x - (x @ W1 +
    zero)``, then a chain ``8 -> 2 -> 8 -> 8 -> 2`` the cost model splits, one zero bias shared
    by three of its layers, ``r + r @ W`` and a ``ReduceMean`` output."""
    r = np.random.default_rng(877)
    f32 = TensorProto.FLOAT

    def w(name: str, shape: tuple[int, int]) -> TensorProto:
        return numpy_helper.from_array((r.standard_normal(shape) / 2).astype(np.float32), name)

    inits = [numpy_helper.from_array(np.zeros(8, np.float32), "zero8")]
    inits += [w("w1", (8, 8)), w("w5", (2, 8)), w("w8", (8, 2)), w("w10", (8, 8))]
    inits += [w("w13", (2, 8)), w("w16", (2, 2))]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["matmul2"], name="matmul2"),
        helper.make_node("Add", ["zero8", "matmul2"], ["add3"], name="add3"),
        helper.make_node("Sub", ["x", "add3"], ["sub4"], name="sub4"),
        helper.make_node("Identity", ["w5"], ["identity6"], name="identity6"),
        helper.make_node("Gemm", ["sub4", "identity6"], ["gemm7"], transB=1, name="gemm7"),
        helper.make_node("Gemm", ["gemm7", "w8", "zero8"], ["gemm9"], transB=1, name="gemm9"),
        helper.make_node("MatMul", ["gemm9", "w10"], ["matmul11"], name="matmul11"),
        helper.make_node("Add", ["zero8", "matmul11"], ["add12"], name="add12"),
        helper.make_node("Gemm", ["add12", "w13"], ["gemm14"], transB=1, name="gemm14"),
        helper.make_node("Relu", ["gemm14"], ["relu15"], name="relu15"),
        helper.make_node("Gemm", ["relu15", "w16"], ["gemm17"], transB=1, name="gemm17"),
        helper.make_node("Sum", ["relu15", "gemm17"], ["sum18"], name="sum18"),
        helper.make_node("Relu", ["sum18"], ["relu19"], name="relu19"),
        helper.make_node("ReduceMean", ["relu19"], ["mean"], keepdims=0, name="mean"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", f32, [3, 8])],
        [
            helper.make_tensor_value_info("mean", f32, []),
            helper.make_tensor_value_info("relu19", f32, [3, 2]),
        ],
        inits,
    )


def test_fixpoint_with_a_zero_bias_shared_along_a_split_chain() -> None:
    model = _zero_bias_shared_along_a_split_chain()
    x = np.random.default_rng(0).uniform(-1, 1, (3, 8)).astype(np.float32)
    case = Case(model, as_float64(model), [{"x": x}], np.dtype(np.float32), ["reproducer"])
    outcome = check_case(case, "cost")
    assert outcome.fusions == 3, outcome


# --- engine bugs the view, left-MatMul and convolution blocks found (fixed; regression tests) ----


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _f32(name: str, shape: Sequence[int], seed: int) -> TensorProto:
    array = np.random.default_rng(seed).uniform(0.5, 1.5, shape).astype(np.float32)
    return numpy_helper.from_array(array, name)


def test_a_step_after_views_of_a_merged_chain_folds_in_one_pass() -> None:
    """``x @ W -> Neg -> Transpose(0, 2, 1) -> Mul by (C, 1)``: the chain ``MatMul + Neg``
    merges, then the ``Mul`` folds into the merged MatMul across the Transpose (one pass)."""
    f32 = TensorProto.FLOAT
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
        helper.make_node("Neg", ["m"], ["n"], name="neg"),
        helper.make_node("Transpose", ["n"], ["t"], perm=[0, 2, 1], name="tr"),
        helper.make_node("Mul", ["t", "s"], ["y"], name="scale"),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", f32, [2, 3, 4])],
        [helper.make_tensor_value_info("y", f32, [2, 4, 3])],
        [_f32("W", (4, 4), 0), _f32("s", (4, 1), 1)],
    )
    fused, report = fuse_with_report(model)  # ONNX_FUSE_CHECK_EVERY_REWRITE: EngineError today
    assert [n.op_type for n in fused.graph.node] == ["MatMul", "Transpose"]
    assert len(report.fusions) == 2
    x = np.random.default_rng(2).uniform(-1, 1, (2, 3, 4)).astype(np.float32)
    expected = np.transpose(-(x @ _np(model, "W")), (0, 2, 1)) * _np(model, "s")
    np.testing.assert_allclose(_run(fused, x), expected, rtol=1e-5, atol=1e-6)


def test_a_left_matmul_chain_after_a_merged_sum_in_a_branch_merges_in_one_pass() -> None:
    """In an ``If`` branch: ``t = s @ W1 + s @ W2`` (a branch sum, merged), then
    ``L2 @ (L1 @ t + c1) + c2`` (a left-MatMul chain). Pass 1 declines the chain ("the data's
    rank is not known"), pass 2 merges it: fusing is not idempotent. Clearing the cache (a
    ``_RANKS`` that stores nothing) fixes this and every such fuzz failure; in If branches the
    same stale answer also leaves a bias ``Add`` after ``Identity`` after a merged chain for the
    second pass (fuzz seed 0, index 1376)."""
    f32 = TensorProto.FLOAT
    then = helper.make_graph(
        [
            helper.make_node("MatMul", ["s", "W1"], ["a"], name="a"),
            helper.make_node("MatMul", ["s", "W2"], ["b"], name="b"),
            helper.make_node("Add", ["a", "b"], ["t"], name="sum"),
            helper.make_node("MatMul", ["L1", "t"], ["l1"], name="left1"),
            helper.make_node("Add", ["l1", "c1"], ["l1b"], name="bias1"),
            helper.make_node("MatMul", ["L2", "l1b"], ["l2"], name="left2"),
            helper.make_node("Add", ["l2", "c2"], ["y"], name="bias2"),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("y", f32, [2, 3, 4])],
        [
            _f32(name, shape, seed)
            for seed, (name, shape) in enumerate(
                {"W1": (4, 4), "W2": (4, 4), "L1": (5, 3), "c1": (5, 1), "L2": (3, 5)}.items()
            )
        ]
        + [_f32("c2", (3, 1), 5)],
    )
    otherwise = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", f32, [2, 3, 4])],
    )
    model = _model(
        [
            helper.make_node("Relu", ["x"], ["s"], name="relu"),
            helper.make_node("If", ["cond"], ["out"], then_branch=then, else_branch=otherwise),
        ],
        [
            helper.make_tensor_value_info("x", f32, [2, 3, 4]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("out", f32, [2, 3, 4])],
        [],
    )
    fused, report = fuse_with_report(model)
    assert sorted(r.nodes for r in report.fusions) == [
        ["a", "b", "sum"],
        ["left1", "bias1", "left2", "bias2"],
    ]
    _, again = fuse_with_report(fused)
    assert again.fusions == [], [r.nodes for r in again.fusions]


def _np(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    from fusion.random_structures import run

    return run(model, {"x": x})[0]
