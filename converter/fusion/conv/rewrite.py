"""One merge of convolutions, in the engine's three steps: decide (shapes), compute, write.

A :class:`ConvMerge` names its nodes (the one computing the result last), where it reads its
input ``x``, and two functions the finders (:mod:`converter.fusion.conv.merge`) give it:

1. **decide** from shapes: ``plan`` gives the merged geometry or why there is none
   (:mod:`converter.fusion.conv.geometry`; a few per-channel constants may be read, never a
   weight); under ``policy="cost"`` a merge that adds multiply-adds per output position or
   parameters is refused.
2. **compute** the merged conv once in float64 (``make``, :mod:`converter.fusion.conv.algebra`);
   the engine refuses it if the model's dtype cannot hold it.
3. **write** one ``Conv`` (explicit ``pads``, never ``auto_pad``) rounded once to the dtype,
   taking over the old output value; the constants only the replaced nodes read go.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import onnx_ir as ir

from converter.fusion.conv import algebra as ca
from converter.fusion.conv.geometry import ConvGeometry
from converter.fusion.core.constants import Constant
from converter.fusion.core.context import Context
from converter.fusion.core.declined import Declined
from converter.fusion.core.dtypes import round_to_dtype
from converter.fusion.core.graph import shape_list
from converter.fusion.core.merge import Merge, Round, Written
from converter.fusion.core.writing import fused_name, initializer, replace, take_out
from converter.report import FusionRecord

__all__ = ["ConvMerge"]


def _name(node: ir.Node) -> str:
    return node.name or f"<{node.op_type}>"


@dataclass(eq=False)
class ConvMerge(Merge):
    """One planned merge of convs: its nodes (the last computes the result), where it reads
    ``x``, and how to plan (from shapes and small constants) and make (float64) the merged conv."""

    nodes: list[ir.Node]
    reads: list[tuple[ir.Node, int]]
    dtype: ir.DataType
    plan: Callable[[], ConvGeometry | Declined]
    make: Callable[[], ca.ConvMap | Declined]
    macs_before: int
    params_before: int
    note: str
    constants: list[Constant] = field(default_factory=list)
    # A channel affine folded into the conv across views (``views``, left as they are): taken
    # out after the conv is written, its readers reading its data input.
    step: ir.Node | None = None
    views: list[ir.Node] = field(default_factory=list)
    refolds: bool = False  # the conv's output name now holds the folded step's values
    # The merged conv is followed by ``Transpose(perm)`` (branches each transposed before their
    # sum: the sum of the transposes is the transpose of the sum).
    after_perm: tuple[int, ...] | None = None

    left_as_is = "convs left as they were"

    @property
    def x(self) -> ir.Value | None:
        node, index = self.reads[0]
        return node.inputs[index]

    @property
    def out(self) -> ir.Value:
        return self.nodes[-1].outputs[0]

    @property
    def names(self) -> list[str]:
        across = [*self.views, self.step] if self.step is not None else []
        return [_name(n) for n in self.nodes + across]

    @property
    def old_nodes(self) -> list[ir.Node]:
        """Every node the merge removes: its nodes, and the step it takes out across views."""
        return self.nodes + ([self.step] if self.step is not None else [])

    def alive(self, graph: ir.Graph) -> bool:
        """All nodes still in ``graph`` and every branch still reads the same input."""
        across = [*self.views, self.step] if self.step is not None else []
        if not all(n.graph is graph for n in self.nodes + across):
            return False
        x = self.x
        return all(node.inputs[i] is x for node, i in self.reads)

    def decide(self, round: Round) -> ConvGeometry | Declined:
        plan = self.plan()
        if isinstance(plan, Declined):
            return plan.about(self.names)
        reason = _cost_reason(self, plan, round.ctx)
        return Declined(self.names, reason) if reason else plan

    def compute(self, plan: ConvGeometry) -> ca.ConvMap | Declined:
        conv = self.make()  # the one float64 computation of this merge
        return conv.about(self.names) if isinstance(conv, Declined) else conv

    def write(self, round: Round, plan: ConvGeometry, computed: ca.ConvMap) -> Written:
        old_nodes, old_out, x = self.nodes, self.out, self.x  # the step is taken out after
        assert x is not None
        node = _new_conv(round.ctx, round.graph, self, computed, x)
        record = FusionRecord(
            nodes=self.names,
            op_types=[n.op_type for n in old_nodes],
            new_nodes=[node.name or "Conv"],
            graph=round.label,
            output=old_out.name or "",
            widths=[computed.in_channels, computed.out_channels],
            input_shape=shape_list(x),
            output_shape=shape_list(old_out),
            macs_before=self.macs_before,
            macs_after=computed.macs_per_position,
            params_before=self.params_before,
            params_after=computed.params,
            note=self.note,
        )
        new = [node]
        if self.after_perm is not None:
            new.append(
                ir.node(
                    "Transpose",
                    [node.outputs[0]],
                    attributes={"perm": list(self.after_perm)},
                    name=round.ctx.names.fresh(f"{node.name}.transpose"),
                )
            )
            record.new_nodes.append(new[-1].name)
        replace(round.graph, old_nodes, new, old_out, [c.value for c in self.constants])
        if self.step is not None:
            data = next(
                v
                for v in self.step.inputs
                if v is not None and not round.ctx.constants.is_constant(v)
            )
            take_out(self.step, data)
        return Written(new, node, record)


def _cost_reason(merge: ConvMerge, plan: ConvGeometry, ctx: Context) -> str | None:
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


def _new_conv(
    ctx: Context, graph: ir.Graph, merge: ConvMerge, conv: ca.ConvMap, x: ir.Value
) -> ir.Node:
    dtype = merge.dtype.numpy()
    base = ctx.names.fresh(fused_name([n.name or n.op_type for n in merge.nodes]))
    weight = round_to_dtype(conv.weight, dtype)
    inputs = [x, initializer(ctx, graph, f"{base}.weight", weight, typed=False)]
    if conv.bias is not None:
        bias = round_to_dtype(conv.bias, dtype)
        inputs.append(initializer(ctx, graph, f"{base}.bias", bias, typed=False))
    attributes = {
        "kernel_shape": list(conv.kernel_shape),
        "strides": list(conv.strides),
        "pads": list(conv.pads),
        "dilations": list(conv.dilations),
        "group": conv.groups,
    }
    doc = "onnx-fuse merged: " + ", ".join(merge.names)
    return ir.node("Conv", inputs, attributes=attributes, name=base, doc_string=doc)
