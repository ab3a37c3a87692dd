"""Look inside a model without changing it: every linear op, and what the fuser would merge.

:func:`inspect_file` answers the two questions PyTorch users ask about an exported model:

* *What is each layer?* One :class:`OpInfo` per ``Gemm``, ``MatMul`` and ``Conv``: its form
  (``Gemm transB=1``, ``MatMul+Add``, ``left MatMul``, ``Conv 3x3 groups=1``), ``in -> out``
  features, the weight as stored and what that layout means. torch stores ``nn.Linear(in, out)``
  as ``(out, in)`` and computes ``y = x @ W.T + b``; ``Gemm(transB=1)`` keeps that layout, while
  ``MatMul`` needs ``(in, out)``: ``y = x @ W + b``.
* *What would onnx-fuse do?* The real fuser runs on a second copy of the model, and each merge
  (with MACs per row and parameters before -> after) and each refusal (with its reason) is listed.

:func:`linear_weights` gives each op's weight in ``(in, out)`` layout and its bias under
``NODE.weight`` / ``NODE.bias`` so that ``x @ W + b`` reproduces the layer with numpy alone, for
Gemm in every ``transA``/``transB``/``alpha``/``beta`` form (``W = alpha * op(B)``, ``b = beta * C``;
with ``transA=1``, ``x`` is ``A.T``) and for MatMul with or without its bias ``Add``. A layer
without a bias gets zeros, so one formula serves every layer. A ``Conv``'s kernel is written as
ONNX stores it, ``(out, in / groups, *kernel)``, torch's ``nn.ConvNd.weight`` layout.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from converter.errors import InputError
from converter.fusion.conv.match import ConvOp, recognize_conv
from converter.fusion.core.constants import Constants
from converter.fusion.core.context import Context
from converter.fusion.core.declined import Declined
from converter.fusion.core.graph import is_onnx, iter_graphs
from converter.fusion.core.policy import Policy
from converter.fusion.linear.linear_op import LinearOp
from converter.fusion.linear.ops import recognize
from converter.fusion.passes import fuse_model
from converter.model_io import files as io
from converter.model_io import training
from converter.report import NOT_SORTED_NOTE, FusionReport

__all__ = [
    "OpInfo",
    "Inspection",
    "inspect_model",
    "inspect_file",
    "linear_weights",
    "format_table",
]


@dataclass
class OpInfo:
    """One Gemm, MatMul or Conv: what it computes and, if it is not mergeable, why."""

    node: str
    graph: str
    form: str
    in_features: int | None
    out_features: int | None
    weight_shape: list[int] | None
    meaning: str
    bias: list[int] | None
    dtype: str
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Inspection:
    """What :func:`inspect_model` found: the ops, and the fuser's plan for a copy of the model."""

    source: str | None
    ops: list[OpInfo] = field(default_factory=list)
    plan: FusionReport = field(default_factory=FusionReport)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: ``ops``, ``merges`` and ``declined`` (each with its reason)."""
        plan = self.plan.to_dict()
        return {
            "source": self.source,
            "ops": [op.to_dict() for op in self.ops],
            "merges": plan["fusions"],
            "declined": plan["declined"],
            "runtime_rewrites": plan["runtime_rewrites"],
            "totals": {
                key: [plan[f"{key}_before"], plan[f"{key}_after"]]
                for key in ("linear_ops", "macs", "params")
            },
        }


def _name(node: ir.Node) -> str:
    return node.name or f"<{node.op_type} -> {node.outputs[0].name}>"


def _dtype_name(dtype: ir.DataType) -> str:
    try:
        return str(np.dtype(dtype.numpy()))
    except (TypeError, ValueError):
        return dtype.name.lower()


def _dtype(value: ir.Value | None, array: np.ndarray | None = None) -> str:
    if value is not None and value.dtype is not None:
        return _dtype_name(value.dtype)
    return str(array.dtype) if array is not None else "?"


def _shape(constants: Constants, value: ir.Value | None) -> list[int] | None:
    array = constants.array(value)
    if not isinstance(array, Declined):
        return list(array.shape)
    if value is not None and value.shape is not None and value.shape.is_static():
        return [int(d) for d in value.shape]
    return None


def _linear_info(constants: Constants, op: LinearOp, label: str) -> OpInfo:
    node = op.nodes[0]
    if not is_onnx(node):  # an ONNX-ML regressor or classifier: its weights are attributes
        shape = [op.out_features, op.in_features]
        meaning = "coefficients (out,in): y = x @ C.T + intercepts"
        return OpInfo(
            _name(node),
            label,
            node.op_type,
            op.in_features,
            op.out_features,
            shape,
            meaning,
            [op.out_features] if op.has_bias else None,
            _dtype_name(op.dtype),
        )
    shape = _shape(constants, node.inputs[1])
    bias_value = op.weights[1] if len(op.weights) > 1 else None
    if op.is_gemm:
        t_a, t_b = node.attributes.get_int("transA", 0), node.attributes.get_int("transB", 0)
        alpha, beta = (
            node.attributes.get_float("alpha", 1.0),
            node.attributes.get_float("beta", 1.0),
        )
        form = f"Gemm transA={t_a} transB={t_b}" + (
            f" alpha={alpha:g} beta={beta:g}" if (alpha, beta) != (1.0, 1.0) else ""
        )
        meaning = "(out,in): y = x @ W.T + b" if t_b else "(in,out): y = x @ W + b"
        if t_a:
            meaning += " with x = A.T"
    else:
        form = "MatMul+Add" if len(op.nodes) > 1 else "MatMul"
        meaning = "(in,out): y = x @ W + b" if len(op.nodes) > 1 else "(in,out): y = x @ W"
    return OpInfo(
        _name(node),
        label,
        form,
        op.in_features,
        op.out_features,
        shape,
        meaning,
        _shape(constants, bias_value) if bias_value is not None else None,
        _dtype_name(op.dtype),
    )


def _declined_info(constants: Constants, node: ir.Node, reason: str, label: str) -> OpInfo:
    left = constants.array(node.inputs[0]) if node.inputs else None
    right = node.inputs[1] if len(node.inputs) > 1 else None
    form = node.op_type
    meaning, shape = "not constant", _shape(constants, right)
    if node.op_type == "MatMul" and isinstance(left, np.ndarray):
        form, shape = "left MatMul", list(left.shape)
        meaning = "(out,in) on the left: y = W @ x"
    features = (shape[-1], shape[-2]) if form == "left MatMul" and shape else (None, None)
    return OpInfo(
        _name(node), label, form, *features, shape, meaning, None, _dtype(right), note=reason
    )


def _conv_info(constants: Constants, node: ir.Node, label: str) -> OpInfo:
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    array = constants.array(weight)
    reason = array.reason if isinstance(array, Declined) else None
    array = None if isinstance(array, Declined) else array
    shape = list(array.shape) if array is not None else _shape(constants, weight)
    groups = node.attributes.get_int("group", 1)
    kernel = "x".join(str(d) for d in shape[2:]) if shape else "?"
    bias = (
        _shape(constants, node.inputs[2])
        if len(node.inputs) > 2 and node.inputs[2] is not None
        else None
    )
    return OpInfo(
        _name(node),
        label,
        f"Conv {kernel} groups={groups}",
        shape[1] * groups if shape else None,
        shape[0] if shape else None,
        shape,
        "(out,in/groups,kh,kw): y[o] = sum W[o,c] * x[c] over the kernel",
        bias,
        _dtype(weight, array),
        note=reason or "",
    )


def _context(model: ir.Model) -> Context:
    """A context for reading ``model`` (no run): weights a run marked trained stay unmerged."""
    return Context(model, trained=training.marked(model))


def _op_infos(model: ir.Model) -> list[OpInfo]:
    ctx = _context(model)
    infos = []
    for graph, label in iter_graphs(model.graph):
        for node in graph:
            if is_onnx(node, "Conv"):
                infos.append(_conv_info(ctx.constants, node, label))
                continue
            found = recognize(ctx, node)
            if isinstance(found, LinearOp):
                infos.append(_linear_info(ctx.constants, found, label))
            elif isinstance(found, Declined):
                infos.append(_declined_info(ctx.constants, node, found.reason, label))
    return infos


def inspect_model(model: ir.Model, plan_model: ir.Model, *, policy: Policy = "cost") -> Inspection:
    """List ``model``'s linear ops and run the fuser on ``plan_model`` (a copy it may rewrite)."""
    if plan_model is model:
        raise ValueError("inspect_model needs a second copy of the model for the fuser to rewrite")
    return Inspection(None, _op_infos(model), fuse_model(plan_model, policy=policy))


