"""Property tests: random graphs of linear and non-linear ops through ``converter.fuse``.

Hypothesis builds Transpose-free graphs on a 1-, 2- or 3-D input whose last axis is the feature
axis: Gemm (every ``transB``/``alpha``/``beta``, ``C`` of every broadcastable shape, ``transA``
on the input), MatMul with or without a bias ``Add`` (either side, every last-axis shape),
Relu, Tanh, Mul/Add by constants, fan-out (an ``Add`` of the current value and an earlier one,
or an extra graph output in the middle of a chain), weights shared between ops, held in
Constant nodes or in initializers that are also graph inputs, in float32, float16, float64 and
bfloat16, at opsets 9 to 21.

Properties, under both policies unless said otherwise:

- ``fuse`` does not raise, leaves its argument alone, and its result passes the full checker;
- graph inputs and outputs keep their names, order and types;
- Gemm+MatMul nodes never increase; under ``cost`` weight parameters never increase either
  (checked on graphs whose linear ops all carry a full-width bias: otherwise the merged bias can
  outgrow the ones it replaces, a converter bug reproduced at the end of this file);
- outputs stay as close to a float64 evaluation of the original as the original is, up to the
  dtype's tolerance (bit-identical when nothing was merged);
- the same graph with its nodes listed in a random order, not a topological one (as graph-surgery
  scripts write them), fuses to the same result: as many linear ops and parameters, a merge
  exactly when the sorted graph has one, a fused model in topological order that passes the full
  checker, and the same closeness to float64. onnxruntime runs float16/32/64;
  it has no bfloat16 kernels on CPU, so bfloat16 graphs are run by a numpy evaluator that
  rounds every op's result to bfloat16 (float64 accumulation).
"""

from __future__ import annotations

import collections
import itertools
import zlib
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from builders import in_topological_order, scrambled
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import converter
from converter.fusion.passes import fuse_model

BATCH = 3  # the value a symbolic batch dimension takes at run time
WIDTHS = (1, 2, 3, 4, 6, 8)
BF16 = np.dtype(ml_dtypes.bfloat16)
# (atol, rtol): how much further from the float64 result than the original the output may be,
# relative to the largest value in the graph.
TOLERANCES = {
    np.dtype(np.float32): (1e-5, 1e-4),
    np.dtype(np.float16): (2.5e-3, 1e-3),
    np.dtype(np.float64): (1e-8, 1e-7),
    BF16: (1e-2, 1.6e-2),
}
# How a constant is stored; the last two make its op unmergeable (overridable, or shared).
CONSTANT_KINDS = ("init",) * 6 + ("constant",) * 2 + ("graph_input", "shared")
SETTINGS = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- building random graphs -------------------------------------------------------------------


@dataclass(frozen=True)
class _Val:
    name: str
    lead: tuple[int | str, ...]  # leading dimensions; "batch" is symbolic
    width: int

    @property
    def shape(self) -> list[int | str]:
        return [*self.lead, self.width]


@dataclass
class Case:
    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    dtype: np.dtype


