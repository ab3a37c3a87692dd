"""Patterns a runtime fuses into one kernel: kept whole, and written the way runtimes find them.

Counting ops is a proxy for speed; what the runtime runs is the measure. onnxruntime's graph
optimiser (and OpenVINO's, TensorRT's...) recognises a few decompositions by their exact shape
and runs each as one fused kernel:

    GELU, erf form     x * (1 + erf(x / sqrt 2)) * 0.5     -> Gelu   (the 0.5 either side)
    GELU, tanh form    0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))  -> FastGelu
    QuickGELU          x * sigmoid(1.702 * x)               -> QuickGelu
    LayerNorm          (x - mean) / sqrt(var + eps) * gamma + beta   -> LayerNormalization
    RMSNorm            x / sqrt(mean(x^2) + eps) * w                 -> SimplifiedLayerNormalization

A constant step inside such a pattern looks like a free fold (``Mul(0.5)`` before a projection
goes into its weight for nothing), but folding it breaks the match: one fused kernel becomes
five elementwise passes over the activation, and the model runs slower than before. So
:func:`kept_for_runtime` names every constant step that belongs to one of these patterns, and
the recognisers of steps (chains, folds across views, conv folds) decline it with that reason.

torch's dynamo exporter writes exact GELU as ``Mul(x, Mul(0.5, Add(Erf(Div(x, s)), 1)))``, an
order onnxruntime's ``GeluFusion`` does not match. :func:`rewrite_for_runtime` rewrites it to
``Mul(Mul(x, Add(...)), 0.5)``, which it does (and the tanh form to ``Mul(Mul(x, 0.5), Add(...))``,
the order ``FastGeluFusion`` matches). The two are equal bit for bit: multiplying by
0.5 is exact in binary floating point (short of subnormals), so ``x * (0.5 * a)`` and
``(x * a) * 0.5`` round alike.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from converter.fusion.core.constants import Constant
from converter.fusion.core.context import Context
from converter.fusion.core.graph import is_onnx

__all__ = ["kept_for_runtime", "rewrite_for_runtime"]

_STEP_OPS = frozenset({"Mul", "Div", "Add", "Sub"})
_SQUASH = {"Erf": "erf", "Tanh": "tanh"}
# Ops between a norm's pieces that do not change which pattern it is (a float16 model casts).
_TRANSPARENT = frozenset({"Cast"})


def kept_for_runtime(ctx: Context, node: ir.Node) -> str | None:
    """Why the constant step ``node`` must stay where it is (it belongs to a pattern a runtime
    fuses into one kernel), or None. ``node`` is any node; only constant steps can be kept."""
    if not is_onnx(node) or node.op_type not in _STEP_OPS:
        return None
    data = _data_input(ctx, node)
    if data is None:
        return None
    if node.op_type == "Mul":
        form = _gelu_form(node, data)
        if form:
            return f"kept: part of GELU ({form} form), which onnxruntime fuses into one kernel"
        if _quick_gelu_scale(node, data):
            return "kept: part of QuickGELU, which onnxruntime fuses into one kernel"
        if _normalized(data):
            return (
                "kept: the weight of a LayerNorm/RMSNorm decomposition, which onnxruntime fuses "
                "into one kernel with it"
            )
    if node.op_type == "Add" and _norm_weighted(ctx, data):
        return (
            "kept: the bias of a LayerNorm decomposition, which onnxruntime fuses into one "
            "kernel with it"
        )
    return None


def _data_input(ctx: Context, node: ir.Node) -> ir.Value | None:
    """The one non-constant input of a binary step (None unless exactly one is constant)."""
    if len(node.inputs) != 2 or None in node.inputs:
        return None
    data = [v for v in node.inputs if not ctx.constants.is_constant(v)]
    return data[0] if len(data) == 1 else None


def _producer(value: ir.Value | None, *op_types: str) -> ir.Node | None:
    """The standard op of one of ``op_types`` that computes ``value`` (through Casts), or None."""
    node = value.producer() if value is not None else None
    while is_onnx(node) and node.op_type in _TRANSPARENT and node.op_type not in op_types:
        node = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    return node if is_onnx(node) and node.op_type in op_types else None


def _one_plus_squash(value: ir.Value | None) -> str | None:
    """``value`` is ``1 + erf(...)`` or ``1 + tanh(...)``: the squash's name, else None."""
    add = _producer(value, "Add")
    if add is None:
        return None
    for v in add.inputs:
        squash = _producer(v, *_SQUASH)
        if squash is not None:
            return _SQUASH[squash.op_type]
    return None


