"""Random graphs of the structures merges must compose over, and the properties every fusion keeps.

Shared by ``tests/fusion/test_random_structures.py`` (hypothesis, a few hundred graphs) and
``benchmarks/fuzz.py`` (seeded, thousands). Every random decision goes through a :class:`Choices`
object, so the same generator runs on hypothesis' ``draw`` (which shrinks a failing graph) or on
a numpy generator seeded by ``(seed, index)`` (which a fuzz run prints as the reproducer).

:func:`generate` builds, on an input ``x`` of shape ``[B, d]`` (Gemm form), ``[B, 2, d]`` or
``[2, 3, d]`` (MatMul+Add form), float32 or float64, opset 13, 17 or 21 -- or, a quarter of the
time, an image ``[N, C, H, W]`` (float32, ``H``, ``W`` in 4..6) -- a sequence of blocks applied
to the running value ``h``:

- ``linear``: one layer ``L(h)`` to a new width; a tenth of the layers (here and in every block)
  have a no-op step (``Neg``, ``Identity``, inference ``Dropout``, same-type ``Cast``) after the
  MatMul or the layer;
- ``residual``: ``h + L(h)``, ``h - L(h)``, ``L(h) - h`` or ``Sum(h, L(h))``, L of one or two layers;
- ``lora``: ``base(h) + s * B(A(h))`` (or ``h + ...``, or with ``Sub``/``Sum``), the scale ``s``
  before or after ``B``; ``s`` is usually one initializer shared by every adapter of the model;
- ``nway``: ``a(h) + b(h) + h`` and wider, as a random tree of ``Add``/``Sub`` or one ``Sum``;
- ``stack``: the same as ``torch.stack([a(h), b(h), h]).sum(0)`` exports it: ``Unsqueeze`` at 0,
  ``Concat``, ``ReduceSum(axes=[0], keepdims=0)``;
- ``sandwich``: ``Reshape(h, (-1, C)) -> Gemm -> Reshape`` back (GPT-2's Conv1D) plus a LoRA
  adapter on ``h`` (and sometimes ``h``);
- ``bottleneck``: a chain ``d -> r -> d -> d -> r -> d`` the cost model splits into segments;
- ``left``: ``W2 @ (W1 @ h + b1) + b2`` along the second-to-last axis, biases ``(out, 1)``,
  sometimes a ``Relu`` between;
- ``view_bn``: ``L(h) -> Reshape(-1, D) | Flatten -> BatchNormalization -> Reshape`` back;
- ``view_scale``: ``L(h) -> Transpose`` (moving the last axis) ``-> Mul/Add/Sub/Div`` by a scalar
  or a per-feature constant shaped for the new axis ``-> Transpose`` back;
- ``qkv``: ``L(h)`` to ``3C``, ``Split`` in three, ``Reshape(B, T, heads, C/heads) ->
  Transpose(0, 2, 1, 3)``, a scalar ``Mul``/``Div`` on some of q, k, v, attention, and back;
- negative cases of these three: a constant that also varies along another axis, a ``Flatten``
  that regroups the features with another axis, a view or step result that is also a graph
  output or has a second reader; views sometimes go through a same-type ``Cast``;
- ``relu``/``tanh``/``max0`` (``Max(h, zero)``, reading the shared zero bias), ``batchnorm``
  (2-D or images; its weight and running variance are one initializer, the variance via
  ``Identity``), ``noop`` (one or two no-op steps);
- images only: ``conv`` (a Conv, k 1 or 3, pads keeping the size, groups 1 or C, bias or not,
  then a BatchNorm, a per-channel ``Mul``/``Add`` of shape ``(1, C, 1, 1)``/``(C, 1, 1)``/scalar,
  or rarely an ``Add`` varying along the rows); ``repvgg`` (``conv3x3 + conv1x1 + h``, each
  branch maybe with a BatchNorm); ``conv_scale`` (a channel ``Mul``, or a shift that must not
  fold into a padded conv, before a Conv); ``conv_seq`` (1x1 then 3x3, or the other way);
  ``conv_mlp`` (ConvNeXt-style: a 1x1 Conv, maybe a channel step, ``Transpose(0, 2, 3, 1)``,
  one or two linear layers, back to channels-first, maybe a layer scale, maybe a residual);
  other blocks see the image channels-last through ``Transpose(0, 2, 3, 1)``, and an image block
  after them goes back through ``Transpose(0, 3, 1, 2)``, sometimes with a channel ``Mul``;
- ``gelu``: exact GELU in TorchScript's, dynamo's or the ``(x * 0.5) * (1 + erf)`` order, often
  right after a linear layer; ``norm``: a LayerNorm (weight and bias) or RMSNorm decomposition,
  ``x / sqrt`` or ``x * Reciprocal(sqrt)`` (patterns onnxruntime fuses: property (g));
- ``fanout``: a per-feature or scalar ``Mul`` (sometimes then an ``Add``) of ``h`` read by two or
  three linear layers of one width, their outputs joined by ``Mul`` and ``Add`` (not a branch
  sum); sometimes (negative) a ``Relu`` reads the scaled value too;
- ``computed``: ``base(h) + h @ delta`` with the delta computed in the graph from constants:
  ``s * (A @ B)`` (LoRA's product), ``(A1 @ B1) * (A2 @ B2)`` (LoHa's), or ``Transpose`` of
  either (torch's ``(out, in)`` layout);
- ``vera``: two adapted layers of ``h`` whose adapters share one ``h @ A`` (VeRA's frozen pair
  after an exporter's common-subexpression elimination), each ``* d_i -> @ B -> * b_i`` added
  to its base layer, joined by ``Mul``;
- ``region``: a map of each row through reshapes of it beside or before a layer (OFT's blocks,
  ``rotate_half``, RoAd's rotation, MiSS's sum over blocks, AdaMSS's subspaces), or a
  ``ColumnTransformer``'s picks of columns (ONNX-ML ``ArrayFeatureExtractor`` or ``Gather``),
  scaled and joined by a ``Concat``;
- ``output``: the current value also becomes a graph output (an intermediate of a later chain);
- ``if``: an ``If`` on a boolean graph input whose two branches each hold such blocks on the
  outer ``h`` (an ``If`` too, one level deep), with weights in the branch or in the outer graph
  (shared scale and zero included).

Constants are initializers, ``Constant`` nodes, or initializers reached through ``Identity``; a
zero bias of each width may be one initializer shared by several layers and by ``Max``. Graph
outputs: the final value, the intermediates marked ``output``, views and steps of the negative
cases, and often a 0-d ``ReduceMean`` of the final value or an intermediate. Node names are
sometimes empty; shapes are sometimes inferred into ``value_info``. The float64 twin runs on
onnxruntime, or on onnx's reference evaluator when it has a Conv (onnxruntime has no float64
Conv).

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
    output a later merge consumed has ``output None`` and ``merged_into`` naming a merged node
    (a step folded across views has neither: the op's output name carries it; nor has a merge
    that took over such an op, whose output name then carries the step too);
(g) every fused kernel onnxruntime makes of the original (``Gelu``, ``LayerNormalization``...,
    under its extended optimisations) it makes of the fused model too;
(h) with ``scramble``: fusing a copy whose nodes (in every graph) are listed in a random order,
    not a topological one (``builders.scrambled``), gives the same result as the sorted graph:
    the same op-type counts and number of fusions, matching outputs, a fused model in topological
    order that the full checker accepts, and a report that says the input was sorted.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np
import onnx
import onnx.reference
import onnx_ir as ir
import onnxruntime as ort
from builders import in_topological_order, scrambled
from onnx import helper, numpy_helper

import converter
from converter.equivalence.kernels import fused_kernels, lost_kernels
from converter.equivalence.reference import BatchNormalization
from converter.fusion.passes import fuse_model, iter_graphs
from converter.report import FusionRecord, FusionReport

__all__ = [
    "Choices",
    "RngChoices",
    "Case",
    "Outcome",
    "BLOCKS",
    "IMAGE_BLOCKS",
    "generate",
    "check_case",
    "assert_close",
    "shuffled",
    "fuse_with_report",
    "op_counts",
    "canonical",
    "as_float64",
    "run",
]

T = TypeVar("T")
ML_DOMAIN = "ai.onnx.ml"

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
    + ("view_bn", "view_scale", "view_scale", "qkv", "left", "stack", "sandwich", "noop")
    + ("conv", "conv", "repvgg", "repvgg", "conv_mlp", "conv_scale", "conv_seq", "conv_views")
    + ("gelu", "norm", "max0")
    + (
        "fanout",
        "fanout",
        "computed",
        "computed",
        "vera",
        "vera",
        "region",
        "region",
        "flax_linear",
        "tf_dense",
        "tf_dense",
    )
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
    refs: dict[int, list[np.ndarray]] = field(default_factory=dict)  # float64 outputs by feed

    def reference_outputs(self, index: int) -> list[np.ndarray]:
        """The float64 model's outputs on ``feeds[index]`` (onnxruntime has no float64 Conv
        or Erf: a model with one runs on onnx's reference evaluator)."""
        if index not in self.refs:
            feeds = {
                k: v.astype(np.float64) if v.dtype.kind == "f" else v
                for k, v in self.feeds[index].items()
            }
            if {"Conv", "Erf"} & set(op_counts(self.reference)):
                evaluator = onnx.reference.ReferenceEvaluator(
                    self.reference, new_ops=[BatchNormalization]
                )
                self.refs[index] = [np.asarray(r) for r in evaluator.run(None, feeds)]
            else:
                self.refs[index] = run(self.reference, feeds)
        return self.refs[index]