@dataclass
class _Builder:
    draw: Any
    dtype: np.dtype
    opset: int
    rng: np.random.Generator
    rank_up_bias: bool = False
    full_biases: bool = False
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)
    weight_inputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    by_shape: dict[tuple[int, ...], list[str]] = field(default_factory=dict)
    counter: itertools.count = field(default_factory=itertools.count)

    def fresh(self, prefix: str) -> str:
        return f"{prefix}{next(self.counter)}"

    def constant(self, array: np.ndarray, *, bias: bool = False) -> str:
        """Store ``array`` as an initializer, a Constant, an overridable input, or reuse one."""
        array = np.asarray(array, np.float64).astype(self.dtype)
        mergeable = bias and self.full_biases  # a bias that is refused would end the chain
        kind = self.draw(st.sampled_from(CONSTANT_KINDS[:8] if mergeable else CONSTANT_KINDS))
        if kind == "shared" and self.by_shape.get(array.shape):
            return self.draw(st.sampled_from(self.by_shape[array.shape]))
        name = self.fresh("w")
        tensor = numpy_helper.from_array(array, name)
        if kind == "constant":
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor, name=name))
        else:
            self.inits.append(tensor)
        if kind == "graph_input":
            elem = tensor.data_type
            self.weight_inputs.append(helper.make_tensor_value_info(name, elem, array.shape))
        self.by_shape.setdefault(array.shape, []).append(name)
        return name

    def node(self, op: str, inputs: list[str], lead, width: int, **attrs) -> _Val:
        out = _Val(self.fresh(op.lower()), tuple(lead), width)
        self.nodes.append(helper.make_node(op, inputs, [out.name], name=out.name, **attrs))
        return out

    def gemm(self, x: _Val, trans_a: bool) -> _Val:
        draw, (m,), k = self.draw, x.lead, x.width
        n = draw(st.sampled_from(WIDTHS))
        trans_b = draw(st.integers(0, 1))
        alpha = draw(st.sampled_from([1.0, 1.0, 0.5, -1.25]))
        beta = draw(st.sampled_from([1.0, 1.0, 2.0, -0.5]))
        forms = ["none", "scalar", "one", "vector", "row"] + (
            ["col", "matrix"] * isinstance(m, int)
        )
        c_form = draw(st.sampled_from(["vector", "row"] if self.full_biases else forms))
        if self.opset < 11 and c_form == "none":
            c_form = "vector"  # C is required before opset 11
        w = self.rng.standard_normal((k, n)) / np.sqrt(k)
        inputs = [x.name, self.constant(w.T if trans_b else w)]
        c_shape = {"scalar": (), "one": (1,), "vector": (n,), "row": (1, n), "col": (m, 1)}
        if c_form != "none":
            shape = (m, n) if c_form == "matrix" else c_shape[c_form]
            inputs.append(self.constant(self.rng.standard_normal(shape) * 0.5, bias=True))
        attrs = {"transA": int(trans_a), "transB": trans_b, "alpha": alpha, "beta": beta}
        return self.node("Gemm", inputs, (m,), n, **attrs)

    def matmul(self, x: _Val) -> _Val:
        draw, k = self.draw, x.width
        n = draw(st.sampled_from(WIDTHS))
        y = self.node(
            "MatMul",
            [x.name, self.constant(self.rng.standard_normal((k, n)) / np.sqrt(k))],
            x.lead,
            n,
        )
        rank = len(x.lead) + 1
        shapes = [(n,), (1, n), (1,) * len(x.lead) + (n,), (1,) * rank + (n,)]
        shapes = [sh for sh in shapes if len(sh) <= rank or self.rank_up_bias]
        if not self.full_biases:
            shapes = [None, (), (1,), *shapes]
        shape = draw(st.sampled_from(shapes))
        if shape is None:
            return y
        b = self.constant(self.rng.standard_normal(shape) * 0.5, bias=True)
        lead = (1,) * (max(rank, len(shape)) - rank) + x.lead
        return self.node("Add", [b, y.name] if draw(st.booleans()) else [y.name, b], lead, n)

    def step(self, kind: str, x: _Val, pool: list[_Val], *, trans_a: bool = False) -> _Val:
        """Apply one step of ``STEPS`` (all but "output") to ``x``."""
        draw = self.draw
        if kind == "linear":
            use_gemm = len(x.lead) == 1 and (trans_a or draw(st.booleans()))
            return self.gemm(x, trans_a) if use_gemm else self.matmul(x)
        if kind in ("relu", "tanh"):
            return self.node(kind.capitalize(), [x.name], x.lead, x.width)
        if kind == "fan_in":  # an earlier value (or x itself) now has two users
            same = [v for v in pool if (v.lead, v.width) == (x.lead, x.width)]
            other = draw(st.sampled_from(same)) if same else x
            return self.node("Add", [x.name, other.name], x.lead, x.width)
        shape = draw(st.sampled_from([(), (x.width,)]))
        if kind == "scale":
            c = self.rng.uniform(0.5, 1.5, shape) * self.rng.choice([-1, 1], shape)
        else:
            c = self.rng.standard_normal(shape) * 0.5
        inputs = [x.name, self.constant(c)][:: draw(st.sampled_from([1, -1]))]
        return self.node("Mul" if kind == "scale" else "Add", inputs, x.lead, x.width)


STEPS = ("linear",) * 8 + ("relu", "tanh", "scale", "shift", "fan_in", "output")