def _gelu_form(node: ir.Node, data: ir.Value) -> str | None:
    """``node`` (a constant ``Mul``) is GELU's ``0.5``: the form's name (erf, tanh), else None.

    Three places: last, ``(x * (1 + erf)) * 0.5``; first, ``(x * 0.5) * (1 + erf)``; or on the
    sum, ``x * (0.5 * (1 + erf))`` (dynamo's order, which :func:`rewrite_for_runtime` rewrites)."""
    form = _one_plus_squash(data)  # on the sum
    if form:
        return form
    product = _producer(data, "Mul")  # last: the data is x * (1 + erf)
    if product is not None:
        form = next(filter(None, map(_one_plus_squash, product.inputs)), None)
        if form:
            return form
    for use in node.outputs[0].uses():  # first: the product reads (x * 0.5) and (1 + erf(x))
        reader = use.node
        if is_onnx(reader, "Mul") and len(reader.inputs) == 2 and use.idx in (0, 1):
            other = reader.inputs[1 - use.idx]
            form = _one_plus_squash(other)
            if form and _squash_reads(other, data, avoid=node.outputs[0]):
                return form
    return None


def _squash_reads(total: ir.Value, x: ir.Value, avoid: ir.Value, depth: int = 6) -> bool:
    """The erf/tanh under ``total`` (``1 + squash(...)``) computes from ``x`` without going
    through ``avoid``: it is x's GELU, not the GELU of ``avoid = x * c`` (a layer scale)."""
    add = _producer(total, "Add")
    todo = [v for v in add.inputs if _producer(v, *_SQUASH) is not None] if add else []
    for _ in range(depth):
        todo = [
            i
            for v in todo
            if v is not avoid and (p := v.producer()) is not None
            for i in p.inputs
            if i is not None and i is not avoid
        ]
        if x in todo:
            return True
    return False


def _quick_gelu_scale(node: ir.Node, data: ir.Value) -> bool:
    """``node`` is the ``1.702 * x`` of ``x * sigmoid(1.702 * x)``."""
    for use in node.outputs[0].uses():
        sigmoid = use.node
        if not is_onnx(sigmoid, "Sigmoid"):
            continue
        for product in sigmoid.outputs[0].uses():
            if is_onnx(product.node, "Mul") and data in product.node.inputs:
                return True
    return False


def _root_of_mean(value: ir.Value | None) -> bool:
    """``value`` is ``sqrt(mean(...) + eps)`` (or ``sqrt(mean(...))``)."""
    sqrt = _producer(value, "Sqrt")
    if sqrt is None:
        return False
    inner = sqrt.inputs[0]
    add = _producer(inner, "Add")
    sources = add.inputs if add is not None else (inner,)
    return any(_producer(v, "ReduceMean") is not None for v in sources)


def _normalized(value: ir.Value) -> bool:
    """``value`` is a normalised activation: ``a / sqrt(mean + eps)`` or ``a * (1 / sqrt(...))``
    (``Reciprocal`` or ``Div(1, .)``), the body of a LayerNorm or RMSNorm decomposition."""
    node = _producer(value, "Div", "Mul")
    if node is None or len(node.inputs) != 2:
        return False
    if node.op_type == "Div":
        return _root_of_mean(node.inputs[1])
    for v in node.inputs:
        inverse = _producer(v, "Reciprocal", "Div")
        if inverse is not None and _root_of_mean(inverse.inputs[-1]):
            return True
    return False


def _norm_weighted(ctx: Context, value: ir.Value) -> bool:
    """``value`` is a norm's output times its (constant) weight: the beta ``Add`` comes next."""
    weight = _producer(value, "Mul")
    if weight is None:
        return False
    data = _data_input(ctx, weight)
    return data is not None and _normalized(data)


def rewrite_for_runtime(ctx: Context, graph: ir.Graph) -> list[str]:
    """Write the patterns of ``graph`` (not its subgraphs) that an exporter spells in an order
    onnxruntime does not match in the order it does; one line per rewrite, for the report.

    - dynamo's GELU ``x * (0.5 * (1 + erf(x / s)))`` becomes ``(x * (1 + erf(x / s))) * 0.5``,
      which ``GeluFusion`` matches, and its tanh form ``x * (0.5 * (1 + tanh(...)))`` becomes
      ``(x * 0.5) * (1 + tanh(...))``, which ``FastGeluFusion`` matches (each bit-identical:
      a multiplication by 0.5 is exact);
    - an RMSNorm's ``Reciprocal(sqrt(mean + eps))`` becomes ``Div(1, sqrt(...))`` (both one
      correctly rounded division), which ``SimplifiedLayerNormFusion`` matches.

    New nodes, values and constants get names fresh in the model (``ctx.names``).
    """
    lines = []
    for node in list(graph):
        form = _reorder_gelu(ctx, graph, node)
        if form:
            lines.append(f"GELU at '{node.name}' reordered as {_GELU_ORDER[form]}")
            continue
        div = _reciprocal_as_div(ctx, graph, node)
        if div is not None:
            lines.append(f"RMSNorm's Reciprocal '{node.name}' written as Div(1, Sqrt) '{div}'")
    return lines