# --- building ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Val:
    """A value of the running graph: ``[*lead, width]`` (rows), or ``[N, width, H, W]`` (an
    image, when ``lead`` is ``(N, H, W)``)."""

    name: str
    width: int
    image: bool = False


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
    opset: int = 17
    depth: int = 0  # how many If branches the current scope is nested in
    main: _Scope = field(default_factory=_Scope)
    scope: _Scope | None = None
    shared: dict[str, str] = field(default_factory=dict)
    outputs: list[_Val] = field(default_factory=list)
    # Views and steps that are also graph outputs (negative cases of the absorb), with shapes.
    extra_outputs: list[tuple[str, list[int | str]]] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)
    counter: itertools.count = field(default_factory=itertools.count)
    ml: bool = False  # an ONNX-ML op was written: the model imports ai.onnx.ml

    def __post_init__(self) -> None:
        self.scope = self.main

    @property
    def rank(self) -> int:
        return len(self.lead) + 1

    def shape(self, v: _Val) -> list[int | str]:
        if v.image:
            return [self.lead[0], v.width, *self.lead[1:]]
        return [*self.lead, v.width]

    def fresh(self, prefix: str) -> str:
        return f"{prefix}{next(self.counter)}"

    def node(self, op: str, inputs: list[str], width: int, image: bool = False, **attrs) -> _Val:
        out = _Val(self.fresh(op.lower()), width, image)
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

    def ints(self, values: Sequence[int]) -> str:
        """An int64 vector (axes, shapes, split sizes): an initializer or a ``Constant``."""
        tensor = numpy_helper.from_array(np.array(values, np.int64), self.fresh("i"))
        if self.ch.pick((True, False)):
            self.scope.inits.append(tensor)
        else:
            self.scope.nodes.append(
                helper.make_node("Constant", [], [tensor.name], value=tensor, name=tensor.name)
            )
        return tensor.name

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
        """``Gemm(transB=1)`` (2-D, usually) or ``MatMul`` then a bias ``Add`` on either side;
        sometimes a no-op step (``Neg``, ``Identity``, ``Dropout``, same-type ``Cast``) after
        the MatMul or the layer."""
        h = self.to_rows(h)
        w = self.rng.standard_normal((h.width, width)) / np.sqrt(h.width)
        bias = self.bias(width)
        if self.rank == 2 and self.ch.pick((True, True, False)):
            inputs = [h.name, self.constant(w.T)] + ([bias] if bias else [])
            return self.maybe_noop(self.node("Gemm", inputs, width, transB=1))
        y = self.node("MatMul", [h.name, self.constant(w)], width)
        if bias is None:
            return self.maybe_noop(y)
        y = self.maybe_noop(y)
        return self.maybe_noop(self.node("Add", [y.name, bias][:: self.ch.pick((1, -1))], width))

    def maybe_noop(self, h: _Val) -> _Val:
        return self.noop(h) if self.ch.pick((False,) * 9 + (True,)) else h

    def noop(self, h: _Val) -> _Val:
        """A step that is the identity map (or ``-I``): Neg, Identity, Dropout, Cast."""
        op = self.ch.pick(("Neg", "Identity", "Dropout", "Cast"))
        attrs = {"to": _elem(self.dtype)} if op == "Cast" else {}
        return self.node(op, [h.name], h.width, h.image, **attrs)

    def same_cast(self, name: str) -> str:
        """``name``, sometimes through a ``Cast`` to the type it already has."""
        if self.ch.pick((True, False, False)):
            return self.node("Cast", [name], 0, to=_elem(self.dtype)).name
        return name

    def chain(self, h: _Val, widths: Sequence[int]) -> _Val:
        for width in widths:
            h = self.linear(h, width)
        return h

    def join(self, terms: list[tuple[float, _Val]]) -> _Val:
        """The signed sum of ``terms`` as a random tree of ``Add``/``Sub``, or one ``Sum``."""
        width, image = terms[0][1].width, terms[0][1].image
        if all(sign > 0 for sign, _ in terms) and self.ch.pick((False, False, True)):
            return self.node("Sum", [v.name for _, v in terms], width, image)
        terms = list(terms)
        while len(terms) > 1:
            i = self.ch.integer(0, len(terms) - 2)
            (sa, a), (sb, b) = terms[i], terms[i + 1]
            if sa > 0 and sb > 0:
                names = [a.name, b.name][:: self.ch.pick((1, -1))]
                new = (1.0, self.node("Add", names, width, image))
            elif sa > 0:
                new = (1.0, self.node("Sub", [a.name, b.name], width, image))
            elif sb > 0:
                new = (1.0, self.node("Sub", [b.name, a.name], width, image))
            else:
                new = (-1.0, self.node("Add", [a.name, b.name], width, image))
            terms[i : i + 2] = [new]
        sign, value = terms[0]
        return value if sign > 0 else self.node("Neg", [value.name], width, image)

    def to_rows(self, h: _Val) -> _Val:
        """An image as rows ``[N, H, W, C]`` (channels last)."""
        if not h.image:
            return h
        return self.node("Transpose", [h.name], h.width, perm=[0, 2, 3, 1])

    def to_image(self, h: _Val) -> _Val:
        """Rows ``[N, H, W, C]`` as an image, sometimes then a per-channel ``Mul`` (a layer
        scale after a permute to channels-first: it folds into a MatMul before the view)."""
        if h.image:
            return h
        out = self.node("Transpose", [h.name], h.width, True, perm=[0, 3, 1, 2])
        if self.ch.pick((True, False)):
            return out
        c = self.channel_constant(h.width, self.rng.uniform(0.5, 1.5, h.width))
        return self.node("Mul", [out.name, c][:: self.ch.pick((1, -1))], h.width, True)

    def channel_constant(self, width: int, vector: np.ndarray) -> str:
        """A per-channel constant of an image: ``(1, C, 1, 1)``, ``(C, 1, 1)`` or a scalar."""
        shape = self.ch.pick(((1, width, 1, 1), (width, 1, 1), (1, width, 1, 1), ()))
        if shape == ():
            return self.constant(np.array(vector[0]))
        return self.constant(vector.reshape(shape))

    def reshape(self, h: str, dims: Sequence[int | str], width: int, **kw) -> _Val:
        """``Reshape`` to ``dims``, a symbolic batch written as -1."""
        shape = [-1 if isinstance(d, str) else d for d in dims]
        return self.node("Reshape", [h, self.ints(shape)], width, **kw)

    def output(self, name: str, shape: Sequence[int | str]) -> None:
        """``name`` also becomes a graph output (main graph only)."""
        if self.depth == 0:
            self.extra_outputs.append((name, list(shape)))


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
    return b.node("BatchNormalization", [h.name, weight, shift, mean, var], h.width, h.image)