@st.composite
def graphs(draw, *, rank_up_bias: bool = False, full_biases: bool = False) -> Case:
    """A random graph and a feed for its input ``x``.

    ``rank_up_bias`` also draws bias ``Add``s whose constant has more dimensions than the MatMul
    output (not a bias: see ``test_bias_that_raises_the_rank``). ``full_biases`` gives every
    linear op a mergeable per-feature bias of full width.
    """
    dtype = np.dtype(
        draw(st.sampled_from([np.float32, np.float16, np.float64, ml_dtypes.bfloat16]))
    )
    opset = draw(st.sampled_from([13, 17, 21] if dtype == BF16 else [9, 13, 17, 21]))
    seed = draw(st.integers(0, 2**16))
    b = _Builder(draw, dtype, opset, np.random.default_rng(seed), rank_up_bias, full_biases)
    rank = draw(st.sampled_from([1, 2, 2, 2, 3]))
    batch = draw(st.sampled_from([BATCH, "batch"]))
    lead = {1: (), 2: (batch,), 3: (2, batch)}[rank]
    x = _Val("x", lead, draw(st.sampled_from(WIDTHS)))
    trans_a = rank == 2 and draw(st.booleans())
    x_shape = [x.width, batch] if trans_a else x.shape
    cur, pool, extra_outputs = x, [] if trans_a else [x], []
    for i in range(draw(st.integers(1, 7))):
        step = "linear" if trans_a and i == 0 else draw(st.sampled_from(STEPS))
        if step == "output":
            if cur is not x and cur not in extra_outputs:
                extra_outputs.append(cur)
            continue
        cur = b.step(step, cur, pool, trans_a=trans_a and i == 0)
        if cur not in pool and cur is not x:
            pool.append(cur)
    if cur is x:
        cur = b.node("Relu", [x.name], x.lead, x.width)
    outputs = [v for v in extra_outputs if v is not cur] + [cur]
    elem = helper.np_dtype_to_tensor_dtype(dtype)
    graph = helper.make_graph(
        b.nodes,
        "random",
        [helper.make_tensor_value_info("x", elem, x_shape), *b.weight_inputs],
        [helper.make_tensor_value_info(v.name, elem, v.shape) for v in outputs],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset <= 17 else 10
    if draw(st.booleans()):  # exporters often record every intermediate's type and shape
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    concrete = [BATCH if d == "batch" else d for d in x_shape]
    feed = b.rng.uniform(-1, 1, concrete).astype(dtype)
    return Case(model, {"x": feed}, dtype)


# --- evaluating -------------------------------------------------------------------------------


def _evaluate(model: onnx.ModelProto, feeds, round_to: np.dtype | None) -> tuple[list, float]:
    """Run the graph in float64 (rounding each op's result to ``round_to`` if given).

    Returns the outputs and the largest magnitude of any value computed, the scale errors are
    measured against.
    """
    env = {k: np.asarray(v, np.float64) for k, v in feeds.items()}
    env |= {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    scale = 0.0
    for node in model.graph.node:
        ins = [env[i] for i in node.input]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Constant":
            out = numpy_helper.to_array(attrs["value"]).astype(np.float64)
        elif node.op_type == "Gemm":
            a = ins[0].T if attrs.get("transA", 0) else ins[0]
            w = ins[1].T if attrs.get("transB", 0) else ins[1]
            out = attrs.get("alpha", 1.0) * (a @ w)
            if len(ins) > 2:
                out = out + attrs.get("beta", 1.0) * ins[2]
        else:
            fn = {"MatMul": np.matmul, "Add": np.add, "Mul": np.multiply}.get(node.op_type)
            unary = {"Relu": lambda v: np.maximum(v, 0), "Tanh": np.tanh}.get(node.op_type)
            out = fn(*ins) if fn else unary(ins[0])
        if round_to is not None:
            out = out.astype(round_to).astype(np.float64)
        if node.op_type != "Constant":
            scale = max(scale, float(np.max(np.abs(out), initial=0.0)))
        env[node.output[0]] = out
    return [env[o.name] for o in model.graph.output], scale


def _run(model: onnx.ModelProto, case: Case) -> list[np.ndarray]:
    if case.dtype == BF16:  # no bfloat16 kernels in onnxruntime's CPU provider
        return [o.astype(BF16) for o in _evaluate(model, case.feeds, BF16)[0]]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), so, providers=["CPUExecutionProvider"]
    )
    return session.run(None, case.feeds)


