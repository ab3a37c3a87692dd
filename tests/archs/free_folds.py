#!/usr/bin/env python3
"""List the free folds left in an ONNX model: a constant Mul/Div/Neg/BatchNormalization, or a constant Add/Sub beyond
the bias, next to a Gemm/MatMul/Conv with a constant weight (directly, or through Reshape/Transpose/Flatten/Squeeze/
Unsqueeze; behind those only scalars count), where folding it into the weight adds no work. Also counts
BatchNormalization nodes left. A heuristic from the graph alone: a listed fold may still need a reason to be left.
Usage: free_folds.py MODEL.onnx [...]   (exit 1 when any fold or BatchNormalization is left)

Vendored unchanged (apart from formatting) from /work/shared/tools/free_folds.py, which lives outside
the repository, so that tests and benchmarks run on a fresh clone. Keep the two in step."""

import sys

import numpy as np
import onnx

LINEAR = {"Gemm", "MatMul"}
STEP = {"Mul", "Div", "Neg", "BatchNormalization"}
PASS_THROUGH = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}


def consts(m):
    """Constant value names -> shape (initializers and Constant nodes)."""
    shapes = {i.name: tuple(i.dims) for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant":
            t = next((a.t for a in n.attribute if a.name == "value"), None)
            shapes[n.output[0]] = tuple(t.dims) if t is not None else ()
    return shapes


def scalar(shape):
    return int(np.prod(shape)) == 1


def last_axis_only(
    shape,
):  # broadcasts along the feature (last) axis only: foldable into a weight's columns
    return all(d == 1 for d in shape[:-1])


def free_folds(m, found_at=None):
    """Constant affine steps that sit next to a constant-weight linear op and could be folded into it for free."""
    c = consts(m)
    prod = {o: n for n in m.graph.node for o in n.output}
    uses = {}
    for n in m.graph.node:
        for i in n.input:
            uses.setdefault(i, []).append(n)
    outs = {o.name for o in m.graph.output}

    def single(v):
        return len(uses.get(v, [])) == 1 and v not in outs

    def const_linear(n):
        return n.op_type in LINEAR | {"Conv"} and len(n.input) > 1 and n.input[1] in c

    def per_channel(
        n, conv
    ):  # a constant that a Conv's bias or weight can absorb: scalar or one per channel
        w = next((i for i in m.graph.initializer if i.name == conv.input[1]), None)
        k = [c[i] for i in n.input if i in c]
        return (
            w is not None
            and k
            and int(np.prod(k[0])) in (1, w.dims[0])
            and all(d == 1 for d in k[0][-2:])
        )

    def const_shape(n):
        return next((c[i] for i in n.input if i in c), ())

    def is_step(n):
        return n.op_type in STEP and (
            n.op_type in ("Neg", "BatchNormalization") or any(i in c for i in n.input)
        )

    found = 0
    for n in m.graph.node:
        if not is_step(n) and n.op_type not in ("Add", "Sub"):
            continue
        if n.op_type in ("Add", "Sub") and not any(i in c for i in n.input):
            continue
        data = [i for i in n.input if i not in c][:1]
        if not data or data[0] not in prod or not single(data[0]):
            continue
        p, seen_bias, moved = prod[data[0]], False, False
        while p.op_type in PASS_THROUGH and p.input[0] in prod and single(p.input[0]):
            p, moved = prod[p.input[0]], True
        if n.op_type != "BatchNormalization" and p.op_type != "Conv":
            k = const_shape(
                n
            )  # behind a shape op only a scalar is surely foldable; next to it, a per-feature vector
            if not (scalar(k) if moved else last_axis_only(k)):
                continue
        if p.op_type in ("Add", "Sub") and any(i in c for i in p.input):  # the linear op's own bias
            d = [i for i in p.input if i not in c][:1]
            if d and d[0] in prod and single(d[0]):
                p, seen_bias = prod[d[0]], True
        if p.op_type == "Conv" and not (const_linear(p) and per_channel(n, p)):
            continue
        if const_linear(p) and (is_step(n) or seen_bias or p.op_type == "Conv"):
            found += 1
            if found_at is not None:
                found_at.append(f"{n.op_type} {n.name} after {p.name}")
    for n in m.graph.node:  # a constant Mul/Div right before a linear op
        if const_linear(n) and n.input[0] in prod and single(n.input[0]):
            p = prod[n.input[0]]
            if (
                p.op_type in ("Mul", "Div")
                and any(i in c for i in p.input)
                and last_axis_only(const_shape(p))
            ):
                found += 1
                if found_at is not None:
                    found_at.append(f"{p.op_type} {p.name} before {n.name}")
    return found


def main(paths):
    worst = 0
    for p in paths:
        m = onnx.load(p, load_external_data=False)
        where = []
        n = free_folds(m, where)
        bn = sum(1 for x in m.graph.node if x.op_type == "BatchNormalization")
        print(f"{p}: {n} free folds, {bn} BatchNormalization left")
        for w in where:
            print("  " + w)
        worst = max(worst, 1 if n or bn else 0)
    return worst


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
