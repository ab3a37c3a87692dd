"""Make one planned convolution merge: decide, compute, write, each once and in that order.

1. **decide** from shapes: the merge's nodes are all still in the graph and read the same input
   (:meth:`ConvMerge.alive`); its ``plan`` gives the merged geometry or a reason
   (:mod:`converter.fusion.conv.algebra`); under ``policy="cost"`` a merge that adds multiply-adds
   per output position or parameters is refused.
2. **compute** the merged conv once in float64; refuse it if the model's dtype cannot hold it.
3. **write** one ``Conv`` (explicit ``pads``, never ``auto_pad``) rounded once to the dtype, taking
   over the old output value (same name, type and shape) so everything downstream is untouched;
   remove the constants only the replaced nodes read; check the rewrite's invariants.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from converter.fusion.conv import algebra as ca
from converter.fusion.conv.match import ConvMerge
from converter.fusion.core import invariants
from converter.fusion.core.constants import remove_if_unused
from converter.fusion.core.context import Context
from converter.fusion.core.declined import Declined
from converter.fusion.core.graph import shape_list
from converter.fusion.linear import algebra
from converter.report import FusionRecord

__all__ = ["apply"]

logger = logging.getLogger(__name__)


def apply(
    ctx: Context,
    graph: ir.Graph,
    label: str,
    merge: ConvMerge,
    fusions: list[FusionRecord],
    declined: list[Declined],
) -> int:
    """Make ``merge`` if it is still possible and worth it: 1 if made, else 0 (and a reason)."""
    if not merge.alive(graph):
        return 0  # an earlier merge of this round took part of it: matched again next round
    plan = merge.plan()
    reason = plan.reason if isinstance(plan, Declined) else _cost_reason(merge, plan, ctx)
    if reason:
        declined.append(Declined(merge.names, reason, label))
        return 0
    conv = merge.compute()  # the one float64 computation of this merge
    if isinstance(conv, Declined):
        declined.append(Declined(merge.names, conv.reason, label))
        return 0
    reason = algebra.arrays_overflow((conv.weight, conv.bias), np.dtype(merge.dtype.numpy()))
    if reason:
        declined.append(Declined(merge.names, f"{reason}; convs left as they were", label))
        return 0
    _write(ctx, graph, label, merge, conv, fusions)
    return 1


def _cost_reason(merge: ConvMerge, plan: ca.ConvGeometry, ctx: Context) -> str | None:
    if ctx.policy != "cost":
        return None
    macs, params = plan.macs_per_position, plan.params
    if macs <= merge.macs_before and params <= merge.params_before:
        return None
    return (
        f"cost model: merging would take multiply-adds per output position from "
        f"{merge.macs_before} to {macs} and parameters from {merge.params_before} to {params} "
        f"(a {plan.describe()}; --policy always merges anyway)"
    )


def _initializer(graph: ir.Graph, ctx: Context, base: str, array: np.ndarray) -> ir.Value:
    name = ctx.names.fresh(base)
    value = ir.Value(name=name, const_value=ir.Tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _fused_name(merge: ConvMerge) -> str:
    names = [n.name or n.op_type for n in merge.nodes]
    if len(names) > 4:
        names = [names[0], f"...{len(names) - 2} more...", names[-1]]
    return "fused(" + "+".join(names) + ")"


def _new_conv(
    ctx: Context, graph: ir.Graph, merge: ConvMerge, conv: ca.ConvMap, x: ir.Value
) -> ir.Node:
    dtype = merge.dtype.numpy()
    base = ctx.names.fresh(_fused_name(merge))
    inputs = [
        x,
        _initializer(graph, ctx, f"{base}.weight", algebra.round_to_dtype(conv.weight, dtype)),
    ]
    if conv.bias is not None:
        inputs.append(
            _initializer(graph, ctx, f"{base}.bias", algebra.round_to_dtype(conv.bias, dtype))
        )
    attributes = {
        "kernel_shape": list(conv.kernel_shape),
        "strides": list(conv.strides),
        "pads": list(conv.pads),
        "dilations": list(conv.dilations),
        "group": conv.groups,
    }
    doc = "onnx-fuse merged: " + ", ".join(merge.names)
    return ir.node("Conv", inputs, attributes=attributes, name=base, doc_string=doc)


def _write(
    ctx: Context,
    graph: ir.Graph,
    label: str,
    merge: ConvMerge,
    conv: ca.ConvMap,
    fusions: list[FusionRecord],
) -> None:
    old_nodes, old_out, x = merge.nodes, merge.out, merge.x
    assert x is not None
    consumed = [ctx.records.pop(v) for n in old_nodes for v in n.outputs if v in ctx.records]
    node = _new_conv(ctx, graph, merge, conv, x)
    record = FusionRecord(
        nodes=merge.names,
        op_types=[n.op_type for n in old_nodes],
        new_nodes=[node.name or "Conv"],
        graph=label,
        output=old_out.name or "",
        widths=[conv.in_channels, conv.out_channels],
        input_shape=shape_list(x),
        output_shape=shape_list(old_out),
        macs_before=merge.macs_before,
        macs_after=conv.macs_per_position,
        params_before=merge.params_before,
        params_after=conv.params,
        note=merge.note,
    )
    new_out = node.outputs[0]
    ir.convenience.replace_nodes_and_values(
        graph, old_nodes[-1], old_nodes, [node], [old_out], [new_out]
    )
    for constant in merge.constants:
        remove_if_unused(constant.value)
    for earlier in consumed:  # their output value is gone: name the merge that took it
        earlier.merged_into = record.new_nodes[0]
        earlier.output = None
    ctx.records[new_out] = record
    ctx.renamed.update((name, record.new_nodes[0]) for name in record.nodes)
    fusions.append(record)
    invariants.check_rewrite(graph, label, old_nodes, [node])
    if ctx.check_every_rewrite:
        invariants.check_model(ctx.model)
    ctx.merged += 1
    logger.debug("merged %s (%s)", record.nodes, record.note)