def _linear_ops(model: onnx.ModelProto) -> int:
    return sum(n.op_type in ("Gemm", "MatMul") for n in model.graph.node)


def _params(model: onnx.ModelProto) -> int:
    """Weight parameters: initializer elements plus Constant node elements."""
    sizes = [np.prod(t.dims) for t in model.graph.initializer]
    sizes += [
        np.prod(a.t.dims) for n in model.graph.node if n.op_type == "Constant" for a in n.attribute
    ]
    return int(sum(sizes))


def _assert_outputs(case: Case, fused: onnx.ModelProto, merged: bool) -> None:
    reference, scale = _evaluate(case.model, case.feeds, None)
    atol, rtol = TOLERANCES[case.dtype]
    originals, results = _run(case.model, case), _run(fused, case)
    for out, ref, orig, got in zip(
        case.model.graph.output, reference, originals, results, strict=True
    ):
        assert (got.dtype, got.shape) == (case.dtype, ref.shape), (
            f"{out.name}: {got.dtype}{got.shape}"
        )
        if not merged:
            assert got.tobytes() == orig.tobytes(), f"{out.name}: changed though nothing was merged"
            continue
        err_orig = float(np.max(np.abs(orig.astype(np.float64) - ref), initial=0.0))
        err = float(np.max(np.abs(got.astype(np.float64) - ref), initial=0.0))
        bound = 2 * err_orig + atol + rtol * scale
        assert err <= bound, f"{out.name}: error {err:.3g} > {bound:.3g} (original {err_orig:.3g})"


def _merged(fused: onnx.ModelProto) -> bool:
    """Whether fuse() rewrote anything (every merged node says so in its doc_string)."""
    return any(n.doc_string.startswith("onnx-fuse merged") for n in fused.graph.node)


def _io(model: onnx.ModelProto) -> list[bytes]:
    """Graph inputs then outputs, each with its name, type and shape, in order."""
    return [v.SerializeToString() for v in [*model.graph.input, *model.graph.output]]


def _check(case: Case, policy: str) -> onnx.ModelProto:
    """The properties every policy keeps; returns the fused model."""
    before = case.model.SerializeToString()
    fused = converter.fuse(case.model, policy=policy)
    assert case.model.SerializeToString() == before, "fuse() mutated its argument"
    onnx.checker.check_model(fused, full_check=True)
    assert _io(fused) == _io(case.model), "graph inputs/outputs changed"
    assert _linear_ops(fused) <= _linear_ops(case.model)
    _assert_outputs(case, fused, merged=_merged(fused))
    _check_scrambled(case, policy, fused)
    return fused


def _check_scrambled(case: Case, policy: str, fused: onnx.ModelProto) -> None:
    """The nodes listed out of order (seeded by the graph) fuse as the sorted graph does."""
    other = scrambled(case.model, np.random.default_rng(zlib.crc32(case.model.SerializeToString())))
    fused_other = converter.fuse(other, policy=policy)
    assert in_topological_order(fused_other), "the fused output is not in topological order"
    onnx.checker.check_model(fused_other, full_check=True)
    assert _io(fused_other) == _io(case.model), "graph inputs/outputs changed"
    assert (_linear_ops(fused_other), _params(fused_other)) == (_linear_ops(fused), _params(fused))
    assert _merged(fused_other) == _merged(fused)
    _assert_outputs(case, fused_other, merged=_merged(fused))  # against the sorted original


# --- tests ------------------------------------------------------------------------------------


def test_random_graphs_fuse_safely() -> None:
    stats = collections.Counter()

    @SETTINGS
    @given(graphs(rank_up_bias=True))
    def check(case: Case) -> None:
        for policy in ("cost", "always"):
            fused = _check(case, policy)
            stats[policy, "merged"] += _linear_ops(fused) < _linear_ops(case.model)
        stats["examples"] += 1
        stats[case.dtype.name] += 1

    check()
    # The generator must keep producing graphs in which something is merged.
    assert stats["cost", "merged"] >= 0.2 * stats["examples"], stats
    assert stats["always", "merged"] >= stats["cost", "merged"], stats
    assert all(stats[t] > 0 for t in ("float32", "float16", "float64", "bfloat16")), stats


