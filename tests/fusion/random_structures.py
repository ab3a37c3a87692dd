"""Random graphs of the structures merges must compose over, and the properties every fusion keeps.

Shared by ``tests/fusion/test_random_structures.py`` (hypothesis, a few hundred graphs) and
``benchmarks/fuzz.py`` (seeded, thousands). Every random decision goes through a :class:`Choices`
object, so the same generator runs on hypothesis' ``draw`` (which shrinks a failing graph) or on
a numpy generator seeded by ``(seed, index)`` (which a fuzz run prints as the reproducer).

:func:`generate` builds, on an input ``x`` of shape ``[B, d]`` (Gemm form) or ``[B, 2, d]``
(MatMul+Add form), float32 or float64, opset 13, 17 or 21, a sequence of blocks applied to the
running value ``h``:

- ``linear``: one layer ``L(h)`` to a new width;
- ``residual``: ``h + L(h)``, ``h - L(h)``, ``L(h) - h`` or ``Sum(h, L(h))``, L of one or two layers;
- ``lora``: ``base(h) + s * B(A(h))`` (or ``h + ...``, or with ``Sub``/``Sum``), the scale ``s``
  before or after ``B``; ``s`` is usually one initializer shared by every adapter of the model;
- ``nway``: ``a(h) + b(h) + h`` and wider, as a random tree of ``Add``/``Sub`` or one ``Sum``;
- ``bottleneck``: a chain ``d -> r -> d -> d -> r -> d`` the cost model splits into segments;
- ``relu``/``tanh``/``max0`` (``Max(h, zero)``, reading the shared zero bias), ``batchnorm``
  (2-D only; its weight and running variance are one initializer, the variance via ``Identity``);
- ``output``: the current value also becomes a graph output (an intermediate of a later chain);
- ``if``: an ``If`` on a boolean graph input whose two branches each hold such blocks on the
  outer ``h`` (an ``If`` too, one level deep), with weights in the branch or in the outer graph
  (shared scale and zero included).

Constants are initializers, ``Constant`` nodes, or initializers reached through ``Identity``; a
zero bias of each width may be one initializer shared by several layers and by ``Max``. Graph
outputs: the final value, the intermediates marked ``output``, and often a 0-d ``ReduceMean``
of the final value or an intermediate. Node names are sometimes empty; shapes are sometimes
inferred into ``value_info``.

:func:`check_case` asserts, for one policy, with messages starting with the property's letter:

(a) ``converter.fuse`` returns a model the full checker accepts and onnxruntime loads (and the
    same model as the pass, whose report the other checks read);
(b) its outputs match the original's under onnxruntime (see :func:`assert_close`);
(c) fusing the result again makes no fusion and changes no byte;
(d) fusing a copy whose nodes are shuffled into another topological order (every graph) gives the
    same op-type counts and matching outputs;
(e) with ``ONNX_FUSE_CHECK_EVERY_REWRITE=1`` (set by the callers) the engine checks the IR
    invariants after every merge and raises ``EngineError`` on a violation;
(f) every report record with an ``output`` names a value of the fused model's graph it was made
    in (a node output or a graph output), no two records claim one value, and every record whose
    output a later merge consumed has ``output None`` and ``merged_into`` naming a merged node.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper, numpy_helper

import converter
from converter.fusion.passes import fuse_model, iter_graphs
from converter.report import FusionReport

__all__ = [
    "Choices",
    "RngChoices",
    "Case",
    "Outcome",
    "BLOCKS",
    "generate",
    "check_case",
    "assert_close",
    "shuffled",
    "fuse_with_report",
    "op_counts",
    "canonical",
    "as_float64",
    "run",
    "known_cross_graph_bug",
]

T = TypeVar("T")

# (atol, rtol) by dtype: how much further from the float64 result than twice the original's error
# the fused output may be, relative to the outputs' magnitude (at least 1).
TOLERANCES = {np.dtype(np.float32): (1e-5, 1e-4), np.dtype(np.float64): (1e-10, 1e-9)}
WIDTHS = (2, 3, 4, 6, 8)
BLOCKS = (
    ("linear",) * 3
    + ("residual",) * 3
    + ("lora",) * 3
    + ("nway",) * 2
    + ("bottleneck", "relu", "tanh", "max0", "batchnorm", "output", "if")
)


class Choices(Protocol):
    """Where every random decision of the generator comes from."""

    def pick(self, options: Sequence[T]) -> T: ...

    def integer(self, lo: int, hi: int) -> int: ...


class RngChoices:
    """:class:`Choices` from a numpy generator, seeded by ``(seed, index)`` in a fuzz run."""

    def __init__(self, *seed: int) -> None:
        self.rng = np.random.default_rng(list(seed))

    def pick(self, options: Sequence[T]) -> T:
        return options[int(self.rng.integers(len(options)))]

    def integer(self, lo: int, hi: int) -> int:
        return int(self.rng.integers(lo, hi + 1))


@dataclass
class Case:
    """A generated model, the same model in float64, and the feeds to run both on."""

    model: onnx.ModelProto
    reference: onnx.ModelProto
    feeds: list[dict[str, np.ndarray]]
    dtype: np.dtype
    blocks: list[str]


# --- building ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Val:
    name: str
    width: int


@dataclass
class _Scope:
    """One graph being built: the main graph or an ``If`` branch."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)


