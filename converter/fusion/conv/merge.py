"""Structural re-parameterisation of convolutions: the finders of the merges convs make.

Three finders, first in the engine's list (:mod:`converter.fusion.engine`), read one analysis of
the live graph per round (every Conv recognised, :mod:`converter.fusion.conv.match`); the engine
makes the first kind of merge any of them finds (each changes what the next kind sees, so the
round ends there and the next round analyses the graph again):

1. **folds**: a channel affine after a Conv (``W' = W * s[o]``, ``b' = b * s + t``), then one
   before a Conv (``W' = W * s[c]``, ``b' = b + sum W t``; a shift only into an unpadded conv);
2. **branch sums**: a tree of ``Add``/``Sub``/``Sum`` over convs of one input ``x``, ``x`` itself
   and channel affines of ``x``: every branch embedded in the largest kernel (centred, padding
   adjusted), written with the fewest groups any branch has, ``W = sum s_k W_k``,
   ``b = sum s_k b_k`` (RepVGG, ACNet, MobileOne, RepViT, RepMixer, conditional positional
   encodings, YOLO RepConv);
3. **compositions**: a Conv whose only consumer is another Conv, with nothing between them.

A merge that is folded into a branch (a BatchNorm after each branch conv, a layer scale after a
sum) is made by the rounds: fold, then sum, then fold the scale after the sum, and so on.

Each planned merge (a :class:`~converter.fusion.conv.rewrite.ConvMerge`) is checked to be still
alive, decided from shapes (:mod:`converter.fusion.conv.geometry`'s ``plan_*``; a few per-channel
constants may be read, never a weight), computed once in float64
(:mod:`converter.fusion.conv.algebra`), refused if the dtype cannot hold it, rounded once and
written. Under ``policy="cost"`` a branch sum or
composition that would add multiply-adds per output position or parameters is refused (a 1x1
expansion followed by a depthwise conv stays two convs); a fold never adds either.
"""

from __future__ import annotations

import abc

import numpy as np
import onnx_ir as ir

from converter.fusion.conv import algebra as ca
from converter.fusion.conv import views
from converter.fusion.conv.geometry import ConvGeometry, chain_macs, plan_add, plan_compose
from converter.fusion.conv.match import (
    AFFINE_OPS,
    ChannelAffine,
    ConvOp,
    Term,
    recognize_affine,
    recognize_conv,
)
from converter.fusion.conv.rewrite import ConvMerge
from converter.fusion.core.context import Context
from converter.fusion.core.declined import Declined
from converter.fusion.core.graph import feeds_only, is_onnx, sole_consumer
from converter.fusion.core.joins import is_join, tree_leaves
from converter.fusion.core.merge import Finder, Merge, Round

__all__ = ["ConvCompositions", "ConvFolds", "ConvSums"]

Refused = dict[ir.Node, Declined]


class _ConvFinder(Finder):
    """A finder of conv merges: nothing to find in a graph without a Conv."""

    def find(self, round: Round) -> list[Merge | Declined]:
        convs, refused = round.shared(_analyse)
        if not convs and not refused:
            return []
        reasons: list[Declined] = []
        merges = self._find(round.ctx, round.graph, convs, refused, round.label, reasons)
        return [*reasons, *merges]

    @abc.abstractmethod
    def _find(self, ctx, graph, convs, refused, label, reasons) -> list[ConvMerge]: ...


class ConvFolds(_ConvFinder):
    """A channel affine folded into the Conv before it, then one into the Conv after it."""

    def _find(self, ctx, graph, convs, refused, label, reasons) -> list[ConvMerge]:
        return _find_folds(ctx, graph, convs, refused, label, reasons)

    def pending(self, round: Round, written: list[ir.Node]) -> bool:
        """A merged linear op now ends in a step (its bias ``Add``) that reaches a Conv through
        views (a channels-last layer before ``Transpose -> Conv``): one more round."""
        for node in written:
            value = node.outputs[0]
            step = sole_consumer(value)
            if step is not None and step.op_type in AFFINE_OPS and step.outputs:
                value = step.outputs[0]
            for _ in range(4):  # through views, as views.before follows them back
                reader = sole_consumer(value)
                if reader is None or reader.op_type not in views.VIEW_OPS:
                    break
                value = reader.outputs[0]
            if any(is_onnx(u.node, "Conv") for u in value.uses()):
                return True
        return False