# The order of its factors in which onnxruntime fuses each form of GELU.
_GELU_ORDER = {
    "erf": "x * (1 + erf(x / sqrt 2)) * 0.5",
    "tanh": "x * 0.5 * (1 + tanh(...))",
}


def _reorder_gelu(ctx: Context, graph: ir.Graph, node: ir.Node) -> str | None:
    """Rewrite ``node = x * (0.5 * sum)`` in the order onnxruntime fuses: the form, or None."""
    found = _dynamo_gelu(ctx, node)
    if found is None:
        return None
    half, inner, x, total, form = found
    base = inner.name or "gelu_product"
    # erf: (x * sum) * 0.5; tanh: (x * 0.5) * sum
    first, second = (total, half) if form == "erf" else (half, total)
    product = ir.node("Mul", [x, first], name=ctx.names.fresh(base))
    out = product.outputs[0]
    out.name = ctx.names.fresh(f"{base}_output")
    if node.outputs[0].type is not None:  # the product has the GELU's type and shape
        out.type, out.shape = node.outputs[0].type, node.outputs[0].shape
    graph.insert_before(node, product)
    node.replace_input_with(0, out)
    node.replace_input_with(1, second)
    graph.remove(inner, safe=True)
    node.name = node.name or ctx.names.fresh("gelu")
    return form


def _reciprocal_as_div(ctx: Context, graph: ir.Graph, node: ir.Node) -> str | None:
    """``Reciprocal(sqrt(mean(x^2) + eps))`` read by the norm's ``Mul``s, as ``Div(1, .)``:
    the new node's name, or None when ``node`` is not that."""
    if not is_onnx(node, "Reciprocal") or not node.inputs or node.inputs[0] is None:
        return None
    root, out = node.inputs[0], node.outputs[0]
    if out.dtype is None and root.dtype is None:
        ctx.shapes.request()  # the model records no types: infer them (once per run)
    dtype = out.dtype or root.dtype
    readers = [u.node for u in out.uses()]
    if dtype is None or not readers or not all(is_onnx(r, "Mul") for r in readers):
        return None
    if not _root_of_mean(root):
        return None
    one = ir.Value(name=ctx.names.fresh("one"), const_value=ir.tensor(np.array(1, dtype.numpy())))
    one.dtype, one.shape = dtype, ir.Shape([])
    graph.register_initializer(one)
    div = ir.node("Div", [one, root], name=ctx.names.fresh(node.name or "reciprocal"))
    div.outputs[0].name, div.outputs[0].dtype, div.outputs[0].shape = (
        ctx.names.fresh(out.name or "reciprocal_output"),
        dtype,
        out.shape,
    )
    graph.insert_before(node, div)
    ir.convenience.replace_all_uses_with(out, div.outputs[0])
    graph.remove(node, safe=True)
    return div.name


def _dynamo_gelu(ctx: Context, node: ir.Node) -> tuple | None:
    """``node`` is ``Mul(x, Mul(0.5, 1 + erf(x / s)))`` or its tanh form (operands in any
    order): (the 0.5, the inner Mul, x, the sum, the form), or None. The inner Mul must feed
    only ``node``, and the erf or tanh must compute from this ``x``."""
    if not is_onnx(node, "Mul") or len(node.inputs) != 2 or None in node.inputs:
        return None
    for i in (0, 1):
        x, scaled = node.inputs[1 - i], node.inputs[i]
        inner = scaled.producer()
        if not is_onnx(inner, "Mul") or scaled.is_graph_output() or len(scaled.uses()) != 1:
            continue
        half = _half_operand(ctx, inner)
        if half is None or scaled is x:
            continue
        total = inner.inputs[1] if inner.inputs[0] is half else inner.inputs[0]
        form = _one_plus_squash(total)
        if form and _squash_reads(total, x, avoid=scaled):
            return half, inner, x, total, form
    return None


def _half_operand(ctx: Context, node: ir.Node) -> ir.Value | None:
    """The operand of ``node`` that is the constant scalar 0.5, if any."""
    if len(node.inputs) != 2 or None in node.inputs:
        return None
    for v in node.inputs:
        c = ctx.constants.resolve(v)
        if isinstance(c, Constant) and c.size == 1 and np.asarray(c.array()).item() == 0.5:
            return v
    return None