@dataclass
class _Builder:
    ch: Choices
    rng: np.random.Generator
    dtype: np.dtype
    lead: tuple[int | str, ...]
    anonymous: bool  # leave node names empty, as some exporters do
    share_scale: bool
    share_zero: bool
    kinds: Sequence[str] = BLOCKS
    depth: int = 0  # how many If branches the current scope is nested in
    main: _Scope = field(default_factory=_Scope)
    scope: _Scope | None = None
    shared: dict[str, str] = field(default_factory=dict)
    outputs: list[_Val] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)
    counter: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.scope = self.main

    @property
    def rank(self) -> int:
        return len(self.lead) + 1

    def fresh(self, prefix: str) -> str:
        return f"{prefix}{next(self.counter)}"

    def node(self, op: str, inputs: list[str], width: int, **attrs) -> _Val:
        out = _Val(self.fresh(op.lower()), width)
        name = "" if self.anonymous else out.name
        self.scope.nodes.append(helper.make_node(op, inputs, [out.name], name=name, **attrs))
        return out

    def constant(self, array: np.ndarray, *, outer: bool = False) -> str:
        """Store ``array``: an initializer (of this scope or the main graph), a ``Constant``
        node, or an initializer handed out through ``Identity`` (torch's deduplication)."""
        tensor = numpy_helper.from_array(np.asarray(array).astype(self.dtype), self.fresh("w"))
        kind = self.ch.pick(("init",) * 4 + ("outer", "constant", "identity"))
        if kind == "constant":
            name = tensor.name
            node = helper.make_node("Constant", [], [name], value=tensor, name=name)
            self.scope.nodes.append(node)
            return name
        (self.main if outer or kind == "outer" else self.scope).inits.append(tensor)
        if kind != "identity":
            return tensor.name
        return self.node("Identity", [tensor.name], 0).name

    def _shared(self, key: str, make: Callable[[], np.ndarray]) -> str:
        """One main-graph initializer for ``key``, made on first use (exporters deduplicate)."""
        if key not in self.shared:
            tensor = numpy_helper.from_array(make().astype(self.dtype), self.fresh(key))
            self.main.inits.append(tensor)
            self.shared[key] = tensor.name
        return self.shared[key]

    def scale(self) -> str:
        value = self.ch.pick((0.5, 2.0, -1.5))
        if self.share_scale:
            return self._shared("scale", lambda: np.array(value))
        return self.constant(np.array(value))

    def zero(self, width: int) -> str:
        return self._shared(f"zero{width}_", lambda: np.zeros(width))

    def bias(self, width: int) -> str | None:
        kind = self.ch.pick(("bias", "bias", "zero" if self.share_zero else "bias", "none"))
        if kind == "none":
            return None
        if kind == "zero":
            return self.zero(width)
        return self.constant(self.rng.standard_normal(width) * 0.3)

    def linear(self, h: _Val, width: int) -> _Val:
        """``Gemm(transB=1)`` (2-D, usually) or ``MatMul`` then a bias ``Add`` on either side."""
        w = self.rng.standard_normal((h.width, width)) / np.sqrt(h.width)
        bias = self.bias(width)
        if self.rank == 2 and self.ch.pick((True, True, False)):
            inputs = [h.name, self.constant(w.T)] + ([bias] if bias else [])
            return self.node("Gemm", inputs, width, transB=1)
        y = self.node("MatMul", [h.name, self.constant(w)], width)
        if bias is None:
            return y
        return self.node("Add", [y.name, bias][:: self.ch.pick((1, -1))], width)

    def chain(self, h: _Val, widths: Sequence[int]) -> _Val:
        for width in widths:
            h = self.linear(h, width)
        return h

    def join(self, terms: list[tuple[float, _Val]]) -> _Val:
        """The signed sum of ``terms`` as a random tree of ``Add``/``Sub``, or one ``Sum``."""
        width = terms[0][1].width
        if all(sign > 0 for sign, _ in terms) and self.ch.pick((False, False, True)):
            return self.node("Sum", [v.name for _, v in terms], width)
        terms = list(terms)
        while len(terms) > 1:
            i = self.ch.integer(0, len(terms) - 2)
            (sa, a), (sb, b) = terms[i], terms[i + 1]
            if sa > 0 and sb > 0:
                new = (1.0, self.node("Add", [a.name, b.name][:: self.ch.pick((1, -1))], width))
            elif sa > 0:
                new = (1.0, self.node("Sub", [a.name, b.name], width))
            elif sb > 0:
                new = (1.0, self.node("Sub", [b.name, a.name], width))
            else:
                new = (-1.0, self.node("Add", [a.name, b.name], width))
            terms[i : i + 2] = [new]
        sign, value = terms[0]
        return value if sign > 0 else self.node("Neg", [value.name], width)