class ConvSums(_ConvFinder):
    """A tree of sums over conv branches of one input (RepVGG, ACNet, MobileOne, ...)."""

    def _find(self, ctx, graph, convs, refused, label, reasons) -> list[ConvMerge]:
        return _find_sums(ctx, graph, convs, refused, label, reasons)


class ConvCompositions(_ConvFinder):
    """A Conv whose only consumer is another Conv, with nothing between them."""

    def _find(self, ctx, graph, convs, refused, label, reasons) -> list[ConvMerge]:
        return _find_compositions(ctx, graph, convs, refused, label, reasons)


def _analyse(round: Round) -> tuple[dict[ir.Node, ConvOp], Refused]:
    """Every Conv of the round's graph recognised, or refused with the reason."""
    convs: dict[ir.Node, ConvOp] = {}
    refused: Refused = {}
    for node in round.graph:
        found = recognize_conv(round.ctx, node)
        if isinstance(found, ConvOp):
            convs[node] = found
        elif isinstance(found, Declined):
            refused[node] = found
    return convs, refused


def _name(node: ir.Node) -> str:
    return node.name or f"<{node.op_type}>"


def _affine_after(
    ctx: Context, node: ir.Node, value: ir.Value, rank: int, channels: int, axis: int = 1
):
    """The channel affine ``node`` applies to ``value``, a reason, or None."""
    found = recognize_affine(ctx, node, rank, channels, axis)
    if isinstance(found, ChannelAffine) and found.data is not value:
        return None
    return found


def _find_folds(ctx, graph, convs, refused, label, reasons) -> list[ConvMerge]:
    """Every conv + following affine, then every affine + following conv."""
    after, before = [], []
    for node in graph:
        op = convs.get(node)
        if op is None:
            _refused_fold(ctx, node, refused, label, reasons)
            continue
        g = op.geometry
        channels = views.ChannelAxis(g.rank + 2, 1)
        through, value, at = views.after(ctx.constants, op.output, channels)
        consumer = sole_consumer(value)
        if consumer is not None:
            found = _affine_after(ctx, consumer, value, at.rank, g.out_channels, at.axis)
            if isinstance(found, ChannelAffine):
                after.append(_fold_after(op, found, through))
            elif isinstance(found, Declined):
                names = [_name(n) for n in (node, *through, consumer)]
                reasons.append(found.about(names, label))
        x = op.input
        if x is None or sole_consumer(x) is not node:
            continue
        through, value, at = views.before(ctx.constants, x, channels)
        producer = value.producer()
        if producer is not None and (not through or sole_consumer(value) is through[0]):
            found = recognize_affine(ctx, producer, at.rank, g.in_channels, at.axis)
            if isinstance(found, ChannelAffine) and found.data is not None:
                before.append(_fold_before(found, op, through))
            elif isinstance(found, Declined):
                names = [_name(n) for n in (producer, *through, node)]
                reasons.append(found.about(names, label))
    return after + before


def _refused_fold(
    ctx: Context, node: ir.Node, refused: Refused, label: str, reasons: list[Declined]
) -> None:
    """A reason for a Conv (or ConvTranspose) we cannot use when a channel affine follows it."""
    if node not in refused or not node.outputs:
        return
    consumer = sole_consumer(node.outputs[0])
    if consumer is not None and _is_constant_step(ctx, consumer):
        reasons.append(refused[node].about([_name(node), _name(consumer)], label))


def _is_constant_step(ctx: Context, node: ir.Node) -> bool:
    found = recognize_affine(ctx, node, 4, 1)  # any shape: just "is it a constant step at all"
    return found is not None