def _bn_params(b: _Builder, width: int) -> list[str]:
    """Random BatchNormalization parameters: scale, bias, mean, variance."""
    r = b.rng
    arrays = [r.uniform(0.5, 1.5, width), r.standard_normal(width) * 0.3]
    arrays += [r.standard_normal(width) * 0.3, r.uniform(0.5, 1.5, width)]
    return [b.constant(a) for a in arrays]


# --- steps after views of a linear op's output (converter/fusion/absorb.py) -------------------


def _view_bn(b: _Builder, h: _Val) -> _Val:
    """``L(h) -> Reshape(-1, D) | Flatten -> BatchNormalization -> Reshape back``: a BatchNorm
    over tokens. Negative cases: a Flatten that regroups the features with another axis, the
    BatchNorm's result or the view also a graph output, a second reader of the view."""
    width = b.ch.pick(WIDTHS)
    y = b.linear(h, width)
    dims = b.shape(y)
    rows = "rows" if any(isinstance(d, str) for d in dims) else int(np.prod(dims[:-1]))
    kind = b.ch.pick(("reshape", "reshape", "flatten", "regroup"))
    tail = dims[1:-1]
    if kind == "regroup" and tail and all(isinstance(d, int) for d in tail):
        flat_dims = [dims[0], int(np.prod(tail)) * width]
        flat = b.node("Flatten", [y.name], flat_dims[1], axis=1)
    elif kind == "reshape":
        flat_dims = [rows, width]
        flat = b.reshape(y.name, [-1, width], width)
    else:
        flat_dims = [rows, width]
        flat = b.node("Flatten", [y.name], width, axis=len(dims) - 1)
    data = _negatives(b, _Val(b.same_cast(flat.name), flat.width), flat_dims)
    params = _bn_params(b, data.width)
    bn = b.node("BatchNormalization", [data.name, *params], data.width)
    if b.ch.pick((False,) * 5 + (True,)):
        b.output(bn.name, flat_dims)
    return b.reshape(bn.name, dims, width)


def _negatives(b: _Builder, view: _Val, shape: Sequence[int | str]) -> _Val:
    """Sometimes the view is also a graph output, or has a second reader (a Relu that is)."""
    kind = b.ch.pick(("none",) * 8 + ("output", "reader"))
    if kind == "output":
        b.output(view.name, shape)
    elif kind == "reader":
        b.output(b.node("Relu", [view.name], view.width).name, shape)
    return view


def _view_scale(b: _Builder, h: _Val) -> _Val:
    """``L(h) -> Transpose(perm moving the last axis) -> step by a constant -> Transpose
    back``, the constant a scalar or per feature at the new axis; or (negative) varying along
    another axis too."""
    width = b.ch.pick(WIDTHS)
    y = b.linear(h, width)
    dims = b.shape(y)
    rank = len(dims)
    perm = list(range(rank))
    while perm[-1] == rank - 1:
        perm = [int(p) for p in b.rng.permutation(rank)]
    tdims = [dims[p] for p in perm]
    moved = b.node("Transpose", [y.name], width, perm=perm)
    data = _negatives(b, _Val(b.same_cast(moved.name), width), tdims)
    axis = perm.index(rank - 1)
    op = b.ch.pick(("Mul", "Mul", "Mul", "Add", "Sub", "Div"))
    const = b.constant(_step_constant(b, tdims, axis))
    inputs = [data.name, const] if op == "Div" else [data.name, const][:: b.ch.pick((1, -1))]
    out = b.node(op, inputs, width)
    if b.ch.pick((False,) * 7 + (True,)):
        b.output(out.name, tdims)
    inverse = [perm.index(i) for i in range(rank)]
    return b.node("Transpose", [out.name], width, perm=inverse)


def _step_constant(b: _Builder, dims: Sequence[int | str], axis: int) -> np.ndarray:
    """A scalar, a vector along ``axis`` (leading ones dropped or not), or (negative) one that
    also varies along another static axis."""
    rank, width = len(dims), dims[axis]
    kind = b.ch.pick(("scalar", "feature", "feature", "other"))
    others = [i for i, d in enumerate(dims) if i != axis and isinstance(d, int) and d > 1]
    values = lambda shape: b.rng.uniform(0.5, 1.5, shape) * b.ch.pick((1, -1))  # noqa: E731
    if kind == "scalar":
        return values(()) if b.ch.pick((True, False)) else values((1,))
    shape = [1] * rank
    shape[axis] = width
    if kind == "other" and others:
        other = b.ch.pick(others)
        shape[other] = dims[other]
        start = min(axis, other)
    else:
        start = axis
    return values(tuple(shape[b.ch.integer(0, start) :]))