def _residual(b: _Builder, h: _Val) -> _Val:
    inner = [b.ch.pick(WIDTHS)] if b.ch.pick((True, False)) else []
    branch = b.chain(h, [*inner, h.width])
    sign = b.ch.pick((1.0, 1.0, -1.0))
    terms = [(1.0, h), (sign, branch)]
    return b.join(terms[:: b.ch.pick((1, -1))])


def _adapter(b: _Builder, h: _Val, width: int) -> _Val:
    """``s * B(A(h))`` with ``A`` of rank 1 or 2, the scale before or after ``B``."""
    a = b.linear(h, b.ch.pick((1, 2)))
    if b.ch.pick((True, False)):
        a = b.node("Mul", [a.name, b.scale()][:: b.ch.pick((1, -1))], a.width)
        return b.linear(a, width)
    out = b.linear(a, width)
    return b.node("Mul", [out.name, b.scale()][:: b.ch.pick((1, -1))], width)


def _lora(b: _Builder, h: _Val) -> _Val:
    base = b.linear(h, b.ch.pick(WIDTHS)) if b.ch.pick((True, True, False)) else h
    adapter = _adapter(b, h, base.width)
    terms = [(1.0, base), (b.ch.pick((1.0, 1.0, -1.0)), adapter)]
    return b.join(terms[:: b.ch.pick((1, -1))])


def _nway(b: _Builder, h: _Val) -> _Val:
    width = h.width if b.ch.pick((True, False)) else b.ch.pick(WIDTHS)
    branches = [b.chain(h, [width]) for _ in range(b.ch.integer(2, 3))]
    if width == h.width and b.ch.pick((True, True, False)):
        branches.insert(b.ch.integer(0, len(branches)), h)
    return b.join([(b.ch.pick((1.0, 1.0, -1.0)), v) for v in branches])


def _bottleneck(b: _Builder, h: _Val) -> _Val:
    wide, narrow = b.ch.pick((8, 16)), b.ch.pick((1, 2))
    return b.chain(h, [narrow, wide, wide, narrow, wide][: b.ch.integer(3, 5)])


def _batchnorm(b: _Builder, h: _Val) -> _Val:
    """BatchNormalization whose weight and running variance are one initializer."""
    weight = b.constant(b.rng.uniform(0.5, 1.5, h.width))
    var = b.node("Identity", [weight], h.width).name
    shift = b.constant(b.rng.standard_normal(h.width) * 0.3)
    mean = b.constant(b.rng.standard_normal(h.width) * 0.3)
    return b.node("BatchNormalization", [h.name, weight, shift, mean, var], h.width)