def _fold_after(op: ConvOp, affine: ChannelAffine, through: list[ir.Node] = ()) -> ConvMerge:
    """``affine`` after ``op`` (through the views ``through``, left as they are)."""
    g = op.geometry
    n = g.out_channels

    def plan() -> ConvGeometry:
        return _with_bias(g, g.has_bias or affine.has_shift)

    def compute() -> ca.ConvMap:
        scale, shift = affine.vectors(n)
        return ca.scale_out(op.conv_map(), scale, shift)

    across = f" through {'/'.join(v.op_type for v in through)}" if through else ""
    return ConvMerge(
        [op.node] if through else [op.node, affine.node],
        [(op.node, 0)],
        op.dtype,
        plan,
        compute,
        g.macs_per_position + n,
        g.params + affine.params(n),
        f"{affine.node.op_type} folded into the Conv before it{across}",
        op.constants + affine.constants,
        step=affine.node if through else None,
        views=list(through),
        refolds=bool(through),
    )


def _fold_before(affine: ChannelAffine, op: ConvOp, through: list[ir.Node] = ()) -> ConvMerge:
    """``affine`` before ``op`` (through the views ``through``, left as they are)."""
    g = op.geometry
    n = g.in_channels

    def plan() -> ConvGeometry | Declined:
        if affine.has_shift and any(g.pads):
            _, shift = affine.vectors(n)  # a per-channel vector: small
            if shift is not None and shift.any():
                return Declined.because(
                    f"{affine.node.op_type} shifts the input of a Conv with pads {list(g.pads)}: "
                    "the shift does not fold, the padding contributes zeros, not the shift"
                )
        return _with_bias(g, g.has_bias or affine.has_shift)

    def compute() -> ca.ConvMap | Declined:
        scale, shift = affine.vectors(n)
        return ca.affine_in(op.conv_map(), scale, shift)

    across = f" through {'/'.join(v.op_type for v in through)}" if through else ""
    return ConvMerge(
        [op.node] if through else [affine.node, op.node],
        [(op.node, 0)] if through else [(affine.node, affine.data_index)],
        op.dtype,
        plan,
        compute,
        g.macs_per_position + n,
        g.params + affine.params(n),
        f"{affine.node.op_type} folded into the Conv after it{across}",
        affine.constants + op.constants,
        step=affine.node if through else None,
        views=list(through),
        refolds=bool(through),  # the views before the conv now hold unscaled values
    )


def _with_bias(g: ConvGeometry, has_bias: bool) -> ConvGeometry:
    return ConvGeometry(
        g.out_channels,
        g.in_channels,
        g.kernel_shape,
        g.groups,
        g.strides,
        g.dilations,
        g.pads,
        has_bias,
    )


def _roots(ctx: Context, graph: ir.Graph) -> list[ir.Node]:
    """Joins not inside a larger tree of joins, in graph order."""
    return [
        n
        for n in graph
        if is_join(ctx, n) and not is_join(ctx, sole_consumer(n.outputs[0]) or None)
    ]


def _find_sums(ctx, graph, convs, refused, label, reasons) -> list[ConvMerge]:
    """Every tree of sums over conv branches of one input (the largest that matches)."""
    merges: list[ConvMerge] = []
    for root in _roots(ctx, graph):
        joins, _ = tree_leaves(ctx, root)
        first_reason = None
        for candidate in joins[::-1]:  # the whole tree, then its subtrees
            found = _match_sum(ctx, candidate, convs, refused)
            if isinstance(found, ConvMerge):
                merges.append(found)
                break
            if found is not None and first_reason is None:
                first_reason = found
        else:
            if first_reason is not None:
                reasons.append(first_reason.about([_name(j) for j in joins], label))
    return merges


def _match_sum(ctx: Context, root: ir.Node, convs, refused) -> ConvMerge | Declined | None:
    """The branch sum rooted at ``root``; a reason when it nearly is one; None otherwise."""
    joins, leaves = tree_leaves(ctx, root)
    if len(leaves) < 2 or len({id(v) for _, v in leaves}) != len(leaves):
        return None
    members = set(joins)
    leaves, back, perm = _through_transposes(leaves, members)
    members |= set(back)
    branch_convs = {
        v: convs[v.producer()]
        for _, v in leaves
        if v.producer() in convs and feeds_only(v, members)
    }
    inputs = {id(op.input): op.input for op in branch_convs.values()}
    if len(inputs) != 1:
        return None
    (x,) = inputs.values()
    some = next(iter(branch_convs.values()))
    rank, channels = some.geometry.rank + 2, some.geometry.in_channels
    terms: list[Term] = []
    for sign, value in leaves:
        producer = value.producer()
        if value in branch_convs:
            terms.append(Term(sign, conv=branch_convs[value]))
        elif value is x:
            terms.append(Term(sign))
        elif producer in refused and producer.inputs and producer.inputs[0] is x:
            return Declined.because(f"branch '{_name(producer)}': {refused[producer].reason}")
        else:
            affine = None if producer is None else _affine_after(ctx, producer, x, rank, channels)
            if affine is None and producer is not None:
                affine = _transposed_affine(ctx, producer, x, rank, channels)
            if isinstance(affine, Declined):
                return Declined.because(f"branch '{_name(producer)}': {affine.reason}")
            if affine is None or not feeds_only(value, members):
                return None
            terms.append(Term(sign, affine=affine))
    return _sum_merge(back + joins, terms, x, some.dtype, rank - 2, channels, perm)