@SETTINGS
@given(graphs(rank_up_bias=True))
def test_random_graphs_cost_policy_never_adds_parameters(case: Case) -> None:
    """Under ``cost`` the model never grows, whatever biases the ops bring."""
    fused = _check(case, "cost")
    assert _params(fused) <= _params(case.model)


# --- cases the generators found, kept as minimal reproducers --------------------------------------

FLOAT = onnx.TensorProto.FLOAT


def _model(nodes, x_shape, y_shape, inits, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", FLOAT, y_shape)],
        [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _bias_growth_models() -> dict[str, onnx.ModelProto]:
    r = np.random.default_rng(0)
    gemm = helper.make_node
    return {
        # widths 2->1->2: merging is a tie on multiply-adds (4 = 2 + 2), the scalar C becomes (2,).
        "tie_scalar_c": _model(
            [gemm("Gemm", ["x", "W1", "C1"], ["h"]), gemm("Gemm", ["h", "W2"], ["y"])],
            ["n", 2],
            ["n", 2],
            {
                "W1": r.standard_normal((2, 1)),
                "C1": np.float32(0.5),
                "W2": r.standard_normal((1, 2)),
            },
        ),
        # A per-row C of shape (3, 1) becomes a (3, 8) bias: 23 parameters -> 40.
        "per_row_c": _model(
            [gemm("Gemm", ["x", "W1", "C1"], ["h"]), gemm("Gemm", ["h", "W2"], ["y"])],
            [3, 2],
            [3, 8],
            {
                "W1": r.standard_normal((2, 2)),
                "C1": r.standard_normal((3, 1)),
                "W2": r.standard_normal((2, 8)),
            },
        ),
        # Before opset 11 Gemm needs C, so a bias-free chain gains a zero bias: 16 -> 18.
        "opset9_zero_c": _model(
            [gemm("MatMul", ["x", "W1"], ["h"]), gemm("MatMul", ["h", "W2"], ["y"])],
            ["n", 2],
            ["n", 6],
            {"W1": r.standard_normal((2, 2)), "W2": r.standard_normal((2, 6))},
            opset=9,
        ),
    }


@pytest.mark.parametrize(
    ("name", "merged"), [("tie_scalar_c", False), ("per_row_c", False), ("opset9_zero_c", True)]
)
def test_cost_policy_never_adds_bias_parameters(name: str, merged: bool) -> None:
    """The merged bias has ``d_k`` (or ``M * d_k``) entries and can outgrow the biases it
    replaces: ``cost`` declines such a merge; a bias-free chain before opset 11 becomes a bare
    MatMul rather than a Gemm with a zero C."""
    model = _bias_growth_models()[name]
    ir_model = ir.serde.deserialize_model(model)
    report = fuse_model(ir_model, policy="cost")
    fused = ir.serde.serialize_model(ir_model)
    assert _params(fused) <= _params(model)
    assert _linear_ops(fused) == (1 if merged else 2)
    if not merged:
        assert "would hold" in report.declined[0].reason
        assert "more than the" in report.declined[0].reason
    assert _linear_ops(converter.fuse(model, policy="always")) == 1


def test_bias_that_raises_the_rank() -> None:
    """``MatMul(x[3,4], W) + b[1,1,5]`` is ``[1,3,5]``: the Add broadcasts x up a rank, so it is
    not a bias; the MatMuls stay apart (the graph declares ``y`` as ``[1,3,2]``)."""
    r = np.random.default_rng(0)
    model = _model(
        [
            helper.make_node("MatMul", ["x", "W1"], ["m"]),
            helper.make_node("Add", ["m", "b1"], ["h"]),
            helper.make_node("MatMul", ["h", "W2"], ["y"]),
        ],
        [3, 4],
        [1, 3, 2],
        {
            "W1": r.standard_normal((4, 5)),
            "b1": r.standard_normal((1, 1, 5)),
            "W2": r.standard_normal((5, 2)),
        },
    )
    fused = converter.fuse(model)
    onnx.checker.check_model(fused, full_check=True)
    assert _linear_ops(fused) == 2
    case = Case(model, {"x": r.uniform(-1, 1, (3, 4)).astype(np.float32)}, np.dtype(np.float32))
    _assert_outputs(case, fused, merged=False)