def _if(b: _Builder, h: _Val) -> _Val:
    """``If(cond)`` whose branches each apply one to three blocks to the outer ``h``."""
    width = b.ch.pick(WIDTHS)
    inner = [k for k in b.kinds if k not in ("output", "if")] or ["linear", "residual"]
    if b.depth == 0 and "if" in b.kinds:
        inner.append("if")  # an If inside a branch, one level deep
    branches = []
    b.depth += 1
    for _ in range(2):
        outer, b.scope = b.scope, _Scope()
        cur = h
        for _ in range(b.ch.integer(1, 3)):
            cur = _block(b, b.ch.pick(inner), cur)
        if cur.width != width or cur is h:
            cur = b.linear(cur, width)
        out = helper.make_tensor_value_info(cur.name, _elem(b.dtype), [*b.lead, width])
        scope, b.scope = b.scope, outer
        branches.append(helper.make_graph(scope.nodes, b.fresh("branch"), [], [out], scope.inits))
    b.depth -= 1
    return b.node("If", ["cond"], width, then_branch=branches[0], else_branch=branches[1])


def _block(b: _Builder, kind: str, h: _Val) -> _Val:
    b.blocks.append(kind)
    if kind == "linear":
        return b.linear(h, b.ch.pick(WIDTHS))
    if kind in ("relu", "tanh"):
        return b.node(kind.capitalize(), [h.name], h.width)
    if kind == "max0":
        return b.node("Max", [h.name, b.zero(h.width)][:: b.ch.pick((1, -1))], h.width)
    if kind == "batchnorm" and b.rank != 2:
        return b.linear(h, h.width)
    build = {
        "residual": _residual,
        "lora": _lora,
        "nway": _nway,
        "bottleneck": _bottleneck,
        "batchnorm": _batchnorm,
        "if": _if,
    }[kind]
    return build(b, h)


def _elem(dtype: np.dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(dtype)


def generate(ch: Choices, blocks: Sequence[str] = BLOCKS) -> Case:
    """A random model of ``blocks`` (drawn with repetition), its float64 twin, and its feeds."""
    dtype = np.dtype(ch.pick((np.float32,) * 3 + (np.float64,)))
    opset = ch.pick((13, 17, 21))
    lead = ch.pick(((3,), ("batch",), ("batch", 2)))
    rng = np.random.default_rng(ch.integer(0, 2**32 - 1))
    flags = [ch.pick((True, False)) for _ in range(2)]
    b = _Builder(ch, rng, dtype, lead, ch.pick((False,) * 4 + (True,)), *flags, kinds=blocks)
    x = h = _Val("x", ch.pick(WIDTHS))
    for _ in range(ch.integer(1, 6)):
        kind = ch.pick(blocks)
        if kind == "output":
            b.blocks.append(kind)
            if h is not x and h not in b.outputs:
                b.outputs.append(h)
            continue
        h = _block(b, kind, h)
    if h is x or h in b.outputs:
        h = b.node("Relu", [h.name], h.width)
    return _finish(b, x, h, opset)


def _finish(b: _Builder, x: _Val, h: _Val, opset: int) -> Case:
    elem, shape = _elem(b.dtype), lambda v: [*b.lead, v.width]
    outputs = [helper.make_tensor_value_info(v.name, elem, shape(v)) for v in [*b.outputs, h]]
    if b.ch.pick((True, True, False)):
        of = b.ch.pick([*b.outputs, h, h])
        mean = b.node("ReduceMean", [of.name], 0, keepdims=0)
        outputs.insert(
            b.ch.integer(0, len(outputs)), helper.make_tensor_value_info(mean.name, elem, [])
        )
    inputs = [helper.make_tensor_value_info("x", elem, shape(x))]
    has_if = "if" in b.blocks
    if has_if:
        inputs.append(helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []))
    graph = helper.make_graph(b.main.nodes, "random_structure", inputs, outputs, b.main.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset <= 17 else 10
    if b.ch.pick((True, False)):  # exporters often record every intermediate's type and shape
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    concrete = [3 if d == "batch" else d for d in shape(x)]
    xs = b.rng.uniform(-1, 1, concrete).astype(b.dtype)
    conds = [True, False] if has_if else [None]
    feeds = [{"x": xs} | ({} if c is None else {"cond": np.array(c)}) for c in conds]
    return Case(model, as_float64(model), feeds, b.dtype, b.blocks)


# --- model utilities --------------------------------------------------------------------------


def as_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model computing in float64: float tensors and value types become double."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _graph_to_float64(copy.graph)
    return copy


def _tensor_to_float64(tensor: onnx.TensorProto) -> None:
    if tensor.data_type == onnx.TensorProto.FLOAT:
        array = numpy_helper.to_array(tensor).astype(np.float64)
        tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))