def inspect_file(path: str | os.PathLike, *, policy: Policy = "cost") -> Inspection:
    """Load ``path`` twice (weights stay on disk), list its ops and the fuser's plan for it.

    The ops are listed in the file's node order; the plan is made on the graph sorted, as the
    fuser sees it (a graph with no topological order is refused, naming the file)."""
    try:
        inspection = inspect_model(io.load_model(path), io.load_model(path), policy=policy)
    except InputError as e:  # the fuser's refusal of the graph: name the file too
        raise type(e)(f"{os.fspath(path)}: {e}") from None
    inspection.source = os.fspath(path)
    return inspection


def linear_weights(model: ir.Model) -> dict[str, np.ndarray]:
    """``{NODE.weight: (in, out), NODE.bias: (out,) or (M, out)}`` for every linear op, and
    ``{NODE.weight: (out, in / groups, *kernel), NODE.bias: (out,)}`` for every Conv.

    ``x @ W + b`` reproduces each Gemm or MatMul(+Add) (float64 products rounded to the op's
    dtype; bfloat16 is written as float32, which numpy can store). A Conv's kernel is written as
    ONNX stores it, which is torch's ``nn.ConvNd.weight`` layout: a re-parameterised model's
    fused kernels load straight into the deploy form (its strides, pads and groups are in the
    table). A layer without a bias gets zeros. Node names are made unique within the result.
    """
    ctx = _context(model)
    arrays: dict[str, np.ndarray] = {}
    for graph, _ in iter_graphs(model.graph):
        for node in graph:
            conv = recognize_conv(ctx, node) if is_onnx(node, "Conv") else None
            if isinstance(conv, ConvOp):
                _add_conv(arrays, node, conv)
                continue
            op = recognize(ctx, node)
            if not isinstance(op, LinearOp):
                continue
            affine = op.affine
            dtype = _storable(op.dtype)
            bias = affine.bias if affine.bias is not None else np.zeros(affine.out_features)
            key = _unique(_name(node), arrays)
            arrays[f"{key}.weight"] = affine.weight.astype(dtype)
            arrays[f"{key}.bias"] = bias.astype(dtype)
    return arrays


