"""Scalar multiplies left after a projection, seen through the shape ops attention puts between them.

``free_folds`` (the shared tool) walks from a constant ``Mul`` back through
``Reshape``/``Transpose``/``Flatten``/``Squeeze``/``Unsqueeze``. Exported attention puts two more
ops between a projection and its scale that change no value:

* ``Split`` of GPT-2's fused qkv projection: the q (or k) scale then belongs to one block of
  the projection's columns, and folds into those columns and that part of the bias;
* ``Cast(to=FLOAT)`` of a float32 value, which the legacy exporter writes after every PEFT
  adapter (``result.to(torch_result_dtype)``) and after RMSNorm.

``projection_scales`` lists the scalar ``Mul``/``Div`` reached that way from a linear op with a
constant weight (and optionally its constant bias ``Add``), each link used only once. The models
here are float32, so ``Cast(to=FLOAT)`` is taken as the identity.
"""

from __future__ import annotations

import numpy as np
import onnx

__all__ = ["projection_scales"]

_SEE_THROUGH = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Split"}


def _constants(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    shapes = {i.name: tuple(i.dims) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            shapes[node.output[0]] = tuple(node.attribute[0].t.dims)
        elif node.op_type in ("Identity", "Transpose") and node.input[0] in shapes:
            shapes[node.output[0]] = shapes[node.input[0]]
    return shapes


def _is_float_cast(node: onnx.NodeProto) -> bool:
    to = next((a.i for a in node.attribute if a.name == "to"), None)
    return node.op_type == "Cast" and to == onnx.TensorProto.FLOAT


def projection_scales(model: onnx.ModelProto) -> list[str]:
    """``"Mul name after projection name"`` for each scalar scale foldable into a projection."""
    graph = model.graph
    constants = _constants(graph)
    producer = {o: n for n in graph.node for o in n.output}
    uses: dict[str, int] = {}
    for node in graph.node:
        for i in node.input:
            uses[i] = uses.get(i, 0) + 1
    outputs = {o.name for o in graph.output}

    def single(value: str) -> bool:
        return uses.get(value, 0) == 1 and value not in outputs and value in producer

    def linear(node: onnx.NodeProto) -> bool:
        return node.op_type in ("Gemm", "MatMul") and node.input[1] in constants

    found = []
    for node in graph.node:
        data = [i for i in node.input if i not in constants]
        scale = [constants[i] for i in node.input if i in constants]
        if node.op_type not in ("Mul", "Div") or len(data) != 1 or not scale:
            continue
        if int(np.prod(scale[0])) != 1 or not single(data[0]):
            continue
        p = producer[data[0]]
        while (p.op_type in _SEE_THROUGH or _is_float_cast(p)) and single(p.input[0]):
            p = producer[p.input[0]]
        if p.op_type in ("Add", "Sub") and any(i in constants for i in p.input):
            d = next(i for i in p.input if i not in constants)
            p = producer[d] if single(d) else p
        if linear(p):
            found.append(f"{node.op_type} {node.name} after {p.name}")
    return found