def _graph_to_float64(graph: onnx.GraphProto) -> None:
    for tensor in graph.initializer:
        _tensor_to_float64(tensor)
    for info in [*graph.input, *graph.output, *graph.value_info]:
        if info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            info.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                _tensor_to_float64(attr.t)
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                _graph_to_float64(sub)


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    subs = []
    for attr in node.attribute:
        subs += [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
    return subs


def _reads(node: onnx.NodeProto) -> set[str]:
    """Every name ``node`` reads, its subgraphs' reads from outer scopes included."""
    names = {i for i in node.input if i}
    for sub in _subgraphs(node):
        local = {i.name for i in sub.input} | {t.name for t in sub.initializer}
        for inner in sub.node:
            names |= _reads(inner) - local
            local |= set(inner.output)
        names |= {o.name for o in sub.output} - local
    return names


def shuffled(model: onnx.ModelProto, rng: np.random.Generator) -> onnx.ModelProto:
    """A copy of ``model`` with every graph's nodes in another random topological order."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _shuffle_graph(copy.graph, rng)
    return copy


def _shuffle_graph(graph: onnx.GraphProto, rng: np.random.Generator) -> None:
    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps = [{producer[r] for r in _reads(n) if r in producer} for n in nodes]
    users = collections.defaultdict(list)
    for i, ds in enumerate(deps):
        for d in ds:
            users[d].append(i)
    waiting = [len(ds) for ds in deps]
    ready, order = [i for i, w in enumerate(waiting) if w == 0], []
    while ready:
        i = ready.pop(int(rng.integers(len(ready))))
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    assert len(order) == len(nodes), "the generated graph is not acyclic"
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
    for node in graph.node:
        for sub in _subgraphs(node):
            _shuffle_graph(sub, rng)


def canonical(model: onnx.ModelProto) -> bytes:
    """``model``'s bytes without the ``value_info`` entries of initializers: onnx-ir writes one
    for every initializer whose value has a type, and the engine's new weights have none until
    the next load (see ``test_merged_weights_have_a_type`` in test_random_structures.py)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)

    def strip(graph: onnx.GraphProto) -> None:
        weights = {t.name for t in graph.initializer}
        kept = [v for v in graph.value_info if v.name not in weights]
        del graph.value_info[:]
        graph.value_info.extend(kept)
        for node in graph.node:
            for sub in _subgraphs(node):
                strip(sub)

    strip(copy.graph)
    return copy.SerializeToString()


def op_counts(model: onnx.ModelProto) -> collections.Counter[str]:
    """How many nodes of each op type, over every graph of the model."""
    counts: collections.Counter[str] = collections.Counter()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[node.op_type] += 1
            for sub in _subgraphs(node):
                walk(sub)

    walk(model.graph)
    return counts


def fuse_with_report(
    model: onnx.ModelProto, policy: str
) -> tuple[onnx.ModelProto, FusionReport, ir.Model]:
    """What ``converter.fuse`` does, through the pass, keeping the report and the IR model."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    ir_model = ir.serde.deserialize_model(copy)
    report = fuse_model(ir_model, policy=policy)
    return ir.serde.serialize_model(ir_model), report, ir_model


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """``model``'s outputs under onnxruntime, graph optimisations off, one thread."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), so, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


# --- the properties ---------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one checked case did: fusions made and the fused model's op counts."""

    fusions: int
    ops_before: int
    ops_after: int
    tolerated: bool = False


def assert_close(case: Case, fused: onnx.ModelProto, what: str) -> None:
    """(b) Every output of ``fused`` is as close to the float64 evaluation of the original as
    twice the original's own error, plus ``atol + rtol * scale`` (``scale``: the largest output
    magnitude, at least 1, since inputs are in [-1, 1) and weights are scaled by 1/sqrt(width)).

    A merge reassociates sums, so bit equality is too strict and a fixed tolerance too loose or
    too strict depending on magnitudes; measuring against float64 accepts a merge that is *more*
    accurate than the original, as the CLI's validation does.
    """
    atol, rtol = TOLERANCES[case.dtype]
    names = [o.name for o in case.model.graph.output]
    for feeds in case.feeds:
        ref_feeds = {
            k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in feeds.items()
        }
        refs = run(case.reference, ref_feeds)
        scale = max([1.0] + [float(np.max(np.abs(r), initial=0.0)) for r in refs])
        for name, ref, orig, got in zip(
            names, refs, run(case.model, feeds), run(fused, feeds), strict=True
        ):
            assert got.shape == ref.shape and got.dtype == case.dtype, (
                f"(b) {what}: output '{name}' is {got.dtype}{got.shape}, expected {ref.shape}"
            )
            err_orig = float(np.max(np.abs(orig - ref), initial=0.0))
            err = float(np.max(np.abs(got.astype(np.float64) - ref), initial=0.0))
            bound = 2 * err_orig + atol + rtol * scale
            assert err <= bound, (
                f"(b) {what}: output '{name}' is {err:.3g} from float64 > {bound:.3g} "
                f"(original {err_orig:.3g}, feeds {sorted(feeds)})"
            )