def _add_conv(arrays: dict[str, np.ndarray], node: ir.Node, conv: ConvOp) -> None:
    dtype = _storable(conv.dtype)
    weight = np.asarray(conv.weight.array())
    out_channels = weight.shape[0]
    bias = np.zeros(out_channels) if conv.bias is None else np.asarray(conv.bias.array())
    key = _unique(_name(node), arrays)
    arrays[f"{key}.weight"] = weight.astype(dtype)
    arrays[f"{key}.bias"] = bias.reshape(out_channels).astype(dtype)


def _storable(dtype: ir.DataType) -> np.dtype:
    numpy_dtype = np.dtype(dtype.numpy())
    return numpy_dtype if numpy_dtype.kind == "f" else np.dtype(np.float32)


def _unique(name: str, taken: dict[str, np.ndarray]) -> str:
    key, n = name, 1
    while f"{key}.weight" in taken:
        n += 1
        key = f"{name}#{n}"
    return key


# --------------------------------------------------------------------------- rendering


_OP_COLUMNS = ("node", "form", "in -> out", "weight (stored)", "meaning", "bias", "dtype")


def _tuple(shape: list[int] | None, missing: str) -> str:
    return missing if shape is None else str(tuple(shape))


def _op_row(op: OpInfo) -> list[str]:
    features = f"{op.in_features} -> {op.out_features}" if op.in_features else "?"
    shape, bias = _tuple(op.weight_shape, "?"), _tuple(op.bias, "-")
    meaning = op.meaning + (f"  [{op.note}]" if op.note else "")
    return [op.node, op.form, features, shape, meaning, bias, op.dtype]


def _table(header: tuple[str, ...], rows: list[list[str]], *, rule: str) -> list[str]:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]

    def line(cells: tuple[str, ...] | list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(header), rule * len(line(header)), *(line(r) for r in rows)]


def _keep(reason: str) -> str:
    """The decision cell of a declined record (a reason kept for the runtime says so itself)."""
    return reason if reason.startswith("kept:") else f"keep: {reason}"


def format_table(inspection: Inspection, *, terminal: bool = False) -> str:
    """The human-readable tables; ``terminal`` adds bold headings and box-drawing rules."""
    rule = "─" if terminal else "-"
    bold, plain = ("\033[1m", "\033[0m") if terminal else ("", "")
    plan = inspection.plan
    lines = [f"{bold}linear ops in {inspection.source or 'the model'}{plain}"]
    lines += _table(_OP_COLUMNS, [_op_row(op) for op in inspection.ops], rule=rule)
    lines += ["", f"{bold}what onnx-fuse would do{plain}"]
    rows = [
        [
            " + ".join(r.nodes),
            "->".join(map(str, r.widths)),
            f"{r.macs_before:,} -> {r.macs_after:,}",
            f"{r.params_before:,} -> {r.params_after:,}",
            "merge",
        ]
        for r in plan.fusions
    ]
    rows += [[" + ".join(d.nodes) or "-", "", "", "", _keep(d.reason)] for d in plan.declined]
    rows += [
        ["-", "", "", "", f"rewrite for the runtime: {line}"] for line in plan.runtime_rewrites
    ]
    if rows:
        header = ("nodes", "widths", "MACs/row", "params", "decision")
        lines += _table(header, rows, rule=rule)
    else:
        lines.append(f"nothing to merge: {plan.why_nothing_merged()}")
    lines.append(
        f"total: linear ops {plan.linear_ops_before} -> {plan.linear_ops_after}, "
        f"MACs per row {plan.macs_before:,} -> {plan.macs_after:,}, "
        f"weight params {plan.params_before:,} -> {plan.params_after:,}"
    )
    if plan.sorted_graphs:
        lines.append(f"note: {NOT_SORTED_NOTE} ({', '.join(plan.sorted_graphs)})")
    return "\n".join(lines)