def _transposed_affine(
    ctx: Context, node: ir.Node, x: ir.Value, rank: int, channels: int
) -> ChannelAffine | Declined | None:
    """``Transpose(perm)(affine(v))`` where ``x`` is ``Transpose(perm)(v)``: Keras's identity
    BatchNorm of a RepVGG block, written by tf2onnx as ``Mul`` + ``Add`` on the NHWC input
    beside the Transpose the convs read. One channel affine of ``x``: the steps (one or two,
    each read by the next alone), composed, their channels where ``perm`` takes axis 1 from."""
    transpose = x.producer()
    if not (is_onnx(node, "Transpose") and is_onnx(transpose, "Transpose")):
        return None
    perm = node.attributes.get_ints("perm", None)
    if perm is None or tuple(perm) != tuple(transpose.attributes.get_ints("perm", ()) or ()):
        return None
    v, axis = transpose.inputs[0], list(perm)[1]
    steps: list[ChannelAffine] = []
    value = node.inputs[0]
    while value is not None and value is not v and len(steps) < 2:
        step = value.producer()
        found = None if step is None else recognize_affine(ctx, step, rank, channels, axis)
        if not isinstance(found, ChannelAffine):
            return found if isinstance(found, Declined) else None
        if not feeds_only(value, {steps[0].node} if steps else {node}):
            return None
        steps.insert(0, found)
        value = found.data
    if value is not v or not steps:
        return None
    return _composed(steps, node)