def _qkv(b: _Builder, h: _Val) -> _Val:
    """A fused qkv projection ``L(h)`` to ``3C``, ``Split`` in three, each ``Reshape(B, T,
    heads, C/heads) -> Transpose(0, 2, 1, 3)``, a scalar ``Mul`` on q or k (or v), attention,
    and back to ``(B, T, C)``. Needs a static ``T``; otherwise a ``view_scale`` block."""
    if b.rank != 3 or not isinstance(b.lead[1], int):
        return _view_scale(b, h)
    width = h.width
    heads = b.ch.pick([d for d in (1, 2, 3, 4) if width % d == 0])
    y = b.linear(h, 3 * width)
    parts = [b.fresh("split") for _ in range(3)]
    inputs, attrs = [y.name], {"axis": b.ch.pick((-1, 2))}
    if b.ch.pick((True, False)):
        inputs.append(b.ints([width] * 3))
    elif b.opset >= 18:
        attrs["num_outputs"] = 3
    name = "" if b.anonymous else parts[0]
    b.scope.nodes.append(helper.make_node("Split", inputs, parts, name=name, **attrs))
    lead = [b.lead[0], b.lead[1]]
    heads_dims = [*lead, heads, width // heads]
    qkv = []
    for part in parts:
        split = b.reshape(part, heads_dims, width)
        t = b.node("Transpose", [b.same_cast(split.name)], width, perm=[0, 2, 1, 3])
        if b.ch.pick((True, True, False)):
            t = _head_scale(b, t, heads)
        qkv.append(t)
    q, k, v = qkv
    kt = b.node("Transpose", [k.name], 0, perm=[0, 1, 3, 2])
    scores = b.node("MatMul", [q.name, kt.name], 0)
    probs = b.node("Softmax", [scores.name], 0, axis=-1)
    o = b.node("MatMul", [probs.name, v.name], width)
    o = b.node("Transpose", [o.name], width, perm=[0, 2, 1, 3])
    return b.reshape(o.name, [*lead, width], width)


def _head_scale(b: _Builder, t: _Val, heads: int) -> _Val:
    """A scalar ``Mul``/``Div`` (folds), or (negative) a ``Mul`` by one scale per head."""
    if b.ch.pick((False,) * 5 + (True,)) and heads > 1:
        c = b.constant(b.rng.uniform(0.5, 1.5, (heads, 1, 1)))
        return b.node("Mul", [t.name, c], t.width)
    op = b.ch.pick(("Mul", "Mul", "Div"))
    c = b.constant(np.array(b.rng.uniform(0.3, 1.5)))
    inputs = [t.name, c] if op == "Div" else [t.name, c][:: b.ch.pick((1, -1))]
    return b.node(op, inputs, t.width)


# --- other new structures -----------------------------------------------------------------------


def _left(b: _Builder, h: _Val) -> _Val:
    """``W2 @ relu?(W1 @ h + b1) + b2`` along the second-to-last axis (token mixing), biases of
    shape ``(out, 1)``; back to the axis' extent. Needs a static extent; else a linear layer."""
    n = b.lead[-1]
    if not isinstance(n, int):
        return b.linear(h, b.ch.pick(WIDTHS))
    sizes = [b.ch.pick((2, 3, 4, 6)) for _ in range(b.ch.integer(0, 2))] + [n]
    cur, size = h.name, n
    for i, out in enumerate(sizes):
        w = b.constant(b.rng.standard_normal((out, size)) / np.sqrt(size))
        cur = b.node("MatMul", [w, cur], h.width).name
        if b.ch.pick((True, True, False)):
            bias = b.rng.standard_normal((out, 1)) * 0.3
            if b.rank > 2 and b.ch.pick((True, False)):
                bias = bias[None]
            cur = b.node("Add", [cur, b.constant(bias)][:: b.ch.pick((1, -1))], h.width).name
        if i + 1 < len(sizes) and b.ch.pick((True, False, False)):
            cur = b.node(b.ch.pick(("Relu", "Identity", "Neg")), [cur], h.width).name
        size = out
    return _Val(cur, h.width)


def _stack(b: _Builder, h: _Val) -> _Val:
    """``torch.stack([a(h), b(h), (h)]).sum(0)``: Unsqueeze each at 0, Concat, ReduceSum."""
    width = h.width if b.ch.pick((True, False)) else b.ch.pick(WIDTHS)
    branches = [b.chain(h, [width]) for _ in range(b.ch.integer(1, 3))]
    if width == h.width and (len(branches) == 1 or b.ch.pick((True, False))):
        branches.insert(b.ch.integer(0, len(branches)), h)
    if len(branches) == 1:
        branches.append(b.linear(h, width))
    axes = b.ints([0])
    stacked = [b.node("Unsqueeze", [v.name, axes], width).name for v in branches]
    concat = b.node("Concat", stacked, width, axis=0)
    return b.node("ReduceSum", [concat.name, b.ints([0])], width, keepdims=0)


def _sandwich(b: _Builder, h: _Val) -> _Val:
    """``Reshape(h, (-1, C)) -> Gemm -> Reshape(B, T, D)`` (GPT-2's Conv1D) plus a LoRA
    adapter on ``h`` itself, and sometimes ``h``."""
    width = b.ch.pick(WIDTHS)
    flat = b.reshape(h.name, [-1, h.width], h.width)
    w = b.rng.standard_normal((h.width, width)) / np.sqrt(h.width)
    bias = b.bias(width)
    if b.ch.pick((True, True, False)):
        gemm = b.node(
            "Gemm", [flat.name, b.constant(w.T), *([bias] if bias else [])], width, transB=1
        )
    else:
        gemm = b.node("MatMul", [flat.name, b.constant(w)], width)
        if bias:
            gemm = b.node("Add", [gemm.name, bias], width)
    base = b.reshape(gemm.name, [*b.lead, width], width)
    terms = [(1.0, base), (b.ch.pick((1.0, 1.0, -1.0)), _adapter(b, h, width))]
    if width == h.width and b.ch.pick((True, False, False)):
        terms.append((1.0, h))
    return b.join(terms[:: b.ch.pick((1, -1))])


# --- convolutions (converter/fusion/convs.py) ---------------------------------------------------


def _conv(b: _Builder, h: _Val, out: int, k: int, groups: int = 1) -> _Val:
    """``Conv`` with a ``k x k`` kernel, pads keeping the size, sometimes a bias."""
    fan_in = h.width // groups * k * k
    w = b.constant(b.rng.standard_normal((out, h.width // groups, k, k)) / np.sqrt(fan_in))
    inputs = [h.name, w]
    if b.ch.pick((True, False)):
        inputs.append(b.constant(b.rng.standard_normal(out) * 0.3))
    attrs: dict = {"pads": [k // 2] * 4}
    if groups > 1 or b.ch.pick((True, False)):
        attrs["group"] = groups
    if b.ch.pick((True, False)):
        attrs["kernel_shape"] = [k, k]
    return b.node("Conv", inputs, out, True, **attrs)


def _channel_step(b: _Builder, h: _Val) -> _Val:
    """Nothing, a BatchNormalization, or a per-channel ``Mul``/``Add`` (or both); rarely
    (negative) an ``Add`` of a constant that varies along the rows too."""
    kind = b.ch.pick(("none", "bn", "bn", "mul", "add", "muladd", "rows"))
    if kind == "bn":
        return b.node("BatchNormalization", [h.name, *_bn_params(b, h.width)], h.width, True)
    if kind == "rows":
        c = b.constant(b.rng.standard_normal((1, h.width, b.lead[1], 1)) * 0.3)
        return b.node("Add", [h.name, c], h.width, True)
    if kind in ("mul", "muladd"):
        c = b.channel_constant(h.width, b.rng.uniform(0.5, 1.5, h.width))
        h = b.node("Mul", [h.name, c][:: b.ch.pick((1, -1))], h.width, True)
    if kind in ("add", "muladd"):
        c = b.channel_constant(h.width, b.rng.standard_normal(h.width) * 0.3)
        h = b.node("Add", [h.name, c][:: b.ch.pick((1, -1))], h.width, True)
    return h


def _conv_block(b: _Builder, h: _Val) -> _Val:
    """``Conv`` (k 1 or 3, groups 1 or C) then a channel step, sometimes a Relu."""
    depthwise = b.ch.pick((False, False, True))
    out = h.width if depthwise else b.ch.pick(WIDTHS)
    y = _channel_step(b, _conv(b, h, out, b.ch.pick((1, 3)), h.width if depthwise else 1))
    return b.node("Relu", [y.name], y.width, True) if b.ch.pick((True, False, False)) else y


def _repvgg(b: _Builder, h: _Val) -> _Val:
    """RepVGG: ``conv3x3(h) + conv1x1(h) + h`` (each branch maybe with a BatchNorm, the
    identity too), summed by Add/Sub/Sum; groups 1 or C (MobileOne)."""
    groups = b.ch.pick((1, 1, h.width))
    terms = []
    for k in (3, 1):
        if k == 3 or b.ch.pick((True, True, False)):
            y = _conv(b, h, h.width, k, groups)
            if b.ch.pick((True, False)):
                y = b.node("BatchNormalization", [y.name, *_bn_params(b, h.width)], h.width, True)
            terms.append(y)
    if len(terms) == 1 or b.ch.pick((True, False)):
        if b.ch.pick((True, False)):
            terms.append(_batchnorm(b, h))
        else:
            terms.append(h)
    y = b.join([(b.ch.pick((1.0, 1.0, 1.0, -1.0)), t) for t in terms][:: b.ch.pick((1, -1))])
    return b.node("Relu", [y.name], y.width, True) if b.ch.pick((True, False)) else y


def _conv_scale(b: _Builder, h: _Val) -> _Val:
    """A per-channel ``Mul`` before a Conv (folds), or an ``Add`` (a shift: folds into an
    unpadded conv only; before a padded 3x3 it must be refused)."""
    if b.ch.pick((True, False)):
        c = b.channel_constant(h.width, b.rng.uniform(0.5, 1.5, h.width))
        op = "Mul"
    else:
        c = b.channel_constant(h.width, b.rng.standard_normal(h.width) * 0.3)
        op = b.ch.pick(("Add", "Sub"))
    pre = b.node(op, [h.name, c][:: b.ch.pick((1, -1))], h.width, True)
    return _conv(b, pre, b.ch.pick(WIDTHS), b.ch.pick((1, 3)))


def _conv_views(b: _Builder, h: _Val) -> _Val:
    """A channel step on the NHWC side of a conv (tf2onnx's Keras layers): ``Transpose`` to
    NHWC, a per-channel (last-axis) or scalar ``Mul``/``Add``, ``Transpose`` back, then a Conv;
    or a Conv, then that NHWC step (it folds across the Transposes either way, a shift into a
    padded conv's input excepted)."""

    def nhwc_step(v: _Val) -> _Val:
        rows = b.node("Transpose", [v.name], v.width, perm=[0, 2, 3, 1])
        op = b.ch.pick(("Mul", "Add"))
        values = b.rng.uniform(0.5, 1.5, v.width) if op == "Mul" else b.rng.standard_normal(v.width)
        c = b.constant(values if b.ch.pick((True, True, False)) else values[:1].reshape(()))
        step = b.node(op, [rows.name, c][:: b.ch.pick((1, -1))], v.width)
        return b.node("Transpose", [step.name], v.width, True, perm=[0, 3, 1, 2])

    kind = b.ch.pick(("before", "after", "branches", "nhwc_identity"))
    if kind == "before":
        return _conv(b, nhwc_step(h), b.ch.pick(WIDTHS), b.ch.pick((1, 3)))
    if kind == "after":
        return nhwc_step(_conv(b, h, b.ch.pick(WIDTHS), b.ch.pick((1, 3))))
    if kind == "nhwc_identity":  # Keras's RepVGG: the identity BN on the NHWC input
        rows = b.node("Transpose", [h.name], h.width, perm=[0, 2, 3, 1])
        x = b.node("Transpose", [rows.name], h.width, True, perm=[0, 3, 1, 2])
        scaled = b.node("Mul", [rows.name, b.constant(b.rng.uniform(0.5, 1.5, h.width))], h.width)
        shifted = b.node("Add", [scaled.name, b.constant(b.rng.standard_normal(h.width))], h.width)
        identity = b.node("Transpose", [shifted.name], h.width, True, perm=[0, 3, 1, 2])
        convs = [(1.0, _conv(b, x, h.width, 3)), (1.0, _conv(b, x, h.width, 1))]
        return b.join([*convs, (1.0, identity)])
    # Flax's RepVGG: each branch moved back to NHWC before the sum
    branches = [_conv(b, h, h.width, 3), _conv(b, h, h.width, 1), h]
    moved = [b.node("Transpose", [v.name], h.width, perm=[0, 2, 3, 1]) for v in branches]
    total = b.join([(1.0, v) for v in moved])
    return b.node("Transpose", [total.name], h.width, True, perm=[0, 3, 1, 2])


def _conv_seq(b: _Builder, h: _Val) -> _Val:
    """A 1x1 conv then a 3x3 one (or the other way round), sometimes a Relu between."""
    mid = b.ch.pick(WIDTHS)
    ks = b.ch.pick(((1, 3), (1, 3), (3, 1), (1, 1)))
    y = _conv(b, h, mid, ks[0])
    if b.ch.pick((False, False, True)):
        y = b.node("Relu", [y.name], mid, True)
    return _conv(b, y, b.ch.pick(WIDTHS), ks[1])


def _conv_mlp(b: _Builder, h: _Val) -> _Val:
    """``h + T(L(T(conv1x1(h)))) * gamma`` (ConvNeXt-style; the Conv moves into ``L``, the
    layer scale folds across the back-permute), the residual and the scale sometimes left out."""
    y = _conv(b, h, b.ch.pick(WIDTHS), 1)
    if b.ch.pick((False, False, True)):
        y = _channel_step(b, y)
    y = b.chain(y, [h.width] if b.ch.pick((True, False)) else [b.ch.pick(WIDTHS), h.width])
    y = b.to_image(y)
    return b.join([(1.0, h), (1.0, y)]) if b.ch.pick((True, False)) else y


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
        cur = b.to_rows(cur)
        if cur.width != width or cur is h:
            cur = b.linear(cur, width)
        out = helper.make_tensor_value_info(cur.name, _elem(b.dtype), b.shape(cur))
        scope, b.scope = b.scope, outer
        branches.append(helper.make_graph(scope.nodes, b.fresh("branch"), [], [out], scope.inits))
    b.depth -= 1
    return b.node("If", ["cond"], width, then_branch=branches[0], else_branch=branches[1])


# --- patterns onnxruntime fuses into one kernel (converter/fusion/runtime_patterns.py) -------


def _gelu(b: _Builder, h: _Val) -> _Val:
    """Exact GELU (the tanh form in float64) in an exporter's order: TorchScript ``(h * (1 + erf(h / s))) * 0.5``, dynamo
    ``h * (0.5 * (1 + erf))``, or ``(h * 0.5) * (1 + erf)``; often between two linear layers
    (the MLP of a transformer: the 0.5 looks like a free fold), in rows or images."""
    if not h.image and b.ch.pick((True, False)):
        h = b.linear(h, b.ch.pick(WIDTHS))
    half, one = b._shared("half_", lambda: np.array(0.5)), b._shared("one_", lambda: np.array(1.0))
    if b.dtype == np.float32:
        sqrt2 = b._shared("sqrt2_", lambda: np.array(np.sqrt(2.0)))
        d = b.node("Div", [h.name, sqrt2], h.width, h.image)
        e = b.node("Erf", [d.name], h.width, h.image)
    else:  # onnxruntime has no float64 Erf: the tanh form, tanh(c * (h + k * h^3))
        cube = b.node("Pow", [h.name, b.constant(np.array(3.0))], h.width, h.image)
        k = b.node("Mul", [cube.name, b.constant(np.array(0.044715))], h.width, h.image)
        u = b.node("Add", [h.name, k.name], h.width, h.image)
        c = b.node("Mul", [u.name, b.constant(np.array(0.7978845608))], h.width, h.image)
        e = b.node("Tanh", [c.name], h.width, h.image)
    a = b.node("Add", [e.name, one][:: b.ch.pick((1, -1))], h.width, h.image)
    order = b.ch.pick(("torchscript", "dynamo", "head"))
    if order == "torchscript":
        xa = b.node("Mul", [h.name, a.name][:: b.ch.pick((1, -1))], h.width, h.image)
        g = b.node("Mul", [xa.name, half][:: b.ch.pick((1, -1))], h.width, h.image)
    elif order == "dynamo":
        ha = b.node("Mul", [half, a.name], h.width, h.image)
        g = b.node("Mul", [h.name, ha.name], h.width, h.image)
    else:
        xh = b.node("Mul", [h.name, half], h.width, h.image)
        g = b.node("Mul", [xh.name, a.name], h.width, h.image)
    return b.linear(g, b.ch.pick(WIDTHS)) if not g.image and b.ch.pick((True, False)) else g


def _norm(b: _Builder, h: _Val) -> _Val:
    """A LayerNorm (weight and bias) or RMSNorm (``h / sqrt`` or ``h * Reciprocal(sqrt)``)
    decomposition on the last axis, as exporters write it below opset 17."""
    two, eps = b.constant(np.array(2.0)), b.constant(np.array(1e-5))
    mean_axes = {"axes": [-1]} if b.opset < 18 else {}

    def mean(v: str) -> str:
        inputs = [v] if b.opset < 18 else [v, b.ints([-1])]
        return b.node("ReduceMean", inputs, 1, **mean_axes).name

    layer = b.ch.pick((True, False))
    x = b.node("Sub", [h.name, mean(h.name)], h.width).name if layer else h.name
    sq = b.node("Pow", [x, two], h.width).name
    root = b.node("Sqrt", [b.node("Add", [mean(sq), eps], 1).name], 1).name
    if b.ch.pick((True, False)):
        n = b.node("Div", [x, root], h.width)
    else:
        n = b.node("Mul", [x, b.node("Reciprocal", [root], 1).name], h.width)
    gamma = b.constant(b.rng.uniform(0.5, 1.5, h.width))
    y = b.node("Mul", [n.name, gamma][:: b.ch.pick((1, -1))], h.width)
    if layer:
        y = b.node("Add", [y.name, b.constant(b.rng.standard_normal(h.width) * 0.3)], h.width)
    return y


def _fanout(b: _Builder, h: _Val) -> _Val:
    """``h * s (+ t)`` read by two or three linear layers, joined by ``Mul`` and ``Add``."""
    s = b.rng.uniform(0.5, 1.5, h.width) if b.ch.pick((True, True, False)) else np.array(1.7)
    scaled = b.node("Mul", [h.name, b.constant(s)][:: b.ch.pick((1, -1))], h.width)
    if b.ch.pick((True, False, False)):
        t = b.constant(b.rng.standard_normal(h.width) * 0.3)
        scaled = b.node("Add", [scaled.name, t][:: b.ch.pick((1, -1))], h.width)
    width = b.ch.pick(WIDTHS)
    readers = [b.linear(scaled, width) for _ in range(b.ch.integer(2, 3))]
    out = b.node("Mul", [readers[0].name, readers[1].name], width)
    if len(readers) == 3:
        out = b.node("Add", [out.name, readers[2].name], width)
    if b.ch.pick((False,) * 5 + (True,)):  # another reader: the steps stay for it
        other = b.node("Relu", [scaled.name], h.width)
        out = b.node("Add", [out.name, b.linear(other, width).name], width)
    return out


def _computed(b: _Builder, h: _Val) -> _Val:
    """``base(h) + h @ delta``, the delta computed from constants in the graph."""
    width, rank = b.ch.pick(WIDTHS), b.ch.pick((1, 2))
    layout = b.ch.pick(("in_out", "out_in"))
    shape = (h.width, width) if layout == "in_out" else (width, h.width)

    def product() -> str:
        a = b.constant(b.rng.standard_normal((shape[0], rank)) / 2)
        c = b.constant(b.rng.standard_normal((rank, shape[1])) / 2)
        return b.node("MatMul", [a, c], 0).name

    if b.ch.pick((True, False)):
        delta = b.node("Mul", [product(), b.scale()], 0).name  # LoRA: s * (A @ B)
    else:
        delta = b.node("Mul", [product(), product()], 0).name  # LoHa: a Hadamard product
    if layout == "out_in":
        delta = b.node("Transpose", [delta], 0, perm=[1, 0]).name
    base = b.linear(h, width)
    adapter = b.node("MatMul", [h.name, delta], width)
    return b.join([(1.0, base), (1.0, adapter)][:: b.ch.pick((1, -1))])


def _vera(b: _Builder, h: _Val) -> _Val:
    """Two layers of ``h``, each plus ``(h @ A) * d_i @ B * b_i``, the ``h @ A`` shared."""
    rank, width = b.ch.pick((1, 2)), b.ch.pick(WIDTHS)
    a = b.node("MatMul", [h.name, b.constant(b.rng.standard_normal((h.width, rank)))], rank)
    shared_b = b.constant(b.rng.standard_normal((rank, width)) / 2)
    outs = []
    for _ in range(2):
        d = b.node("Mul", [a.name, b.constant(b.rng.uniform(0.5, 1.5, rank))], rank)
        up = b.node("MatMul", [d.name, shared_b], width)
        scaled = b.node("Mul", [up.name, b.constant(b.rng.uniform(0.5, 1.5, width))], width)
        outs.append(b.join([(1.0, b.linear(h, width)), (1.0, scaled)]))
    return b.node("Mul", [outs[0].name, outs[1].name], width)


def _flax_linear(b: _Builder, h: _Val) -> _Val:
    """Two or three jax2onnx ``nnx.Linear`` layers on rows of rank 3 or more: each
    ``Reshape(-1, d) -> Gemm(transB=0) -> Reshape(Concat(Shape(h)[:-1], (w,)))``; between two
    layers the Reshapes cancel and a Shape reads between them."""
    if b.rank < 3:
        return b.chain(h, [b.ch.pick(WIDTHS) for _ in range(2)])
    for _ in range(b.ch.integer(2, 3)):
        width = b.ch.pick(WIDTHS)
        flat = b.node("Reshape", [h.name, b.ints([-1, h.width])], h.width)
        w = b.constant(b.rng.standard_normal((h.width, width)) / np.sqrt(h.width))
        gemm = b.node("Gemm", [flat.name, w, b.constant(b.rng.standard_normal(width) * 0.3)], width)
        shape = b.node("Shape", [h.name], 0)
        lead = b.node("Slice", [shape.name, b.ints([0]), b.ints([-1])], 0)
        target = b.node("Concat", [lead.name, b.ints([width])], 0, axis=0)
        h = b.node("Reshape", [gemm.name, target.name], width)
    return h


def _region(b: _Builder, h: _Val) -> _Val:
    """A map of each row written through reshapes of it, beside or before a linear layer:
    OFT's blocks (``Reshape -> Einsum -> Reshape``), ``rotate_half`` (Slice/Neg/Concat), RoAd's
    ``y * c1 + rotate(y) * c2`` after the layer, MiSS's ``ReduceSum`` over blocks, or a
    ``ColumnTransformer``'s blocks (:func:`_columns`)."""
    kind = b.ch.pick(("oft", "rotate", "road", "miss", "subspaces", "columns"))
    if kind == "columns":
        return _columns(b, h)
    if kind == "subspaces" and any(isinstance(d, str) for d in b.lead):
        kind = "rotate"  # the placement's constants are shaped like the rows: a fixed batch
    lead = [0 if isinstance(d, str) else d for d in b.lead]  # 0: the batch dim, copied
    if h.width % 2 or kind == "road":  # an odd width: a layer to an even one first
        h = b.linear(h, b.ch.pick((4, 6, 8)))
    block = 2
    blocks = h.width // block
    width = b.ch.pick(WIDTHS)

    def split(v: _Val) -> str:
        return b.node("Reshape", [v.name, b.ints([*lead, blocks, block])], 0).name

    def back(name: str, w: int) -> _Val:
        return b.node("Reshape", [name, b.ints([*lead, w])], w)

    def rotate(v: _Val) -> _Val:
        half = v.width // 2
        last = b.ints([-1])
        low = b.node("Slice", [v.name, b.ints([0]), b.ints([half]), last], half)
        high = b.node("Slice", [v.name, b.ints([half]), b.ints([v.width]), last], half)
        neg = b.node("Neg", [high.name], half)
        return b.node("Concat", [neg.name, low.name], v.width, axis=-1)

    if kind == "oft":
        r = b.constant(b.rng.standard_normal((blocks, block, block)) / 1.5)
        mixed = b.node("Einsum", [split(h), r], 0, equation="...rk,rkc->...rc")
        return b.linear(back(mixed.name, h.width), width)
    if kind == "rotate":
        return b.linear(rotate(h), width)
    if kind == "road":
        y = b.linear(h, h.width)
        scaled = b.node("Mul", [y.name, b.constant(b.rng.uniform(0.5, 1.5, y.width))], y.width)
        turned = rotate(y)
        turned = b.node("Mul", [turned.name, b.constant(b.rng.uniform(-1, 1, y.width))], y.width)
        return b.join([(1.0, scaled), (1.0, turned)])
    if kind == "subspaces":  # AdaMSS: branches of x @ A, joined, their columns put in order
        low = b.node("MatMul", [h.name, b.constant(b.rng.standard_normal((h.width, 2)))], 2)
        cut = b.ch.integer(1, width - 1) if width > 1 else 1
        parts = [
            b.node("MatMul", [low.name, b.constant(b.rng.standard_normal((2, w)) / 2)], w)
            for w in (cut, width - cut)
            if w > 0
        ]
        joined = b.node("Concat", [p.name for p in parts], width, axis=-1)
        rows = (*b.lead, width)
        order = np.broadcast_to(b.rng.permutation(width), rows).astype(np.int64)
        idx = numpy_helper.from_array(order.copy(), b.fresh("i"))
        b.scope.inits.append(idx)
        zeros = b.constant(np.zeros(rows))
        placed = b.node("ScatterElements", [zeros, idx.name, joined.name], width, axis=-1)
        return b.join([(1.0, b.linear(h, width)), (1.0, placed)][:: b.ch.pick((1, -1))])
    summed = b.node("ReduceSum", [split(h), b.ints([-2])], block, keepdims=0)
    up = b.node("MatMul", [summed.name, b.constant(b.rng.standard_normal((block, width)))], width)
    return b.join([(1.0, b.linear(h, width)), (1.0, up)][:: b.ch.pick((1, -1))])


def _tf_dense(b: _Builder, h: _Val) -> _Val:
    """Keras' ``Dense`` on rows as tf2onnx writes it (``Tensordot``: ``Reshape(-1, d) -> MatMul``,
    ``Reshape`` back to ``Shape(x)[:-1] + (w,)``, ``Add`` of the bias), after a layer scale and
    shift or a LayerNorm in TensorFlow's form (``Mul(r, gamma)`` read by both products); the
    ``Shape`` reads the value the step makes. Or the ``MatMul`` on the rows themselves (the
    ``Reshape`` back then keeps the shape)."""
    if b.ch.pick((True, False)):
        x = _tf_layer_norm(b, h)
    else:
        scale = b.rng.uniform(0.5, 1.5, (1,) * b.ch.integer(0, b.rank - 1) + (h.width,))
        x = b.node("Mul", [h.name, b.constant(scale)][:: b.ch.pick((1, -1))], h.width)
        if b.ch.pick((True, False)):
            op = b.ch.pick(("Add", "Sub"))
            x = b.node(op, [x.name, b.constant(b.rng.standard_normal(h.width) * 0.3)], h.width)
    width = b.ch.pick(WIDTHS)
    direct = b.ch.pick((False, False, True))  # MatMul on the rows: the steps join its chain
    flat = x if direct else b.node("Reshape", [x.name, b.ints([-1, h.width])], h.width)
    w = b.constant(b.rng.standard_normal((h.width, width)) / np.sqrt(h.width))
    product = b.node("MatMul", [flat.name, w], width)
    shape = b.node("Shape", [x.name], 0)
    lead = b.node("Slice", [shape.name, b.ints([0]), b.ints([-1])], 0)
    target = b.node("Concat", [lead.name, b.ints([width])], 0, axis=0)
    y = b.node("Reshape", [product.name, target.name], width)
    return b.node("Add", [y.name, b.constant(b.rng.standard_normal(width) * 0.3)], width)


def _tf_layer_norm(b: _Builder, h: _Val) -> _Val:
    """TensorFlow's ``batch_normalization`` on the last axis: ``inv = rsqrt(var + eps) * gamma``,
    ``y = x * inv + (beta - mean * inv)``, as ``Neg``/``Mul``/``Add`` nodes."""
    mean_axes = {"axes": [-1]} if b.opset < 18 else {}

    def mean(v: str) -> str:
        inputs = [v] if b.opset < 18 else [v, b.ints([-1])]
        return b.node("ReduceMean", inputs, 1, **mean_axes).name

    m = mean(h.name)
    d = b.node("Sub", [h.name, m], h.width).name
    var = mean(b.node("Mul", [d, d], h.width).name)
    eps = b.constant(np.array(1e-5))
    r = b.node("Reciprocal", [b.node("Sqrt", [b.node("Add", [var, eps], 1).name], 1).name], 1)
    gamma = b.constant(b.rng.uniform(0.5, 1.5, h.width))
    inv = b.node("Mul", [r.name, gamma][:: b.ch.pick((1, -1))], h.width).name
    scaled = b.node("Mul", [h.name, inv][:: b.ch.pick((1, -1))], h.width).name
    neg = b.node("Neg", [m], 1).name
    moved = b.node("Mul", [neg, inv][:: b.ch.pick((1, -1))], h.width).name
    beta = b.constant(b.rng.standard_normal(h.width) * 0.3)
    shift = b.node("Add", [moved, beta][:: b.ch.pick((1, -1))], h.width).name
    return b.node("Add", [scaled, shift][:: b.ch.pick((1, -1))], h.width)


def _columns(b: _Builder, h: _Val) -> _Val:
    """scikit-learn's ``ColumnTransformer`` as skl2onnx writes it, before a layer: two or three
    picks of ``h``'s columns (ONNX-ML ``ArrayFeatureExtractor``, or a ``Gather`` on the last
    axis; indices in any order, repeated, overlapping), each maybe scaled (``Mul``, ``Mul`` +
    ``Add``, after a same-type ``Cast``), joined by a ``Concat``. (No ONNX-ML ``Scaler``: it
    always writes float32, so the float64 twin could not hold it.)"""
    parts = []
    for _ in range(b.ch.integer(2, 3)):
        k = b.ch.integer(1, h.width)
        columns = [int(c) for c in b.rng.integers(0, h.width, k)]
        if b.ch.pick((True, True, False)):
            b.ml = True
            v = b.node("ArrayFeatureExtractor", [h.name, b.ints(columns)], k, domain=ML_DOMAIN)
        else:
            v = b.node("Gather", [h.name, b.ints(columns)], k, axis=-1)
        step = b.ch.pick(("none", "mul", "affine", "cast"))
        if step == "cast":
            v = b.node("Cast", [v.name], k, to=_elem(b.dtype))
        if step != "none":
            v = b.node("Mul", [v.name, b.constant(b.rng.uniform(0.5, 1.5, k))], k)
        if step in ("affine", "cast"):
            v = b.node("Add", [v.name, b.constant(b.rng.standard_normal(k))], k)
        parts.append(v)
    joined = b.node("Concat", [v.name for v in parts], sum(v.width for v in parts), axis=-1)
    return b.linear(joined, b.ch.pick(WIDTHS))


IMAGE_BLOCKS = frozenset({"conv", "repvgg", "conv_scale", "conv_seq", "conv_mlp", "conv_views"})
_ANY_LAYOUT = frozenset({"relu", "tanh", "noop", "output", "if", "gelu"})
_BUILDERS: dict[str, Callable[[_Builder, _Val], _Val]] = {
    "residual": _residual,
    "lora": _lora,
    "nway": _nway,
    "bottleneck": _bottleneck,
    "if": _if,
    "view_bn": _view_bn,
    "view_scale": _view_scale,
    "qkv": _qkv,
    "left": _left,
    "stack": _stack,
    "sandwich": _sandwich,
    "conv": _conv_block,
    "repvgg": _repvgg,
    "conv_scale": _conv_scale,
    "conv_seq": _conv_seq,
    "conv_mlp": _conv_mlp,
    "conv_views": _conv_views,
    "gelu": _gelu,
    "norm": _norm,
    "fanout": _fanout,
    "computed": _computed,
    "vera": _vera,
    "region": _region,
    "flax_linear": _flax_linear,
    "tf_dense": _tf_dense,
}


def _block(b: _Builder, kind: str, h: _Val) -> _Val:
    b.blocks.append(kind)
    if kind in IMAGE_BLOCKS:
        h = b.to_image(h)
    elif kind == "batchnorm" and h.image:
        return _batchnorm(b, h)
    elif kind not in _ANY_LAYOUT:
        h = b.to_rows(h)
    if kind == "linear":
        return b.linear(h, b.ch.pick(WIDTHS))
    if kind in ("relu", "tanh"):
        return b.node(kind.capitalize(), [h.name], h.width, h.image)
    if kind == "noop":
        return b.noop(b.noop(h) if b.ch.pick((True, False)) else h)
    if kind == "max0":
        return b.node("Max", [h.name, b.zero(h.width)][:: b.ch.pick((1, -1))], h.width)
    if kind == "batchnorm":
        return _batchnorm(b, h) if b.rank == 2 else b.linear(h, h.width)
    return _BUILDERS[kind](b, h)


def _elem(dtype: np.dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(dtype)


def generate(ch: Choices, blocks: Sequence[str] = BLOCKS, image: bool | None = None) -> Case:
    """A random model of ``blocks`` (drawn with repetition), its float64 twin, and its feeds.

    With ``image`` (by default a quarter of the draws when ``blocks`` has a convolution block)
    the input is an image ``[N, C, H, W]`` (float32: onnxruntime has no float64 Conv) and
    convolution blocks are drawn twice as often; other blocks see it channels-last through a
    ``Transpose``. Without, convolution blocks are not drawn.
    """
    if image is None:
        image = bool(IMAGE_BLOCKS & set(blocks)) and ch.pick((False, False, False, True))
    if not image:
        blocks = [k for k in blocks if k not in IMAGE_BLOCKS]
    else:
        blocks = [*blocks, *(k for k in blocks if k in IMAGE_BLOCKS)]
    dtype = np.dtype(np.float32 if image else ch.pick((np.float32,) * 3 + (np.float64,)))
    opset = ch.pick((13, 17, 21))
    if image:
        lead = (ch.pick((1, 2, "batch")), ch.integer(4, 6), ch.integer(4, 6))
    else:
        lead = ch.pick(((3,), ("batch",), ("batch", 2), (2, 3)))
    rng = np.random.default_rng(ch.integer(0, 2**32 - 1))
    flags = [ch.pick((True, False)) for _ in range(2)]
    anonymous = ch.pick((False,) * 4 + (True,))
    b = _Builder(ch, rng, dtype, lead, anonymous, *flags, kinds=blocks, opset=opset)
    x = h = _Val("x", ch.pick(WIDTHS), image)
    for _ in range(ch.integer(1, 6)):
        kind = ch.pick(blocks)
        if kind == "output":
            b.blocks.append(kind)
            if h is not x and h not in b.outputs:
                b.outputs.append(h)
            continue
        h = _block(b, kind, h)
    if h is x or h in b.outputs:
        h = b.node("Relu", [h.name], h.width, h.image)
    return _finish(b, x, h, opset)


def _finish(b: _Builder, x: _Val, h: _Val, opset: int) -> Case:
    elem = _elem(b.dtype)
    outputs = [helper.make_tensor_value_info(v.name, elem, b.shape(v)) for v in [*b.outputs, h]]
    outputs += [helper.make_tensor_value_info(n, elem, s) for n, s in b.extra_outputs]
    if b.ch.pick((True, True, False)):
        of = b.ch.pick([*b.outputs, h, h])
        mean = b.node("ReduceMean", [of.name], 0, keepdims=0)
        outputs.insert(
            b.ch.integer(0, len(outputs)), helper.make_tensor_value_info(mean.name, elem, [])
        )
    inputs = [helper.make_tensor_value_info("x", elem, b.shape(x))]
    has_if = "if" in b.blocks
    if has_if:
        inputs.append(helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []))
    graph = helper.make_graph(b.main.nodes, "random_structure", inputs, outputs, b.main.inits)
    opsets = [helper.make_opsetid("", opset)] + (
        [helper.make_opsetid(ML_DOMAIN, 1)] if b.ml else []
    )
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8 if opset <= 17 else 10
    if b.ch.pick((True, False)):  # exporters often record every intermediate's type and shape
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    concrete = [3 if d == "batch" else d for d in b.shape(x)]
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
            if node.op_type == "Cast" and attr.name == "to" and attr.i == onnx.TensorProto.FLOAT:
                attr.i = onnx.TensorProto.DOUBLE
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
    for index, feeds in enumerate(case.feeds):
        refs = case.reference_outputs(index)
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
    refolded: set[str] = set()  # merged ops whose output name holds a step folded across views
    for r in report.fusions:
        if _absorbed(r) or refolded & set(r.nodes):  # a merge that took such an op over too
            assert r.output is None and r.merged_into is None, (
                f"(f) record of {r.nodes} names a value holding a folded step: {r.output!r}"
            )
            refolded.update(r.new_nodes)
            continue  # the op's output name holds the step folded in: no new value to name
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


def _absorbed(record: FusionRecord) -> bool:
    """A step folded into a linear op across views of its output or input
    (``converter.fusion.linear.absorb``, ``fold_before``): the engine records no output for it
    (the op's output name now carries the step, or the views before it were renamed)."""
    return " folded into " in (record.note or "") and " through " in (record.note or "")


def _loads(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _check_scrambled(
    case: Case,
    policy: str,
    fused: onnx.ModelProto,
    report: FusionReport,
    rng: np.random.Generator,
) -> None:
    """(h) The nodes listed out of order fuse as the sorted graph does."""
    other = scrambled(case.model, rng)
    unsorted = not in_topological_order(other)
    fused_other, report_other, _ = fuse_with_report(other, policy)
    assert bool(report_other.sorted_graphs) == unsorted, (
        f"(h) the report says sorted {report_other.sorted_graphs} of an input "
        f"{'out of' if unsorted else 'in'} order"
    )
    try:
        _loads(fused_other)  # the full checker requires topological order
    except Exception as e:
        raise AssertionError(f"(h) the fused scrambled model is invalid: {e}") from e
    assert op_counts(fused_other) == op_counts(fused), (
        f"(h) listing the nodes out of order changed the result: {dict(op_counts(fused))} vs "
        f"{dict(op_counts(fused_other))}"
    )
    assert len(report_other.fusions) == len(report.fusions), (
        f"(h) {len(report.fusions)} fusions sorted, {len(report_other.fusions)} scrambled"
    )
    assert_close(case, fused_other, "fused after scrambling")


def check_case(
    case: Case, policy: str, shuffle_seed: int = 0, *, scramble: bool = False
) -> Outcome:
    """Assert properties (a) to (f) of the module docstring for ``case`` under ``policy``, and
    (h) with ``scramble``."""
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
    try:
        before = fused_kernels(case.model)
    except Exception:  # onnxruntime's own optimiser fails on the original: nothing to keep
        before = None
    if before is not None:
        lost = lost_kernels(before, fused_kernels(fused))
        assert not lost, f"(g) onnxruntime fuses less of the fused model: {lost}"
    if scramble:
        _check_scrambled(case, policy, fused, report, np.random.default_rng(shuffle_seed))
    before_ops = sum(op_counts(case.model).values())
    return Outcome(len(report.fusions), before_ops, sum(op_counts(fused).values()))