def _assert_records(report: FusionReport, ir_model: ir.Model) -> None:
    """(f) Records name only live values; consumed ones say which merge took them."""
    # Labels are not unique (two anonymous If nodes both give "If.then_branch"): union them.
    live: dict[str, set[str]] = collections.defaultdict(set)
    for graph, label in iter_graphs(ir_model.graph):
        live[label] |= {v.name for n in graph for v in n.outputs} | {v.name for v in graph.outputs}
    merged_nodes = {n for r in report.fusions for n in r.new_nodes}
    claimed: set[tuple[str, str]] = set()
    for r in report.fusions:
        if r.output is None:
            assert r.merged_into in merged_nodes, (
                f"(f) record of {r.nodes} has no output but merged_into={r.merged_into!r}"
            )
            continue
        assert r.merged_into is None, f"(f) record of {r.nodes} has both output and merged_into"
        assert r.output in live.get(r.graph, ()), (
            f"(f) record of {r.nodes} names '{r.output}', which is not in {r.graph} any more"
        )
        assert (r.graph, r.output) not in claimed, f"(f) two records claim '{r.output}'"
        claimed.add((r.graph, r.output))


def _loads(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def known_cross_graph_bug(first: FusionReport, second: FusionReport) -> bool:
    """The engine bug of ``test_idempotent_when_a_constant_is_shared_across_graphs``: the second
    pass's first merge is one the first pass declined by the parameter rule (a constant it
    needed was still shared with a graph fused later)."""
    merge = second.fusions[0]
    return any(
        d.graph == merge.graph and "parameters" in d.reason and d.nodes == merge.nodes
        for d in first.declined
    )


def check_case(
    case: Case,
    policy: str,
    shuffle_seed: int = 0,
    tolerate: Callable[[FusionReport, FusionReport], bool] | None = None,
) -> Outcome:
    """Assert properties (a) to (f) of the module docstring for ``case`` under ``policy``.

    ``tolerate(first_report, second_report)``, if given, may excuse a second pass that merges
    again (a known engine bug the caller keeps a reproducer of); the outcome says so.
    """
    before = case.model.SerializeToString()
    fused = converter.fuse(case.model, policy=policy)
    assert case.model.SerializeToString() == before, "(a) fuse() mutated its argument"
    try:
        _loads(fused)
    except Exception as e:
        raise AssertionError(f"(a) the fused model is invalid: {e}") from e
    assert_close(case, fused, "fused")
    via_pass, report, ir_model = fuse_with_report(case.model, policy)
    assert via_pass.SerializeToString() == fused.SerializeToString(), (
        "(a) converter.fuse and the pass give different models"
    )
    again, report2, _ = fuse_with_report(fused, policy)
    tolerated = bool(report2.fusions) and tolerate is not None and tolerate(report, report2)
    if not tolerated:
        merged = [r.nodes for r in report2.fusions]
        assert not merged, f"(c) fusing again merged {merged}"
        assert canonical(again) == canonical(fused), "(c) fusing again changed the model"
    other = shuffled(case.model, np.random.default_rng(shuffle_seed))
    fused_other = converter.fuse(other, policy=policy)
    try:
        _loads(fused_other)
    except Exception as e:
        raise AssertionError(f"(d) the fused shuffled model is invalid: {e}") from e
    assert op_counts(fused_other) == op_counts(fused), (
        f"(d) node order changed the result: {dict(op_counts(fused))} vs "
        f"{dict(op_counts(fused_other))} after shuffling"
    )
    assert_close(case, fused_other, "fused after shuffling")
    _assert_records(report, ir_model)
    before_ops = sum(op_counts(case.model).values())
    return Outcome(len(report.fusions), before_ops, sum(op_counts(fused).values()), tolerated)