def _composed(steps: list[ChannelAffine], transpose: ir.Node) -> ChannelAffine:
    """``steps`` applied in order, then ``transpose``, as one channel affine: ``x * s + t``."""

    def vectors(n: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        scale, shift = np.ones(n), np.zeros(n)
        for step in steps:
            s, t = step.vectors(n)
            if s is not None:
                scale, shift = scale * s, shift * s
            if t is not None:
                shift = shift + t
        return scale, shift

    has_shift = any(step.has_shift for step in steps)
    constants = [c for step in steps for c in step.constants]
    nodes = [*(step.node for step in steps), transpose]
    return ChannelAffine(nodes[0], steps[0].data_index, constants, has_shift, vectors, nodes[1:])


def _through_transposes(leaves, members: set[ir.Node]):
    """The leaves under one ``Transpose`` each, all of one ``perm`` (Flax sums its branches
    after moving each back to NHWC): ``T(a) + T(b) = T(a + b)``, so the sum is matched on what
    they transpose and written before one Transpose. Returns the leaves to match, those
    Transposes and their perm (the leaves, [] and None when they are not so)."""
    nodes = [v.producer() for _, v in leaves]
    if not all(is_onnx(n, "Transpose") and n.inputs and n.inputs[0] is not None for n in nodes):
        return leaves, [], None
    perms = {tuple(n.attributes.get_ints("perm", ()) or ()) for n in nodes}
    if len(perms) != 1 or () in perms:
        return leaves, [], None
    if not all(feeds_only(v, members) for _, v in leaves):
        return leaves, [], None
    inner = [(sign, n.inputs[0]) for (sign, _), n in zip(leaves, nodes, strict=True)]
    return inner, nodes, perms.pop()


def _sum_merge(
    joins,
    terms: list[Term],
    x,
    dtype,
    rank: int,
    channels: int,
    perm: tuple[int, ...] | None = None,
) -> ConvMerge:
    ones = (1,) * rank
    geometries, maps_of, macs, params, constants = [], [], 0, 0, []
    for term in terms:
        if term.conv is not None:
            g = term.conv.geometry
            macs, params = macs + g.macs_per_position, params + g.params
            constants += term.conv.constants
            maps_of.append(_signed(term.sign, term.conv.conv_map))
        else:
            has_shift = term.affine is not None and term.affine.has_shift
            g = ConvGeometry(channels, channels, ones, channels, has_bias=has_shift)
            if term.affine is not None:
                macs, params = macs + channels, params + term.affine.params(channels)
                constants += term.affine.constants
            maps_of.append(_signed(term.sign, _delta(term.affine, channels, ones)))
        geometries.append(g)
    out_channels = geometries[0].out_channels
    reads = [r for t in terms for r in t.reads()]
    reads += [(j, i) for j in joins for i, v in enumerate(j.inputs) if v is x]

    def compute() -> ca.ConvMap | Declined:
        return ca.add_convs(*(make() for make in maps_of))

    return ConvMerge(
        [n for t in terms for n in t.nodes] + joins,
        reads,
        dtype,
        lambda: plan_add(*geometries),
        compute,
        macs + (len(terms) - 1) * out_channels,
        params,
        "parallel branches merged: "
        + _describe(terms)
        + (f", then Transpose {list(perm)}" if perm else ""),
        constants,
        after_perm=perm,
    )


def _signed(sign: float, make):
    if sign > 0:
        return make
    return lambda: ca.scale_out(make(), -1.0)


def _delta(affine: ChannelAffine | None, channels: int, ones: tuple[int, ...]):
    def make() -> ca.ConvMap:
        scale, shift = (None, None) if affine is None else affine.vectors(channels)
        found = ca.identity_conv(channels, ones, scale=scale, shift=shift)
        assert isinstance(found, ca.ConvMap)  # a 1-wide kernel always has a centre
        return found

    return make


def _describe(terms: list[Term]) -> str:
    """``3x3 + 1x1 + identity``; ``depthwise 3x3 - BatchNormalization(x)``."""
    parts = []
    for i, term in enumerate(terms):
        sign = ("- " if term.sign < 0 else "+ ") if i else ("-" if term.sign < 0 else "")
        if term.conv is not None:
            g = term.conv.geometry
            depthwise = "depthwise " if g.groups > 1 and g.groups == g.in_channels else ""
            what = depthwise + "x".join(map(str, g.kernel_shape))
        elif term.affine is not None:
            steps = [term.affine.node, *term.affine.more]
            what = " + ".join(n.op_type for n in steps if n.op_type != "Transpose") + "(x)"
        else:
            what = "identity"
        parts.append(sign + what)
    return " ".join(parts)


def _find_compositions(ctx, graph, convs, refused, label, reasons) -> list[ConvMerge]:
    """Every Conv whose only consumer is another Conv reading it as its data input."""
    merges = []
    for node, first in convs.items():
        consumer = sole_consumer(first.output)
        second = convs.get(consumer) if consumer is not None else None
        if second is None or second.input is not first.output:
            if consumer in refused and consumer.inputs[0] is first.output:
                reasons.append(refused[consumer].about([_name(node), _name(consumer)], label))
            continue
        if first.dtype != second.dtype:
            continue
        merges.append(_compose(first, second))
    return merges


def _compose(first: ConvOp, second: ConvOp) -> ConvMerge:
    g1, g2 = first.geometry, second.geometry

    def plan() -> ConvGeometry | Declined:
        bias = first.bias.array().reshape(-1) if first.bias is not None else None  # small
        return plan_compose(g1, g2, first_bias=bias)

    def compute() -> ca.ConvMap | Declined:
        return ca.compose(first.conv_map(), second.conv_map())

    k1, k2 = ("x".join(map(str, g.kernel_shape)) for g in (g1, g2))
    return ConvMerge(
        [first.node, second.node],
        [(first.node, 0)],
        first.dtype,
        plan,
        compute,
        chain_macs([g1, g2]),
        g1.params + g2.params,
        f"sequential convs composed: {k1} then {k2}",
        first.constants + second.constants,
    )
